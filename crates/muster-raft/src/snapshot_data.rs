//! [`SnapshotData`]: a snapshot's bytes as openraft moves them, and the [`SnapshotSpool`]
//! where the large ones wait on disk.
//!
//! A snapshot built here holds only the state's image, which is in memory already. One sent
//! to another node also carries every archived record (see
//! [`EndedJobs::append_to`](crate::EndedJobs::append_to)): 1.5 GiB with two million ended
//! jobs, some 8 GiB with ten million, which neither the sender nor the receiver should hold
//! in memory. Those are written
//! to, and received into, a file of the spool, which openraft reads and writes in chunks
//! (`Chunked` transport: 3 MiB per InstallSnapshot).

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// A snapshot's bytes: in memory, or in a spool file.
#[derive(Debug)]
pub enum SnapshotData {
    Memory(io::Cursor<Vec<u8>>),
    Spooled(tokio::fs::File),
}

impl SnapshotData {
    pub fn memory(bytes: Vec<u8>) -> Self {
        Self::Memory(io::Cursor::new(bytes))
    }

    /// A spool file to be read from its start.
    pub fn spooled(mut file: std::fs::File) -> io::Result<Self> {
        io::Seek::seek(&mut file, SeekFrom::Start(0))?;
        Ok(Self::Spooled(tokio::fs::File::from_std(file)))
    }

    /// The bytes as a blocking reader from their start (call it where blocking is allowed).
    pub async fn into_reader(self) -> io::Result<SnapshotReader> {
        match self {
            Self::Memory(cursor) => {
                Ok(SnapshotReader::Memory(io::Cursor::new(cursor.into_inner())))
            }
            Self::Spooled(file) => {
                let mut file = file.into_std().await;
                io::Seek::seek(&mut file, SeekFrom::Start(0))?;
                Ok(SnapshotReader::Spooled(io::BufReader::with_capacity(
                    1 << 20,
                    file,
                )))
            }
        }
    }
}

/// [`SnapshotData`] read from its start, without an async runtime.
pub enum SnapshotReader {
    Memory(io::Cursor<Vec<u8>>),
    Spooled(io::BufReader<std::fs::File>),
}

impl io::Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Memory(c) => c.read(buf),
            Self::Spooled(f) => f.read(buf),
        }
    }
}

impl io::BufRead for SnapshotReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match self {
            Self::Memory(c) => c.fill_buf(),
            Self::Spooled(f) => f.fill_buf(),
        }
    }

    fn consume(&mut self, amount: usize) {
        match self {
            Self::Memory(c) => c.consume(amount),
            Self::Spooled(f) => f.consume(amount),
        }
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Memory(c) => Pin::new(c).poll_read(cx, buf),
            Self::Spooled(f) => Pin::new(f).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Memory(c) => Pin::new(c).poll_write(cx, buf),
            Self::Spooled(f) => Pin::new(f).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Memory(c) => Pin::new(c).poll_flush(cx),
            Self::Spooled(f) => Pin::new(f).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Memory(c) => Pin::new(c).poll_shutdown(cx),
            Self::Spooled(f) => Pin::new(f).poll_shutdown(cx),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        match self.get_mut() {
            Self::Memory(c) => Pin::new(c).start_seek(position),
            Self::Spooled(f) => Pin::new(f).start_seek(position),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match self.get_mut() {
            Self::Memory(c) => Pin::new(c).poll_complete(cx),
            Self::Spooled(f) => Pin::new(f).poll_complete(cx),
        }
    }
}

/// Where snapshots on their way to or from another node are written: a directory on the
/// node's own disk (the system's temporary directory may be memory). Each file has no name
/// (or loses it at once), so that it is gone when closed, also after a crash.
#[derive(Clone, Debug)]
pub struct SnapshotSpool {
    dir: PathBuf,
}

impl SnapshotSpool {
    /// Files in `dir`, which is created if missing.
    pub fn in_dir(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Files in the system's temporary directory: for tests and simulations.
    pub fn temporary() -> Self {
        Self {
            dir: std::env::temp_dir(),
        }
    }

    /// A new empty file, read and written.
    pub fn create(&self) -> io::Result<std::fs::File> {
        tempfile::tempfile_in(&self.dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("snapshot spool {}: {e}", self.dir.display()),
            )
        })
    }
}
