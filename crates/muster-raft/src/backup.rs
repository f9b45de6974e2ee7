//! `muster cluster snapshot save` and `restore`: the whole state machine as one file, and a
//! new cluster founded from it.
//!
//! The file is a one-line JSON header, then the state machine's image exactly as a Raft
//! snapshot holds it (versioned JSON). The header names the format, the cluster it came from,
//! the log index it was taken at, and the image's length and SHA-256, so that a file cut
//! short or altered is refused before anything is written.
//!
//! Neither end holds the file in memory: two million ended jobs made 1.5 GiB of it, ten
//! million would make some 8 GiB. It is
//! written into a spool file on the node, sent from there, written to disk by the client, and
//! checked and restored a chunk (or a record) at a time.
//!
//! A restore writes the image as the stored snapshot of a new node's empty data directory,
//! and the records into its archive, under the new cluster's membership: that node then starts as if it had taken the snapshot
//! itself, wins the first election (the other new nodes hold nothing) and sends the snapshot
//! to them.

use crate::state_machine::{SnapshotImageOf, decode_image};
use crate::{AppliedState, EndedJobs, Member, NodeId, SnapshotSpool, StateHandle, TypeConfig};
use muster_store::{SnapshotStore, StoredSnapshot};
use openraft::{CommittedLeaderId, LogId, Membership, SnapshotMeta, StoredMembership};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

const MAGIC: &str = "muster-snapshot";
/// The layout of the file (header and image); the image carries its own state format.
const FILE_FORMAT: u32 = 1;

/// The first line of a snapshot file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupHeader {
    pub magic: String,
    pub file_format: u32,
    pub state_format: u32,
    /// The Raft cluster it was taken from.
    pub cluster_name: String,
    /// The log index the state was at.
    pub index: u64,
    pub saved_at_ms: u64,
    pub jobs: usize,
    pub image_bytes: u64,
    pub image_sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a Muster snapshot file: {0}")]
    NotASnapshot(String),
    #[error("the snapshot file is damaged: {0}")]
    Damaged(String),
    #[error("cannot encode the state: {0}")]
    Encode(String),
    #[error("cannot store the snapshot: {0}")]
    Store(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A writer that counts and hashes what goes through it.
struct Hashing<W> {
    inner: W,
    sha: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A snapshot file as saved: its header, and what follows the header (the image and the
/// archived records) in a spool file, read from its start.
pub struct SavedFile {
    pub header: BackupHeader,
    /// The header as the file's first line, `\n` included.
    pub header_line: Vec<u8>,
    pub body: File,
}

/// The state as it is now on this node, as a snapshot file. The caller first makes the
/// replica current (a linearizable read), so that it holds every write acknowledged before.
/// Written under the state's read lock into a file of `spool` (two million ended jobs are
/// 1.5 GiB of it), on the calling thread (call it from a blocking one).
pub fn save(
    state: &StateHandle,
    cluster_name: &str,
    saved_at_ms: u64,
    spool: &SnapshotSpool,
) -> Result<SavedFile, BackupError> {
    let encode = |e: io::Error| BackupError::Encode(e.to_string());
    let mut body = Hashing {
        inner: BufWriter::with_capacity(1 << 20, spool.create().map_err(encode)?),
        sha: Sha256::new(),
        bytes: 0,
    };
    let (index, jobs) = {
        let (applied, _raised) = state.read_at_length();
        serde_json::to_writer(
            &mut body,
            &SnapshotImageOf {
                format_version: muster_core::STATE_FORMAT_VERSION,
                applied: &applied,
            },
        )
        .map_err(|e| BackupError::Encode(e.to_string()))?;
        // Under the same read: the archive holds exactly the ended jobs the image names.
        state
            .archive()
            .append_to(&mut body)
            .map_err(|e| BackupError::Encode(format!("archived jobs: {e}")))?;
        (
            applied.last_applied.map_or(0, |l| l.index),
            applied.state.job_count() + applied.state.ended_job_count(),
        )
    };
    let header = BackupHeader {
        magic: MAGIC.to_owned(),
        file_format: FILE_FORMAT,
        state_format: muster_core::STATE_FORMAT_VERSION,
        cluster_name: cluster_name.to_owned(),
        index,
        saved_at_ms,
        jobs,
        image_bytes: body.bytes,
        image_sha256: hex(&body.sha.finalize()),
    };
    let mut file = body
        .inner
        .into_inner()
        .map_err(|e| encode(e.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(encode)?;
    let mut header_line =
        serde_json::to_vec(&header).map_err(|e| BackupError::Encode(e.to_string()))?;
    header_line.push(b'\n');
    Ok(SavedFile {
        header,
        header_line,
        body: file,
    })
}

/// A snapshot file read and checked.
pub struct Backup {
    pub header: BackupHeader,
    pub applied: AppliedState,
    /// The ended jobs' records that follow the image, to be read one at a time.
    pub archived: BufReader<File>,
}

/// Checks a snapshot file whole (header, length, checksum, and that its state decodes) and
/// returns its header, state and archived jobs. The file is read twice, a chunk at a time:
/// once for its checksum, then for its state.
pub fn read(path: &Path) -> Result<Backup, BackupError> {
    let damaged = |e: io::Error| BackupError::Damaged(e.to_string());
    let file = File::open(path)
        .map_err(|e| BackupError::NotASnapshot(format!("{}: {e}", path.display())))?;
    let mut file = BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::new();
    file.by_ref()
        .take(64 * 1024)
        .read_until(b'\n', &mut line)
        .map_err(|e| BackupError::NotASnapshot(e.to_string()))?;
    if line.last() != Some(&b'\n') {
        return Err(BackupError::NotASnapshot("no header line".into()));
    }
    let header_len = line.len() as u64;
    let header: BackupHeader = serde_json::from_slice(&line[..line.len() - 1])
        .map_err(|e| BackupError::NotASnapshot(format!("header: {e}")))?;
    if header.magic != MAGIC {
        return Err(BackupError::NotASnapshot(format!(
            "magic {:?}",
            header.magic
        )));
    }
    if header.file_format != FILE_FORMAT {
        return Err(BackupError::NotASnapshot(format!(
            "file format {} (this Muster reads {FILE_FORMAT})",
            header.file_format
        )));
    }
    let mut hashed = Hashing {
        inner: io::sink(),
        sha: Sha256::new(),
        bytes: 0,
    };
    io::copy(&mut file, &mut hashed).map_err(damaged)?;
    if hashed.bytes != header.image_bytes {
        return Err(BackupError::Damaged(format!(
            "{} bytes of state where the header says {} (cut short?)",
            hashed.bytes, header.image_bytes
        )));
    }
    let digest = hex(&hashed.sha.finalize());
    if digest != header.image_sha256 {
        return Err(BackupError::Damaged(format!(
            "SHA-256 {digest}, where the header says {}",
            header.image_sha256
        )));
    }
    file.seek(SeekFrom::Start(header_len)).map_err(damaged)?;
    let mut image = Vec::new();
    file.read_until(b'\n', &mut image).map_err(damaged)?;
    if image.last() == Some(&b'\n') {
        image.pop();
    }
    let applied = decode_image(&image).map_err(|e| BackupError::Damaged(e.to_string()))?;
    Ok(Backup {
        header,
        applied,
        archived: file,
    })
}

/// Stores `applied` as the snapshot of a new cluster whose voters are `members`, in the
/// snapshot store of a node's empty data directory, and the `archived` records that follow
/// it in the file into that node's `archive` (first emptied), a record at a time.
pub async fn restore<S: SnapshotStore<TypeConfig>>(
    snapshots: &S,
    archive: &EndedJobs,
    mut applied: AppliedState,
    archived: impl io::BufRead + Send + 'static,
    index: u64,
    members: BTreeMap<NodeId, Member>,
) -> Result<(), BackupError> {
    let voters: BTreeSet<NodeId> = members.keys().copied().collect();
    // Term 0: every term the new cluster elects comes after it.
    let log_id = LogId::new(CommittedLeaderId::new(0, 0), index);
    let membership = StoredMembership::new(Some(log_id), Membership::new(vec![voters], members));
    applied.last_applied = Some(log_id);
    applied.membership = membership.clone();
    // The archive first: a snapshot stored names jobs whose records must be there.
    let (archive, applied) = (archive.clone(), applied);
    let (data, _applied) = tokio::task::spawn_blocking(move || {
        archive
            .import(archived, &applied.state)
            .map_err(|e| BackupError::Store(format!("archived jobs: {e}")))?;
        let data = serde_json::to_vec(&SnapshotImageOf {
            format_version: muster_core::STATE_FORMAT_VERSION,
            applied: &applied,
        })
        .map_err(|e| BackupError::Encode(e.to_string()))?;
        Ok::<_, BackupError>((data, applied))
    })
    .await
    .map_err(|e| BackupError::Store(e.to_string()))??;
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: membership,
        snapshot_id: format!("restored-{index}"),
    };
    snapshots
        .save(&StoredSnapshot { meta, data })
        .await
        .map_err(|e| BackupError::Store(e.to_string()))
}
