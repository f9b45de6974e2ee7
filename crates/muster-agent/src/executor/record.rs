//! What an attempt leaves on its host, so that an agent restarted under it never runs it twice.
//!
//! Beside each attempt's log lies `<attempt>.state`: `started` from before anything of the
//! attempt runs, then `exited <code>` (and the reason on the lines after) once it ended. The
//! leader keeps assigning an attempt until its exit is committed, so an agent that restarts
//! between starting an attempt and that commit meets it again: it reports what the record says
//! instead of starting it anew. The process executor's wrapper writes the exit too, so one
//! that ends while the agent is down is still reported as it ended.

use super::AttemptExit;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One attempt's record on this host.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    path: PathBuf,
}

/// What the record says.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Never started on this host.
    Nothing,
    /// Started by an earlier run of the agent; its end was not recorded.
    Started,
    Ended(AttemptExit),
}

impl AttemptRecord {
    pub fn beside(log_path: &Path) -> Self {
        Self {
            path: log_path.with_extension("state"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read(&self) -> Recorded {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Recorded::Nothing;
        };
        let mut lines = text.splitn(2, '\n');
        let first = lines.next().unwrap_or_default().trim();
        match first.strip_prefix("exited ") {
            Some(code) => Recorded::Ended(AttemptExit {
                exit_code: code.trim().parse().ok(),
                reason: lines
                    .next()
                    .map(|r| r.trim_end().to_owned())
                    .filter(|r| !r.is_empty()),
            }),
            // `started`, or a record cut short: it ran, or may have.
            None => Recorded::Started,
        }
    }

    /// Written (and flushed to disk) before anything of the attempt runs.
    pub fn mark_started(&self) -> std::io::Result<()> {
        self.write("started\n")
    }

    pub fn record_end(&self, exit: &AttemptExit) -> std::io::Result<()> {
        let code = exit.exit_code.map_or("-".to_owned(), |c| c.to_string());
        self.write(&format!(
            "exited {code}\n{}\n",
            exit.reason.as_deref().unwrap_or_default()
        ))
    }

    /// Whole or not at all: written beside, then renamed over.
    fn write(&self, text: &str) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("state.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let record = AttemptRecord::beside(&dir.path().join("job/1.log"));
        assert_eq!(record.read(), Recorded::Nothing);
        record.mark_started().unwrap();
        assert_eq!(record.read(), Recorded::Started);
        let exit = AttemptExit {
            exit_code: Some(3),
            reason: Some("Stopped by Muster".into()),
        };
        record.record_end(&exit).unwrap();
        assert_eq!(record.read(), Recorded::Ended(exit));
        let lost = AttemptExit::failed_to_start("gone");
        record.record_end(&lost).unwrap();
        assert_eq!(record.read(), Recorded::Ended(lost));
        // What the process wrapper writes: the code alone.
        std::fs::write(record.path(), "exited 0\n").unwrap();
        assert_eq!(
            record.read(),
            Recorded::Ended(AttemptExit {
                exit_code: Some(0),
                reason: None
            })
        );
    }
}
