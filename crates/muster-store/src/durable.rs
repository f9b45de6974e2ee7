//! sled databases whose flushes survive a power loss.
//!
//! sled 0.34 writes its log with `pwrite` and, on Linux, calls it stable after
//! `sync_file_range`. That call neither commits the file's new size nor flushes the drive's
//! cache, and a FUSE or network file system never sees it. Values over a quarter of a segment
//! go to blob files that sled never fsyncs, in a directory it never fsyncs either. A flush
//! here is therefore sled's flush followed by an `fdatasync` of the database file, of every
//! blob file not yet synced, and of the blob directory when it gained one.
//!
//! The chaos harness found this: with each node's data directory on a file system that
//! forgets what was not fsynced (fault F10), a follower that lost power came back without
//! entries it had acknowledged, and the leader's Raft core panicked ("follower log
//! reversion").

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a flush may take before it is an error. After a write failed on a full disk,
/// sled's flush can wait for good (the chaos harness's `disk_full` left a node that neither
/// answered nor exited); as an error it stops the node's Raft, and `muster server` exits to
/// be restarted once the disk has room.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(60);

/// An open sled database whose [`Database::flush`] is durable. Cloning shares it.
#[derive(Clone)]
pub struct Database {
    db: sled::Db,
    files: Arc<SyncedFiles>,
}

/// What an fsync must reach for sled's writes to be durable.
struct SyncedFiles {
    db_file: File,
    blobs: PathBuf,
    /// Blob files already fsynced (blobs are written once, never rewritten in place).
    synced_blobs: Mutex<BTreeSet<OsString>>,
}

impl Database {
    /// Opens (or creates) the database in `dir`, and makes the files sled made at once
    /// durable, with their names.
    pub(crate) fn open(config: sled::Config, dir: &Path) -> io::Result<Self> {
        let db = config.path(dir).open().map_err(io::Error::other)?;
        let files = SyncedFiles {
            db_file: File::open(dir.join("db"))?,
            blobs: dir.join("blobs"),
            synced_blobs: Mutex::default(),
        };
        files.sync(&files.blobs_now()?)?;
        // sled's configuration file, beside the log (it syncs its own snapshot files).
        match File::open(dir.join("conf")) {
            Ok(conf) => conf.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sync_dir(dir)?;
        // The directory's own name, made on a node's first start.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(Self {
            db,
            files: Arc::new(files),
        })
    }

    pub(crate) fn sled(&self) -> &sled::Db {
        &self.db
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> io::Result<()> {
        let files = self.files.clone();
        let before = tokio::task::spawn_blocking(move || files.blobs_now())
            .await
            .map_err(io::Error::other)??;
        // sled flushes on a thread of its own: given up on, it is left waiting there.
        tokio::time::timeout(FLUSH_DEADLINE, self.db.flush_async())
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "sled's flush did not finish in {} s",
                        FLUSH_DEADLINE.as_secs()
                    ),
                )
            })?
            .map_err(io::Error::other)?;
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || files.sync(&before))
            .await
            .map_err(io::Error::other)?
    }

    /// [`Database::flush`], on a thread that may block.
    pub(crate) fn flush_blocking(&self) -> io::Result<()> {
        let before = self.files.blobs_now()?;
        self.db.flush().map_err(io::Error::other)?;
        self.files.sync(&before)
    }
}

impl SyncedFiles {
    /// The blob files there are now. sled names a blob file after its write's place in the
    /// log, which it claims before it creates the file, so a flush begun after this listing
    /// returns only once every file in it is written whole.
    fn blobs_now(&self) -> io::Result<BTreeSet<OsString>> {
        match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries.map(|e| e.map(|e| e.file_name())).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(e),
        }
    }

    /// Syncs the database file and every blob file not synced before. Only blob files listed
    /// before the flush (`complete`) are recorded as synced: a file that appeared since may
    /// still be being written, and is synced again by the flush that covers its write.
    fn sync(&self, complete: &BTreeSet<OsString>) -> io::Result<()> {
        self.db_file.sync_data()?;
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut gained = false;
        for name in self.blobs_now()? {
            if synced.contains(&name) {
                continue;
            }
            match File::open(self.blobs.join(&name)) {
                Ok(file) => file.sync_data()?,
                // Collected by sled since it was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            gained = true;
            if complete.contains(&name) {
                synced.insert(name);
            }
        }
        if gained {
            sync_dir(&self.blobs)?;
        }
        // Forget what sled has collected.
        synced.retain(|name| complete.contains(name) || self.blobs.join(name).exists());
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flush_fsyncs_the_blob_files_sled_leaves_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(sled::Config::new().flush_every_ms(None), dir.path()).unwrap();
        // Over a quarter of sled's default 512 KiB segment: written to a blob file.
        db.sled().insert(b"big", vec![7u8; 300 * 1024]).unwrap();
        db.flush().await.unwrap();
        let synced = db.files.synced_blobs.lock().unwrap().clone();
        assert_eq!(
            synced.len(),
            1,
            "the one blob is recorded as synced: {synced:?}"
        );
        let on_disk: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(on_disk, synced.into_iter().collect::<Vec<_>>());
    }
}
