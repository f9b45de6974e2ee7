//! `muster cluster snapshot restore`: a new cluster founded from a snapshot file, written into
//! the founding node's empty data directory before it first starts.

use crate::ServerConfig;
use muster_raft::backup::{self, BackupHeader};
use muster_store::{SledSnapshotStore, open_sled_waiting};

/// Checks `file` whole, then stores its state as the first snapshot of the cluster `config`
/// names (its peers are the new cluster's voters). Refuses a data directory that holds a
/// node's data already. Jobs, queues, definitions, users and keys are the file's; the Raft
/// log, terms and membership start anew.
pub async fn restore_snapshot(config: &ServerConfig, file: &[u8]) -> Result<BackupHeader, String> {
    let (header, applied) = backup::read(file).map_err(|e| e.to_string())?;
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
    std::fs::create_dir_all(&raft_dir).map_err(|e| format!("{}: {e}", raft_dir.display()))?;
    let db = open_sled_waiting(&raft_dir)
        .await
        .map_err(|e| format!("{}: {e}", raft_dir.display()))?;
    let snapshots = SledSnapshotStore::new(&db).map_err(|e| e.to_string())?;
    let members = config
        .peers
        .iter()
        .map(|(id, addrs)| (*id, muster_raft::Member::from(addrs)))
        .collect();
    backup::restore(&snapshots, applied, header.index, members)
        .await
        .map_err(|e| e.to_string())?;
    db.flush_async().await.map_err(|e| e.to_string())?;
    Ok(header)
}
