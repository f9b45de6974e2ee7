//! Attempt output on the agent's disk, and the `AgentLogs` service control nodes read it from.
//!
//! Each attempt's stdout and stderr go to `work_dir/logs/<job>/<attempt>.log`, one line per
//! output line: `<unix milliseconds> <text>`. The file outlives the job and the agent process
//! (files older than the configured retention are removed), so `GetLogEvents` answers after
//! the container is gone and after the agent restarted.

use crate::AgentConfig;
use muster_proto::pb::agent_logs_server::AgentLogs;
use muster_proto::pb::{LogEvent, LogPage, ReadLogRequest};
use std::io::{BufRead, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Most events one page carries (CloudWatch's `GetLogEvents` maximum).
pub const PAGE_MAX: usize = 10_000;

/// About the most text one page carries (CloudWatch's 1 MB).
pub const PAGE_MAX_BYTES: usize = 1024 * 1024;

/// Most bytes one attempt's log keeps: output past it is dropped, with one line saying so,
/// so that a job printing without end cannot fill the agent's disk.
pub const ATTEMPT_LOG_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// An attempt's log file, open for appending, bounded to a size.
pub struct AttemptLog {
    file: std::fs::File,
    size: u64,
    max: u64,
    cut: bool,
}

impl AttemptLog {
    /// Opens (creating it and its directory) the log at `path`, bounded to `max` bytes.
    pub fn open(path: &Path, max: u64) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            size,
            max,
            cut: size >= max,
        })
    }

    /// Appends one stamped line, unless the log is full.
    pub fn write_line(&mut self, at: u64, text: &[u8]) -> std::io::Result<()> {
        if self.cut {
            return Ok(());
        }
        let mut line = Vec::with_capacity(text.len() + 24);
        write_line(&mut line, at, text)?;
        if self.size + line.len() as u64 > self.max {
            self.cut = true;
            let note = format!("[muster: output past {} bytes was dropped]", self.max);
            return write_line(&mut self.file, at, note.as_bytes());
        }
        self.size += line.len() as u64;
        self.file.write_all(&line)
    }
}

/// Where the output of attempt `attempt` of `job` is kept under `work_dir`.
pub fn attempt_log_path(work_dir: &Path, job: &str, attempt: u32) -> PathBuf {
    // Array children are `<parent>:<index>`; keep the name one path component.
    work_dir
        .join("logs")
        .join(job.replace(['/', ':'], "_"))
        .join(format!("{attempt}.log"))
}

pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Appends one output line (without its newline) stamped `at`.
pub fn write_line(out: &mut impl Write, at: u64, text: &[u8]) -> std::io::Result<()> {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    write!(out, "{at} ")?;
    out.write_all(text)?;
    out.write_all(b"\n")
}

/// Splits a line Docker wrote with `timestamps: true` (`2026-11-26T05:00:00.123456789Z text`)
/// into milliseconds and text; lines without a readable stamp get `fallback`.
pub fn split_docker_line(line: &[u8], fallback: u64) -> (u64, &[u8]) {
    let Some(space) = line.iter().position(|b| *b == b' ') else {
        return (fallback, line);
    };
    match std::str::from_utf8(&line[..space])
        .ok()
        .and_then(rfc3339_millis)
    {
        Some(ms) => (ms, &line[space + 1..]),
        None => (fallback, line),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` as Unix milliseconds.
fn rfc3339_millis(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let millis: i64 = format!("{fraction:0<3}")[..3].parse().ok()?;
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1000 + millis).ok()
}

/// Which events of a log a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The first events from this byte offset on (a previous page's `next_offset`).
    From(u64),
    /// The last events of the log.
    Last,
    /// The last events that end at or before this byte offset (a page's `start_offset`):
    /// the page before it.
    Before(u64),
}

impl Window {
    pub fn of(request: &ReadLogRequest) -> Self {
        match (request.from_end, request.before) {
            (true, Some(before)) => Window::Before(before),
            (true, None) => Window::Last,
            (false, _) => Window::From(request.offset),
        }
    }
}

/// Reads up to `limit` events (and about [`PAGE_MAX_BYTES`] of text) of the log at `path` in
/// `window`. A missing file is an empty log.
pub fn read_page(path: &Path, window: Window, limit: usize) -> std::io::Result<LogPage> {
    let limit = limit.clamp(1, PAGE_MAX);
    let (start, end, from_end) = match window {
        Window::From(offset) => (offset, u64::MAX, false),
        Window::Last => (0, u64::MAX, true),
        Window::Before(before) => (0, before, true),
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let at = if from_end { end.min(start) } else { start };
            return Ok(LogPage {
                events: Vec::new(),
                start_offset: at,
                next_offset: at,
            });
        }
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::new(file);
    reader.seek(SeekFrom::Start(start))?;
    let mut events: std::collections::VecDeque<(u64, LogEvent)> = Default::default();
    let mut bytes = 0usize;
    let mut position = start;
    let mut line = Vec::new();
    loop {
        if position >= end {
            break;
        }
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        // Only whole lines: a line still being written is read by the next page.
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let at = position;
        position += n as u64;
        let text = &line[..n - 1];
        let (ms, message) = match text.iter().position(|b| *b == b' ') {
            Some(i) => (
                std::str::from_utf8(&text[..i])
                    .ok()
                    .and_then(|t| t.parse().ok()),
                &text[i + 1..],
            ),
            None => (None, text),
        };
        bytes += message.len();
        events.push_back((
            at,
            LogEvent {
                timestamp_ms: ms.unwrap_or(0),
                message: String::from_utf8_lossy(message).into_owned(),
            },
        ));
        let over = |events: &std::collections::VecDeque<(u64, LogEvent)>, bytes: usize| {
            events.len() > 1 && (events.len() > limit || bytes > PAGE_MAX_BYTES)
        };
        if from_end {
            while over(&events, bytes) {
                if let Some((_, first)) = events.pop_front() {
                    bytes -= first.message.len();
                }
            }
        } else if over(&events, bytes) {
            events.pop_back();
            position = at;
            break;
        }
    }
    let start_offset = events.front().map_or(position, |(at, _)| *at);
    Ok(LogPage {
        events: events.into_iter().map(|(_, e)| e).collect(),
        start_offset,
        next_offset: position,
    })
}

/// Removes attempt logs not written to for `retention`.
pub fn remove_expired(work_dir: &Path, retention: Duration) {
    let Ok(jobs) = std::fs::read_dir(work_dir.join("logs")) else {
        return;
    };
    for job in jobs.flatten() {
        let Ok(files) = std::fs::read_dir(job.path()) else {
            continue;
        };
        for file in files.flatten() {
            let old = file
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > retention);
            if old {
                let _ = std::fs::remove_file(file.path());
            }
        }
        let _ = std::fs::remove_dir(job.path()); // only succeeds once empty
    }
}

/// The `AgentLogs` service over this agent's work directory.
pub struct LogService {
    pub work_dir: PathBuf,
    /// Only control nodes' certificates may read (TLS on).
    pub control_nodes_only: bool,
}

#[tonic::async_trait]
impl AgentLogs for LogService {
    async fn read_log(
        &self,
        request: Request<ReadLogRequest>,
    ) -> Result<Response<LogPage>, Status> {
        if self.control_nodes_only {
            match muster_tls::peer_role(&request)? {
                muster_tls::Role::Control(_) => {}
                other => {
                    tracing::warn!(peer = ?request.remote_addr(), "{other} may not read logs");
                    return Err(Status::permission_denied(format!(
                        "{other} may not read logs: only control nodes may"
                    )));
                }
            }
        }
        let req = request.into_inner();
        let path = attempt_log_path(&self.work_dir, &req.job_id, req.attempt);
        let page = tokio::task::spawn_blocking(move || {
            read_page(&path, Window::of(&req), req.limit as usize)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("cannot read the attempt's log: {e}")))?;
        Ok(Response::new(page))
    }
}

/// Serves `AgentLogs` until shutdown, and removes logs past their retention once an hour.
/// `tls` is the log service's TLS (required whenever `config.tls` is set).
pub(crate) async fn serve_logs(
    config: AgentConfig,
    listener: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<muster_tls::ServerTlsConfig>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let work_dir = config.work_dir.clone();
    let retention = config.log_retention;
    let sweeper = tokio::spawn(async move {
        loop {
            let dir = work_dir.clone();
            let _ =
                tokio::task::spawn_blocking(move || crate::logs::remove_expired(&dir, retention))
                    .await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
    let service =
        muster_proto::pb::agent_logs_server::AgentLogsServer::new(crate::logs::LogService {
            work_dir: config.work_dir.clone(),
            control_nodes_only: config.tls.is_some(),
        });
    let stop = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    let server = tonic::transport::Server::builder().add_service(service);
    // Attempt output may hold what a job printed of its secrets: only control nodes read it.
    let served = match tls {
        Some(tls) => {
            let incoming = muster_tls::transport::tls_incoming(listener, tls, "logs");
            server.serve_with_incoming_shutdown(incoming, stop).await
        }
        None if config.tls.is_some() => {
            tracing::error!("the log service has no TLS configuration: not serving");
            Ok(())
        }
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            server.serve_with_incoming_shutdown(incoming, stop).await
        }
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "log service failed");
    }
    sweeper.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_stops_growing_at_its_bound_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attempt").join("1.log");
        let mut log = AttemptLog::open(&path, 40).unwrap();
        for i in 0..10 {
            log.write_line(1000 + i, b"0123456789").unwrap();
        }
        let page = read_page(&path, Window::From(0), 100).unwrap();
        let texts: Vec<&str> = page.events.iter().map(|e| e.message.as_str()).collect();
        // Two 16-byte lines fit in 40 bytes; the third would not.
        assert_eq!(
            texts,
            [
                "0123456789",
                "0123456789",
                "[muster: output past 40 bytes was dropped]"
            ]
        );
        // Reopened (an agent restart), a full log stays full.
        let mut again = AttemptLog::open(&path, 40).unwrap();
        again.write_line(2000, b"more").unwrap();
        assert_eq!(
            read_page(&path, Window::From(0), 100).unwrap().events.len(),
            3
        );
    }

    #[test]
    fn a_page_holds_about_a_megabyte_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.log");
        let mut f = std::fs::File::create(&path).unwrap();
        let line = format!("{}\n", "x".repeat(100 * 1024));
        for i in 0..30 {
            write_line(&mut f, i, line.as_bytes()).unwrap();
        }
        let forward = read_page(&path, Window::From(0), 10_000).unwrap();
        assert_eq!(forward.events.len(), 10);
        let last = read_page(&path, Window::Last, 10_000).unwrap();
        assert_eq!(last.events.len(), 10);
        assert_eq!(last.events[9].timestamp_ms, 29);
    }

    #[test]
    fn docker_stamps_become_milliseconds() {
        let (ms, text) = split_docker_line(b"2026-11-26T05:00:01.5Z hello world", 7);
        assert_eq!((ms, text), (1_795_669_201_500, &b"hello world"[..]));
        assert_eq!(
            split_docker_line(b"no stamp here", 7),
            (7, &b"no stamp here"[..])
        );
    }

    #[test]
    fn pages_follow_offsets_and_the_tail_is_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut f = std::fs::File::create(&path).unwrap();
        for i in 0..5 {
            write_line(&mut f, 1000 + i, format!("line {i}\n").as_bytes()).unwrap();
        }
        f.write_all(b"1010 half a line").unwrap();
        let first = read_page(&path, Window::From(0), 2).unwrap();
        let texts = |p: &LogPage| {
            p.events
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(texts(&first), vec!["line 0", "line 1"]);
        assert_eq!(first.events[1].timestamp_ms, 1001);
        let rest = read_page(&path, Window::From(first.next_offset), 100).unwrap();
        assert_eq!(texts(&rest), vec!["line 2", "line 3", "line 4"]);
        // At the end, the next page starts where this one did: nothing new yet.
        let end = read_page(&path, Window::From(rest.next_offset), 100).unwrap();
        assert!(end.events.is_empty());
        assert_eq!(end.next_offset, rest.next_offset);
        let tail = read_page(&path, Window::Last, 2).unwrap();
        assert_eq!(texts(&tail), vec!["line 3", "line 4"]);
        // Backward from the tail: the pages before it, then nothing before the first line.
        let before = read_page(&path, Window::Before(tail.start_offset), 2).unwrap();
        assert_eq!(texts(&before), vec!["line 1", "line 2"]);
        let first_again = read_page(&path, Window::Before(before.start_offset), 2).unwrap();
        assert_eq!(texts(&first_again), vec!["line 0"]);
        let nothing = read_page(&path, Window::Before(first_again.start_offset), 2).unwrap();
        assert!(nothing.events.is_empty());
        assert_eq!(nothing.start_offset, 0);
        assert!(
            read_page(&dir.path().join("missing.log"), Window::From(0), 10)
                .unwrap()
                .events
                .is_empty()
        );
    }
}
