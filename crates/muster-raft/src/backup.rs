//! `muster cluster snapshot save` and `restore`: the whole state machine as one file, and a
//! new cluster founded from it.
//!
//! The file is a one-line JSON header, then the state machine's image exactly as a Raft
//! snapshot holds it (versioned JSON). The header names the format, the cluster it came from,
//! the log index it was taken at, and the image's length and SHA-256, so that a file cut
//! short or altered is refused before anything is written.
//!
//! A restore writes the image as the stored snapshot of a new node's empty data directory,
//! under the new cluster's membership: that node then starts as if it had taken the snapshot
//! itself, wins the first election (the other new nodes hold nothing) and sends the snapshot
//! to them.

use crate::state_machine::{SnapshotImageOf, decode_image, split_image, with_archive};
use crate::{AppliedState, Member, NodeId, StateHandle, TypeConfig};
use muster_store::{SnapshotStore, StoredSnapshot};
use openraft::{CommittedLeaderId, LogId, Membership, SnapshotMeta, StoredMembership};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

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

/// The state as it is now on this node, as a snapshot file. The caller first makes the
/// replica current (a linearizable read), so that it holds every write acknowledged before.
/// Encoded under the state's read lock, on the calling thread (call it from a blocking one).
pub fn save(
    state: &StateHandle,
    cluster_name: &str,
    saved_at_ms: u64,
) -> Result<(BackupHeader, Vec<u8>), BackupError> {
    let (image, index, jobs) = {
        let (applied, _raised) = state.read_at_length();
        let image = serde_json::to_vec(&SnapshotImageOf {
            format_version: muster_core::STATE_FORMAT_VERSION,
            applied: &applied,
        })
        .map_err(|e| BackupError::Encode(e.to_string()))?;
        // Under the same read: the archive holds exactly the ended jobs the image names.
        let image = with_archive(image, state.archive())
            .map_err(|e| BackupError::Encode(format!("archived jobs: {e}")))?;
        let index = applied.last_applied.map_or(0, |l| l.index);
        (
            image,
            index,
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
        image_bytes: image.len() as u64,
        image_sha256: hex(&Sha256::digest(&image)),
    };
    let mut file = serde_json::to_vec(&header).map_err(|e| BackupError::Encode(e.to_string()))?;
    file.push(b'\n');
    file.extend_from_slice(&image);
    Ok((header, file))
}

/// A snapshot file read and checked.
pub struct Backup<'a> {
    pub header: BackupHeader,
    pub applied: AppliedState,
    /// The ended jobs' records that follow the image.
    pub archived: &'a [u8],
}

/// Checks a snapshot file whole (header, length, checksum, and that its state decodes) and
/// returns its header, state and archived jobs.
pub fn read(file: &[u8]) -> Result<Backup<'_>, BackupError> {
    let newline = file
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| BackupError::NotASnapshot("no header line".into()))?;
    let header: BackupHeader = serde_json::from_slice(&file[..newline])
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
    let image = &file[newline + 1..];
    if image.len() as u64 != header.image_bytes {
        return Err(BackupError::Damaged(format!(
            "{} bytes of state where the header says {} (cut short?)",
            image.len(),
            header.image_bytes
        )));
    }
    let digest = hex(&Sha256::digest(image));
    if digest != header.image_sha256 {
        return Err(BackupError::Damaged(format!(
            "SHA-256 {digest}, where the header says {}",
            header.image_sha256
        )));
    }
    let (image, archived) = split_image(image);
    let applied = decode_image(image).map_err(|e| BackupError::Damaged(e.to_string()))?;
    Ok(Backup {
        header,
        applied,
        archived,
    })
}

/// Stores `applied` as the snapshot of a new cluster whose voters are `members`, in the
/// snapshot store of a node's empty data directory.
pub async fn restore<S: SnapshotStore<TypeConfig>>(
    snapshots: &S,
    mut applied: AppliedState,
    archived: &[u8],
    index: u64,
    members: BTreeMap<NodeId, Member>,
) -> Result<(), BackupError> {
    let voters: BTreeSet<NodeId> = members.keys().copied().collect();
    // Term 0: every term the new cluster elects comes after it.
    let log_id = LogId::new(CommittedLeaderId::new(0, 0), index);
    let membership = StoredMembership::new(Some(log_id), Membership::new(vec![voters], members));
    applied.last_applied = Some(log_id);
    applied.membership = membership.clone();
    let mut data = serde_json::to_vec(&SnapshotImageOf {
        format_version: muster_core::STATE_FORMAT_VERSION,
        applied: &applied,
    })
    .map_err(|e| BackupError::Encode(e.to_string()))?;
    // The node that opens it moves the records into its archive.
    data.extend_from_slice(archived);
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
