//! The replicated state behind openraft's state machine trait.

use crate::archive::EndedJobs;
use crate::snapshot_data::{SnapshotData, SnapshotSpool};
use crate::{Member, NodeId, TypeConfig};
use muster_core::{AffectedNodes, Outcome, State};
use muster_store::{SnapshotStore, StoredSnapshot};
use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::Duration;
// Tokio's clock, which tests can pause.
use tokio::sync::watch;
use tokio::time::Instant;

/// How long an apply waits for the state without queueing for it; see
/// [`StateMachine::write_when_free`].
const WAIT_POLITELY_FOR: Duration = Duration::from_millis(100);

/// The state machine's contents: Muster's state plus what Raft needs to resume.
#[derive(Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub state: State,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, Member>,
}

/// The image inside a snapshot, tagged with the state format version.
#[derive(Deserialize)]
struct SnapshotImage {
    format_version: u32,
    applied: AppliedState,
}

/// [`SnapshotImage`] as it is written: borrowing the applied state rather than a copy of it
/// (copying a million jobs took as long again as writing them).
#[derive(Serialize)]
pub(crate) struct SnapshotImageOf<'a> {
    pub(crate) format_version: u32,
    pub(crate) applied: &'a AppliedState,
}

/// Raised while a snapshot is being written from the state (see
/// [`StateMachine::write_when_free`]); lowered when dropped, also by a panic.
struct ReadingForSnapshot(Arc<AtomicBool>);

impl ReadingForSnapshot {
    fn raise(flag: &Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Release);
        Self(flag.clone())
    }
}

impl Drop for ReadingForSnapshot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A read handle on the applied state, shared by the API, the scheduler and the agent
/// gateway. The lock is held only for in-memory reads and for applying one batch.
#[derive(Clone)]
pub struct StateHandle {
    applied: Arc<RwLock<AppliedState>>,
    /// Raised while a reader encodes the whole state (see [`StateMachine::write_when_free`]).
    reading_for_snapshot: Arc<AtomicBool>,
    /// Last applied log index; wakes the scheduler.
    applied_index: watch::Receiver<u64>,
    node_signals: NodeSignals,
    archive: EndedJobs,
    spool: SnapshotSpool,
}

/// A change counter per worker node, bumped when an applied command may have changed that
/// node's assignments: each agent's assignment stream wakes for its own node only, not for
/// every entry the cluster applies.
#[derive(Clone, Default)]
pub struct NodeSignals(Arc<Mutex<BTreeMap<muster_core::NodeId, watch::Sender<u64>>>>);

impl NodeSignals {
    pub fn subscribe(&self, node: &muster_core::NodeId) -> watch::Receiver<u64> {
        let mut senders = self.0.lock().unwrap_or_else(|p| p.into_inner());
        senders
            .entry(node.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn notify(&self, affected: &AffectedNodes) {
        let mut senders = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let bump = |tx: &watch::Sender<u64>| tx.send_modify(|v| *v = v.wrapping_add(1));
        match affected {
            AffectedNodes::Some(nodes) => {
                for node in nodes {
                    if let Some(tx) = senders.get(node) {
                        bump(tx);
                    }
                }
            }
            AffectedNodes::All => {
                senders.retain(|_, tx| tx.receiver_count() > 0);
                senders.values().for_each(bump);
            }
        }
    }
}

impl StateHandle {
    pub fn read(&self) -> RwLockReadGuard<'_, AppliedState> {
        self.applied.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A read held for long (the whole state encoded into a file): applies meanwhile wait
    /// politely off Raft's threads, as they do for a snapshot, rather than queue for the lock
    /// and shut every other reader out.
    pub(crate) fn read_at_length(&self) -> (RwLockReadGuard<'_, AppliedState>, impl Drop) {
        let raised = ReadingForSnapshot::raise(&self.reading_for_snapshot);
        (self.read(), raised)
    }

    /// The archive of ended jobs behind the state.
    pub fn archive(&self) -> &EndedJobs {
        &self.archive
    }

    /// Where files of the whole state (snapshots, snapshot files) are written on their way.
    pub fn spool(&self) -> &SnapshotSpool {
        &self.spool
    }

    /// A receiver that changes whenever a batch of entries has been applied.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_index.clone()
    }

    /// A receiver that changes whenever `node`'s assignments may have changed.
    pub fn node_changes(&self, node: &muster_core::NodeId) -> watch::Receiver<u64> {
        self.node_signals.subscribe(node)
    }
}

pub struct StateMachine<S> {
    applied: Arc<RwLock<AppliedState>>,
    applied_tx: watch::Sender<u64>,
    applied_rx: watch::Receiver<u64>,
    node_signals: NodeSignals,
    snapshots: S,
    snapshot_seq: u64,
    /// Whether a snapshot is being written from the state right now.
    reading_for_snapshot: Arc<AtomicBool>,
    /// Ended jobs that left the state's memory.
    archive: EndedJobs,
    /// Where snapshots sent to or received from another node are written.
    spool: SnapshotSpool,
    /// Whether openraft has had the snapshot's metadata it reads once at start. Every later
    /// `get_current_snapshot` is for sending the snapshot to another node, which needs the
    /// archive's records with it; the first needs only the metadata, and reading the whole
    /// archive into memory for it would cost as much as the archive is large.
    started: bool,
}

impl<S: SnapshotStore<TypeConfig> + Clone> StateMachine<S> {
    /// Loads the latest stored snapshot, if any; Raft replays the log after it. Ended jobs
    /// are read from `archive`, which a snapshot restored from a file fills first. Snapshots
    /// on their way to or from another node are written in `spool`.
    pub fn open(
        snapshots: S,
        archive: EndedJobs,
        spool: SnapshotSpool,
    ) -> Result<Self, StorageError<NodeId>> {
        let mut applied = match snapshots.load()? {
            Some(stored) => {
                let (image, records) = split_image(&stored.data);
                let applied = decode_image(image)?;
                if !records.is_empty() {
                    archive
                        .import(records, &applied.state)
                        .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
                }
                applied
            }
            None => AppliedState::default(),
        };
        applied.state.attach_archive(Arc::new(archive.clone()));
        let index = applied.last_applied.map_or(0, |l| l.index);
        let (applied_tx, applied_rx) = watch::channel(index);
        Ok(Self {
            applied: Arc::new(RwLock::new(applied)),
            applied_tx,
            applied_rx,
            node_signals: NodeSignals::default(),
            snapshots,
            snapshot_seq: 0,
            reading_for_snapshot: Arc::default(),
            archive,
            spool,
            started: false,
        })
    }

    /// The archive of ended jobs this state machine writes.
    pub fn archive(&self) -> &EndedJobs {
        &self.archive
    }

    pub fn handle(&self) -> StateHandle {
        StateHandle {
            applied: self.applied.clone(),
            reading_for_snapshot: self.reading_for_snapshot.clone(),
            applied_index: self.applied_rx.clone(),
            node_signals: self.node_signals.clone(),
            archive: self.archive.clone(),
            spool: self.spool.clone(),
        }
    }

    fn write(&self) -> RwLockWriteGuard<'_, AppliedState> {
        self.applied.write().unwrap_or_else(|p| p.into_inner())
    }

    fn try_write(&self) -> Option<RwLockWriteGuard<'_, AppliedState>> {
        match self.applied.try_write() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The state for writing, without making readers queue behind this writer. A waiting
    /// writer lets no new reader into a std `RwLock`, and the leader's scheduler reads the
    /// state for a whole round (20 ms on average, 61 ms at most, with 10,000 nodes on a slow
    /// 2-core machine): an apply that queued behind a round held every agent stream,
    /// heartbeat and API read on the other runtime for the rest of it. So the write is tried
    /// every millisecond, and queued for only after [`WAIT_POLITELY_FOR`], which bounds how
    /// long a stream of readers can hold an apply off.
    ///
    /// Never while a snapshot is being written from the state: that read lasts as long as
    /// writing the whole state takes (over a second with a million jobs), and an apply
    /// queued behind it would shut every reader out and block one of Raft's two threads
    /// for all that time. The apply waits it out politely, and the clock starts again after.
    async fn write_when_free(&self) -> RwLockWriteGuard<'_, AppliedState> {
        let mut queue_after = Instant::now() + WAIT_POLITELY_FOR;
        loop {
            if let Some(guard) = self.try_write() {
                return guard;
            }
            if self.reading_for_snapshot.load(Ordering::Acquire) {
                queue_after = Instant::now() + WAIT_POLITELY_FOR;
            } else if Instant::now() >= queue_after {
                return self.write();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A snapshot's bytes: the image (one line of JSON), then, in a snapshot made for another
/// node or a file, the archive's records (see [`EndedJobs::append_to`]).
pub(crate) fn split_image(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|b| *b == b'\n') {
        Some(end) => bytes.split_at(end),
        None => (bytes, &[]),
    }
}

/// The state of the snapshot stored in `snapshots`, if any (its archived jobs left out): what
/// a replay of the log after it starts from (`muster debug replay-log`).
pub fn stored_state<S: SnapshotStore<TypeConfig>>(
    snapshots: &S,
) -> Result<Option<AppliedState>, StorageError<NodeId>> {
    snapshots
        .load()?
        .map(|stored| decode_image(split_image(&stored.data).0))
        .transpose()
}

pub(crate) fn decode_image(bytes: &[u8]) -> Result<AppliedState, StorageError<NodeId>> {
    let image: SnapshotImage =
        serde_json::from_slice(bytes).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
    if !muster_core::READABLE_STATE_FORMATS.contains(&image.format_version) {
        let e = std::io::Error::other(format!(
            "snapshot has unknown state format {}",
            image.format_version
        ));
        return Err(StorageIOError::read_snapshot(None, &e).into());
    }
    let mut applied = image.applied;
    applied.state.rebuild_indexes();
    Ok(applied)
}

impl<S: SnapshotStore<TypeConfig> + Clone> RaftSnapshotBuilder<TypeConfig> for StateMachine<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Written straight from the shared state, under its read lock, on a thread that may
        // block: with a million jobs this is over a second of CPU, which on one of the Raft
        // runtime's threads would hold up heartbeats and votes.
        let applied = self.applied.clone();
        let reading = self.reading_for_snapshot.clone();
        let (data, last_applied, membership) = tokio::task::spawn_blocking(move || {
            // Raised first: an apply that saw it down and queued now would wait out the
            // whole write.
            let _raised = ReadingForSnapshot::raise(&reading);
            let applied = applied.read().unwrap_or_else(|p| p.into_inner());
            let image = SnapshotImageOf {
                format_version: muster_core::STATE_FORMAT_VERSION,
                applied: &applied,
            };
            let data =
                serde_json::to_vec(&image).map_err(|e| StorageIOError::write_state_machine(&e))?;
            Ok::<_, StorageIOError<NodeId>>((
                data,
                applied.last_applied,
                applied.membership.clone(),
            ))
        })
        .await
        .map_err(|e| StorageIOError::write_state_machine(&e))??;
        // The image counts on every record archived before it: durable before it is stored.
        let archive = self.archive.clone();
        tokio::task::spawn_blocking(move || archive.flush())
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.snapshot_seq += 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.snapshot_seq),
            None => format!("--{}", self.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.snapshots
            .save(&StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            })
            .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::memory(data)),
        })
    }
}

impl<S: SnapshotStore<TypeConfig> + Clone> RaftStateMachine<TypeConfig> for StateMachine<S> {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError<NodeId>>
    {
        let applied = self.applied.read().unwrap_or_else(|p| p.into_inner());
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        muster_crashpoint::crash_point("apply_before");
        let mut outcomes = Vec::new();
        let last_index = {
            let mut applied = self.write_when_free().await;
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let outcome = match entry.payload {
                    EntryPayload::Blank => Outcome::Done,
                    EntryPayload::Normal(command) => {
                        self.node_signals
                            .notify(&applied.state.nodes_affected_by(&command.0));
                        // A deep copy only while the log's cache still shares the command.
                        applied.state.apply(Arc::unwrap_or_clone(command.0))
                    }
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m);
                        Outcome::Done
                    }
                };
                outcomes.push(outcome);
            }
            // Under the write lock: a reader never sees a job gone from memory and not yet in
            // the archive (its overlay holds it until the writer has stored it).
            let changes = applied.state.take_archive_changes();
            if !changes.is_empty() {
                self.archive.write(changes, &applied.state);
            }
            if let Some(e) = self.archive.failure() {
                return Err(StorageIOError::write_state_machine(&std::io::Error::other(e)).into());
            }
            applied.last_applied.map_or(0, |l| l.index)
        };
        muster_crashpoint::crash_point("apply_after");
        self.applied_tx.send_replace(last_index);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachine {
            applied: self.applied.clone(),
            applied_tx: self.applied_tx.clone(),
            applied_rx: self.applied_rx.clone(),
            node_signals: self.node_signals.clone(),
            snapshots: self.snapshots.clone(),
            snapshot_seq: self.snapshot_seq,
            reading_for_snapshot: self.reading_for_snapshot.clone(),
            archive: self.archive.clone(),
            spool: self.spool.clone(),
            started: self.started,
        }
    }

    /// Received into a spool file: a snapshot from another node carries the whole archive.
    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<SnapshotData>, StorageError<NodeId>> {
        let spool = self.spool.clone();
        let file = tokio::task::spawn_blocking(move || spool.create())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(SnapshotData::Spooled(tokio::fs::File::from_std(
            file,
        ))))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError<NodeId>> {
        muster_crashpoint::crash_point("snapshot_install_before");
        let mut reader = snapshot
            .into_reader()
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        // Decoding a large state is seconds of CPU, and the archive's records as much IO: not
        // on one of Raft's threads. The records are read one at a time from the spool.
        let archive = self.archive.clone();
        let (mut installed, image) = tokio::task::spawn_blocking(move || {
            let mut image = Vec::new();
            reader
                .read_until(b'\n', &mut image)
                .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
            if image.last() == Some(&b'\n') {
                image.pop();
            }
            let installed = decode_image(&image)?;
            archive
                .import(reader, &installed.state)
                .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
            // Stored without the records, which the archive now holds.
            Ok::<_, StorageError<NodeId>>((installed, image))
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))??;
        installed
            .state
            .attach_archive(Arc::new(self.archive.clone()));
        installed.last_applied = meta.last_log_id;
        installed.membership = meta.last_membership.clone();
        self.snapshots
            .save(&StoredSnapshot {
                meta: meta.clone(),
                data: image,
            })
            .await?;
        muster_crashpoint::crash_point("snapshot_install_after");
        let index = installed.last_applied.map_or(0, |l| l.index);
        let replaced = std::mem::replace(&mut *self.write_when_free().await, installed);
        // Freeing the state it replaces takes a while too: after the lock, off Raft's threads.
        tokio::task::spawn_blocking(move || drop(replaced));
        self.applied_tx.send_replace(index);
        self.node_signals.notify(&AffectedNodes::All);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let for_another_node = std::mem::replace(&mut self.started, true);
        let Some(stored) = self.snapshots.load()? else {
            return Ok(None);
        };
        let sig = stored.meta.signature();
        let data = if for_another_node {
            // Written to a spool file as the archive is read, and sent from it in chunks.
            let (archive, spool) = (self.archive.clone(), self.spool.clone());
            let image = stored.data;
            let file = tokio::task::spawn_blocking(move || {
                let mut out = std::io::BufWriter::with_capacity(1 << 20, spool.create()?);
                out.write_all(split_image(&image).0)?;
                archive.append_to(&mut out)?;
                out.into_inner().map_err(|e| e.into_error())
            })
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(sig.clone()), &e))?
            .map_err(|e| StorageIOError::read_snapshot(Some(sig.clone()), &e))?;
            SnapshotData::spooled(file).map_err(|e| StorageIOError::read_snapshot(Some(sig), &e))?
        } else {
            SnapshotData::memory(stored.data)
        };
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_store::MemSnapshotStore;

    fn blank_entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn an_apply_waiting_for_a_long_read_lets_other_readers_in() {
        let mut machine = StateMachine::open(
            MemSnapshotStore::default(),
            EndedJobs::in_memory(),
            SnapshotSpool::temporary(),
        )
        .unwrap();
        let handle = machine.handle();
        let round = handle.read(); // a scheduler round, planning
        let entry = blank_entry(1);
        let (first_try, tried) = std::sync::mpsc::channel();
        let applier = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut applying = std::pin::pin!(machine.apply([entry]));
                // One poll: the apply tries the lock and finds the round's read.
                let waiting = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(applying.as_mut().poll(cx).is_pending())
                })
                .await;
                first_try.send(waiting).unwrap();
                applying.await.map(|o| o.len())
            })
        });
        assert_eq!(
            tried.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "applied under a reader, or blocked in its first try"
        );
        assert!(
            handle.applied.try_read().is_ok(),
            "a reader was kept out by the waiting apply"
        );
        drop(round);
        assert_eq!(applier.join().unwrap().unwrap(), 1);
        assert_eq!(handle.read().last_applied.map(|l| l.index), Some(1));
    }

    #[test]
    fn an_apply_waits_out_a_snapshot_being_written_without_shutting_readers_out() {
        let mut machine = StateMachine::open(
            MemSnapshotStore::default(),
            EndedJobs::in_memory(),
            SnapshotSpool::temporary(),
        )
        .unwrap();
        let handle = machine.handle();
        let snapshot_read = handle.read();
        let writing = ReadingForSnapshot::raise(&machine.reading_for_snapshot);
        let entry = blank_entry(1);
        let (still_waiting, waited) = std::sync::mpsc::channel();
        let applier = std::thread::spawn(move || {
            // Paused: the clock jumps ahead whenever the apply sleeps.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut applying = std::pin::pin!(machine.apply([entry]));
                let long_past_politeness = WAIT_POLITELY_FOR * 20;
                let outcome = tokio::time::timeout(long_past_politeness, applying.as_mut()).await;
                still_waiting.send(outcome.is_err()).unwrap();
                applying.await.map(|o| o.len())
            })
        });
        assert_eq!(
            waited.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "the apply took the state under the snapshot's read, or queued for it and blocked"
        );
        assert!(
            handle.applied.try_read().is_ok(),
            "a reader was kept out while the snapshot was written"
        );
        drop(writing);
        drop(snapshot_read);
        assert_eq!(applier.join().unwrap().unwrap(), 1);
        assert_eq!(handle.read().last_applied.map(|l| l.index), Some(1));
    }

    /// A snapshot for another node (the second `get_current_snapshot`; the first is openraft
    /// reading the metadata at start) is a spool file, as is one received: neither is held in
    /// memory, and neither leaves a file behind.
    #[tokio::test]
    async fn a_snapshot_sent_to_another_node_goes_through_spool_files_and_installs_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (sent_dir, received_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut source = StateMachine::open(
            MemSnapshotStore::default(),
            EndedJobs::in_memory(),
            SnapshotSpool::in_dir(sent_dir.path()).unwrap(),
        )
        .unwrap();
        let user = |index: u64, name: &str| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(crate::LoggedCommand::from(muster_core::Command::Iam(
                muster_core::IamCommand::CreateUser {
                    name: name.into(),
                    user_id: format!("AIDA000{index}"),
                    at: muster_core::Timestamp(index),
                },
            ))),
        };
        source
            .apply([user(1, "alice"), user(2, "bob")])
            .await
            .unwrap();
        source
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let at_start = source.get_current_snapshot().await.unwrap().unwrap();
        assert!(matches!(*at_start.snapshot, SnapshotData::Memory(_)));
        let mut sent = source.get_current_snapshot().await.unwrap().unwrap();
        assert!(
            matches!(*sent.snapshot, SnapshotData::Spooled(_)),
            "a snapshot for another node was built in memory"
        );

        let mut target = StateMachine::open(
            MemSnapshotStore::default(),
            EndedJobs::in_memory(),
            SnapshotSpool::in_dir(received_dir.path()).unwrap(),
        )
        .unwrap();
        let mut received = target.begin_receiving_snapshot().await.unwrap();
        assert!(matches!(*received, SnapshotData::Spooled(_)));
        // In small chunks, as openraft writes them.
        let mut chunk = [0u8; 7];
        loop {
            let n = sent.snapshot.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            received.write_all(&chunk[..n]).await.unwrap();
        }
        received.shutdown().await.unwrap();
        target.install_snapshot(&sent.meta, received).await.unwrap();
        drop(sent);

        let (source, target) = (source.handle(), target.handle());
        let (source, target) = (source.read(), target.read());
        assert!(target.state.user("bob").is_some());
        assert_eq!(
            serde_json::to_value(&target.state).unwrap(),
            serde_json::to_value(&source.state).unwrap()
        );
        for dir in [&sent_dir, &received_dir] {
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                0,
                "a spool file was left behind"
            );
        }
    }

    #[tokio::test]
    async fn a_snapshot_built_from_the_state_installs_as_the_same_state() {
        let mut source = StateMachine::open(
            MemSnapshotStore::default(),
            EndedJobs::in_memory(),
            SnapshotSpool::temporary(),
        )
        .unwrap();
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 3),
            payload: EntryPayload::Normal(crate::LoggedCommand::from(muster_core::Command::Iam(
                muster_core::IamCommand::CreateUser {
                    name: "alice".into(),
                    user_id: "AIDA0001".into(),
                    at: muster_core::Timestamp(2),
                },
            ))),
        };
        source.apply([entry]).await.unwrap();
        let built = source
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert!(!source.reading_for_snapshot.load(Ordering::Acquire));

        let mut target = StateMachine::open(
            MemSnapshotStore::default(),
            EndedJobs::in_memory(),
            SnapshotSpool::temporary(),
        )
        .unwrap();
        target
            .install_snapshot(&built.meta, built.snapshot)
            .await
            .unwrap();
        let (source, target) = (source.handle(), target.handle());
        let (source, target) = (source.read(), target.read());
        assert_eq!(target.last_applied, source.last_applied);
        assert!(target.state.user("alice").is_some());
        assert_eq!(
            serde_json::to_value(&target.state).unwrap(),
            serde_json::to_value(&source.state).unwrap()
        );
    }
}
