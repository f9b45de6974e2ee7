//! `muster cluster snapshot restore`: a new cluster founded from a snapshot file, written into
//! the founding node's empty data directory before it first starts.

use crate::ServerConfig;
use muster_raft::backup::{self, BackupHeader};
use muster_store::{SledSnapshotStore, open_sled_waiting};

/// Checks `file` whole, then stores its state as the first snapshot of the cluster `config`
/// names (its peers are the new cluster's voters). Refuses a data directory that holds a
/// node's data already. Jobs, queues, definitions, users and keys are the file's; the Raft
/// log, terms and membership start anew.
pub async fn restore_snapshot(
    config: &ServerConfig,
    file: &std::path::Path,
) -> Result<BackupHeader, String> {
    // Only the founder holds the state; the others start empty and receive it. Restored on
    // another node, the founder would found an empty cluster beside it.
    if config.join_existing_cluster || config.peers.keys().min() != Some(&config.node_id) {
        return Err(format!(
            "node {} does not found its cluster (the lowest id of its peers does): restore on that node",
            config.node_id
        ));
    }
    let backup::Backup {
        header,
        applied,
        archived,
    } = {
        // Read twice over, a chunk at a time: tens of GiB with ten million ended jobs.
        let file = file.to_owned();
        tokio::task::spawn_blocking(move || backup::read(&file))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    // ARNs in the file name its region and account; the new cluster must name the same.
    let scope = applied.state.arn_scope();
    if *scope != config.scope {
        return Err(format!(
            "region and account_id: the snapshot's cluster names region {} and account {}; set \
             them so in the config (they were {} and {})",
            scope.region, scope.account, config.scope.region, config.scope.account
        ));
    }
    let raft_dir = config.data_dir.join("raft");
    if raft_dir.exists()
        && std::fs::read_dir(&raft_dir)
            .map_err(|e| format!("{}: {e}", raft_dir.display()))?
            .next()
            .is_some()
    {
        return Err(format!(
            "{} holds a node's data already: a restore founds a new cluster, into an empty data directory",
            raft_dir.display()
        ));
    }
    // Written aside and renamed into place once whole: a restore cut short (the archive's
    // import takes minutes with millions of jobs) leaves no `raft` directory, so a node
    // started on it founds nothing, and the restore can be run again.
    let staged = config.data_dir.join("raft.restoring");
    if staged.exists() {
        std::fs::remove_dir_all(&staged).map_err(|e| format!("{}: {e}", staged.display()))?;
    }
    std::fs::create_dir_all(&staged).map_err(|e| format!("{}: {e}", staged.display()))?;
    let db = open_sled_waiting(&staged)
        .await
        .map_err(|e| format!("{}: {e}", staged.display()))?;
    let snapshots = SledSnapshotStore::new(&db).map_err(|e| e.to_string())?;
    let members = config
        .peers
        .iter()
        .map(|(id, addrs)| (*id, muster_raft::Member::from(addrs)))
        .collect();
    let archive_dir = config.data_dir.join("archive");
    let archive = muster_raft::EndedJobs::new(
        muster_store::ArchiveStore::open(&archive_dir)
            .await
            .map_err(|e| format!("{}: {e}", archive_dir.display()))?,
    );
    backup::restore(
        &snapshots,
        &archive,
        applied,
        archived,
        header.index,
        members,
    )
    .await
    .map_err(|e| e.to_string())?;
    db.flush().await.map_err(|e| e.to_string())?;
    drop((db, snapshots, archive));
    if raft_dir.exists() {
        // Empty (checked above): made by an earlier start of the node.
        std::fs::remove_dir(&raft_dir).map_err(|e| format!("{}: {e}", raft_dir.display()))?;
    }
    std::fs::rename(&staged, &raft_dir).map_err(|e| format!("{}: {e}", raft_dir.display()))?;
    // The rename itself, durable before the node is started on it.
    std::fs::File::open(&config.data_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;
    Ok(header)
}
