//! Replaying a stopped control node's committed log through a fresh state (or the state of its
//! snapshot, where the log before it was dropped), checking after
//! every entry what no `apply` may break (`State::resource_violations`: no node over-committed,
//! every node's books matching its jobs). The chaos harness runs it on every node's data
//! directory after a run (`muster debug replay-log`), and the deterministic simulation on each
//! simulated node's in-memory log.

use muster_core::State;
use muster_raft::{AppliedState, TypeConfig};
use muster_store::{SledLogStore, SledSnapshotStore, open_sled};
use openraft::EntryPayload;
use openraft::storage::RaftLogStorage;
use serde::Serialize;
use std::path::Path;

/// What a replay found.
#[derive(Debug, Serialize)]
pub struct Replay {
    /// The index of the snapshot the replay started from, where the log before it was
    /// dropped (its state is checked too); none where the whole log is there.
    pub from_snapshot: Option<u64>,
    /// The last index this node knew to be committed (what is replayed).
    pub committed: u64,
    /// Its last log index (entries past `committed` may yet be replaced, and are not replayed).
    pub last_log_index: u64,
    pub commands: u64,
    /// Each violation with the index of the entry after which it was first seen.
    pub violations: Vec<(u64, String)>,
    pub jobs: usize,
}

/// Replays the log under `data_dir/raft`, from its stored snapshot where the log before that
/// was dropped. The node must be stopped (sled locks its files).
pub async fn replay_log(data_dir: &Path) -> Result<Replay, String> {
    let raft_dir = data_dir.join("raft");
    let db = open_sled(&raft_dir).map_err(|e| format!("{}: {e}", raft_dir.display()))?;
    let mut log: SledLogStore<TypeConfig> = SledLogStore::new(&db).map_err(|e| e.to_string())?;
    let snapshots = SledSnapshotStore::new(&db).map_err(|e| e.to_string())?;
    let snapshot = muster_raft::stored_state(&snapshots).map_err(|e| e.to_string())?;
    replay_store(&mut log, snapshot, |_, _| {}).await
}

/// Replays the committed entries of any log store (the deterministic simulation's in-memory
/// one too), from `snapshot`'s state if the log was purged, calling `after_each` with each
/// entry's index and the state it left.
pub async fn replay_store<L: RaftLogStorage<TypeConfig>>(
    log: &mut L,
    snapshot: Option<AppliedState>,
    mut after_each: impl FnMut(u64, &State),
) -> Result<Replay, String> {
    let state_of_log = log.get_log_state().await.map_err(|e| e.to_string())?;
    let purged = state_of_log.last_purged_log_id.map(|p| p.index);
    // From the snapshot only where it must: a whole log checks every index.
    let (mut state, from_snapshot) = match (purged, snapshot) {
        (None, _) => (State::default(), None),
        (Some(purged), Some(snapshot)) => {
            let at = snapshot.last_applied.map_or(0, |l| l.index);
            if purged > at {
                return Err(format!(
                    "the log was purged up to {purged}, past the snapshot at {at}"
                ));
            }
            (snapshot.state, Some(at))
        }
        (Some(purged), None) => {
            return Err(format!(
                "the log was purged up to {purged} and no snapshot is stored"
            ));
        }
    };
    let committed = log
        .read_committed()
        .await
        .map_err(|e| e.to_string())?
        .map_or(0, |c| c.index);
    let last_log_index = state_of_log.last_log_id.map_or(0, |l| l.index);
    let archive = muster_raft::EndedJobs::in_memory();
    state.attach_archive(std::sync::Arc::new(archive.clone()));
    let mut replay = Replay {
        from_snapshot,
        committed,
        last_log_index,
        commands: 0,
        violations: Vec::new(),
        jobs: 0,
    };
    let mut seen = std::collections::BTreeSet::new();
    if let Some(at) = from_snapshot {
        for violation in state.resource_violations() {
            if replay.violations.len() < 100 && seen.insert(violation.clone()) {
                replay.violations.push((at, violation));
            }
        }
    }
    let mut next = from_snapshot.map_or(0, |at| at + 1);
    while next <= committed {
        let upto = (next + 256).min(committed + 1);
        let entries = log
            .try_get_log_entries(next..upto)
            .await
            .map_err(|e| e.to_string())?;
        if entries.is_empty() {
            break;
        }
        for entry in entries {
            // A gap the log does not record as purged is a damaged log, not an empty stretch.
            if entry.log_id.index != next {
                return Err(format!(
                    "the log holds no entry {next} (its next is {}) and was not purged there",
                    entry.log_id.index
                ));
            }
            next = entry.log_id.index + 1;
            if let EntryPayload::Normal(command) = entry.payload {
                state.apply(std::sync::Arc::unwrap_or_clone(command.0));
                archive.write(state.take_archive_changes(), &state);
                replay.commands += 1;
                for violation in state.resource_violations() {
                    if replay.violations.len() < 100 && seen.insert(violation.clone()) {
                        replay.violations.push((entry.log_id.index, violation));
                    }
                }
                after_each(entry.log_id.index, &state);
            }
        }
    }
    replay.jobs = state.job_count() + state.ended_job_count();
    Ok(replay)
}
