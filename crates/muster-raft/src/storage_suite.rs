//! openraft's storage conformance suite, run on the sled store and on its in-memory twin,
//! each with Muster's real state machine.

use crate::{NodeId, StateMachine, TypeConfig};
use muster_store::{
    ArchiveStore, MemLogStore, MemSnapshotStore, SledLogStore, SledSnapshotStore, open_sled,
};
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl
    StoreBuilder<
        TypeConfig,
        SledLogStore<TypeConfig>,
        StateMachine<SledSnapshotStore>,
        tempfile::TempDir,
    > for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            tempfile::TempDir,
            SledLogStore<TypeConfig>,
            StateMachine<SledSnapshotStore>,
        ),
        StorageError<NodeId>,
    > {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open_sled(dir.path()).expect("open sled");
        let log = SledLogStore::new(&db).expect("log trees");
        let archive = crate::EndedJobs::new(ArchiveStore::on_disk(&db).expect("archive trees"));
        let sm = StateMachine::open(
            SledSnapshotStore::new(&db).expect("snapshot tree"),
            archive,
            crate::SnapshotSpool::temporary(),
        )?;
        Ok((dir, log, sm))
    }
}

struct MemBuilder;

impl StoreBuilder<TypeConfig, MemLogStore<TypeConfig>, StateMachine<MemSnapshotStore<TypeConfig>>>
    for MemBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            (),
            MemLogStore<TypeConfig>,
            StateMachine<MemSnapshotStore<TypeConfig>>,
        ),
        StorageError<NodeId>,
    > {
        Ok((
            (),
            MemLogStore::default(),
            StateMachine::open(
                MemSnapshotStore::default(),
                crate::EndedJobs::in_memory(),
                crate::SnapshotSpool::temporary(),
            )?,
        ))
    }
}

#[test]
fn sled_store_passes_openraft_suite() {
    Suite::test_all(SledBuilder).expect("sled store conforms");
}

#[test]
fn memory_store_passes_openraft_suite() {
    Suite::test_all(MemBuilder).expect("memory store conforms");
}

#[tokio::test]
async fn sled_log_survives_reopen() {
    use openraft::storage::RaftLogStorage;
    use openraft::{CommittedLeaderId, LogId, Vote};
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open_sled(dir.path()).unwrap();
        let mut log = SledLogStore::<TypeConfig>::new(&db).unwrap();
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        log.purge(LogId::new(CommittedLeaderId::new(3, 1), 5))
            .await
            .unwrap();
    }
    let db = muster_store::open_sled_waiting(dir.path()).await.unwrap();
    let mut log = SledLogStore::<TypeConfig>::new(&db).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(5));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
}
