//! The Raft log and vote on sled.

use crate::PurgeBound;
use crate::codec::{decode, encode};
use crate::durable::Database;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig, StorageError,
    StorageIOError, Vote,
};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Opens (or creates) the sled database of one control node.
pub fn open_sled(dir: &Path) -> Result<Database, std::io::Error> {
    Database::open(
        sled::Config::new()
            // The state machine lives in memory; sled only needs a small page cache.
            .cache_capacity(64 * 1024 * 1024)
            // Durability comes from explicit flushes before acknowledging, not a timer.
            .flush_every_ms(None),
        dir,
    )
}

/// [`open_sled`], waiting up to five seconds for the directory's lock: a database reopened in
/// the same process (a node restarted in place) may find the previous instance's background
/// flusher still letting go of it for a moment.
pub async fn open_sled_waiting(dir: &Path) -> Result<Database, std::io::Error> {
    let mut tries = 0;
    loop {
        match open_sled(dir) {
            Ok(db) => return Ok(db),
            Err(e) if tries >= 50 => return Err(e),
            Err(_) => tries += 1,
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Raft log entries keyed by big-endian index, plus vote and bookkeeping in a meta tree.
/// Cloning shares the same trees (sled trees are reference counted) and the same cache.
pub struct SledLogStore<C: RaftTypeConfig> {
    db: Database,
    logs: sled::Tree,
    meta: sled::Tree,
    recent: Arc<Mutex<RecentEntries<C::Entry>>>,
    /// Where set, purges go no further than the snapshot stored beside the log.
    bound: Option<PurgeBound>,
    /// A purge left undone by the bound, done before the next append.
    deferred: Arc<Mutex<Option<LogId<C::NodeId>>>>,
    _types: PhantomData<C>,
}

impl<C: RaftTypeConfig> Clone for SledLogStore<C> {
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            logs: self.logs.clone(),
            meta: self.meta.clone(),
            recent: self.recent.clone(),
            bound: self.bound.clone(),
            deferred: self.deferred.clone(),
            _types: PhantomData,
        }
    }
}

/// Encoded bytes of the newest entries kept decoded in memory, per log.
const RECENT_ENTRIES_BYTES: usize = 16 * 1024 * 1024;

/// The newest entries of the log, decoded, without gaps and ending at the log's last entry
/// (appends add at the end, truncation cuts the end, purges and the size bound cut the
/// start). The leader reads every entry back once per follower to replicate it, just after
/// appending it; decoding it from sled each time was most of what replication cost.
struct RecentEntries<E> {
    entries: BTreeMap<u64, (E, usize)>,
    bytes: usize,
}

impl<E> RecentEntries<E> {
    fn push(&mut self, index: u64, entry: E, bytes: usize) {
        if let Some((_, old)) = self.entries.insert(index, (entry, bytes)) {
            self.bytes -= old;
        }
        self.bytes += bytes;
        while self.bytes > RECENT_ENTRIES_BYTES
            && let Some((_, (_, evicted))) = self.entries.pop_first()
        {
            self.bytes -= evicted;
        }
    }

    /// Drops the entries from `index` on, or (`up_to`) those up to and including it.
    fn cut(&mut self, index: u64, up_to: bool) {
        let dropped = if up_to {
            let kept = self.entries.split_off(&(index + 1));
            std::mem::replace(&mut self.entries, kept)
        } else {
            self.entries.split_off(&index)
        };
        self.bytes -= dropped.values().map(|(_, b)| b).sum::<usize>();
    }

    /// Entries `start..end` (`end` = `None`: to the last), if all of them are here.
    fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<E>>
    where
        E: Clone,
    {
        let (&first, _) = self.entries.first_key_value()?;
        let (&last, _) = self.entries.last_key_value()?;
        let end = end.unwrap_or(last + 1);
        if start < first || end > last + 1 {
            return None;
        }
        Some(
            self.entries
                .range(start..end)
                .map(|(_, (e, _))| e.clone())
                .collect(),
        )
    }
}

impl<C> SledLogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
{
    pub fn new(db: &Database) -> Result<Self, std::io::Error> {
        Ok(Self {
            db: db.clone(),
            logs: db
                .sled()
                .open_tree("raft_log")
                .map_err(std::io::Error::other)?,
            meta: db
                .sled()
                .open_tree("raft_meta")
                .map_err(std::io::Error::other)?,
            recent: Arc::new(Mutex::new(RecentEntries {
                entries: BTreeMap::new(),
                bytes: 0,
            })),
            bound: None,
            deferred: Arc::default(),
            _types: PhantomData,
        })
    }

    /// Purges only what the snapshot stored beside the log covers ([`PurgeBound`]).
    ///
    /// openraft orders the purge of what a snapshot received from the leader covers as soon
    /// as it orders the snapshot installed, and runs the purge at once while the state
    /// machine installs and stores the snapshot on its own task. A node that died in between
    /// held a log purged past its stored snapshot and never started again (openraft refuses
    /// that state). A purge past the stored snapshot is left undone until the next append,
    /// which does it first: entries after a snapshot never follow a gap the log does not
    /// record as purged. No append comes between the two: openraft holds its later commands
    /// back until the state machine has installed (and so stored) the snapshot, since the
    /// install's answer waits on that and stays at the head of its queue. A node that dies
    /// before that append starts from the stored snapshot, and openraft drops the entries it
    /// covers.
    pub fn bounded_by(mut self, bound: PurgeBound) -> Self {
        self.bound = Some(bound);
        self
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, std::io::Error> {
        match self.meta.get(key).map_err(std::io::Error::other)? {
            Some(bytes) => decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
    ) -> Result<(), std::io::Error> {
        self.meta
            .insert(key, encode(value)?)
            .map_err(std::io::Error::other)?;
        self.db.flush().await?;
        Ok(())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries<C::Entry>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId<C::NodeId>>, std::io::Error> {
        match self.logs.last().map_err(std::io::Error::other)? {
            Some((_, bytes)) => Ok(Some(decode::<Entry<C>>(&bytes)?.get_log_id().clone())),
            None => Ok(None),
        }
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn write_err<NID: openraft::NodeId>(e: std::io::Error) -> StorageError<NID> {
    StorageIOError::write_logs(&e).into()
}

fn read_err<NID: openraft::NodeId>(e: impl std::error::Error + 'static) -> StorageError<NID> {
    StorageIOError::read_logs(&e).into()
}

impl<C> RaftLogReader<C> for SledLogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
    C::Entry: Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end_index = match range.end_bound() {
            Bound::Included(&i) => Some(i + 1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        if let Some(entries) = self.recent().get(start, end_index) {
            return Ok(entries);
        }
        let end = match end_index {
            Some(i) => Bound::Excluded(key(i)),
            None => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        for item in self.logs.range((Bound::Included(key(start)), end)) {
            let (_, bytes) = item.map_err(read_err)?;
            entries.push(decode(&bytes).map_err(read_err)?);
        }
        Ok(entries)
    }
}

impl<C> RaftLogStorage<C> for SledLogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
    C::Entry: Clone,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let last_purged_log_id = self.read_meta(LAST_PURGED).map_err(read_err)?;
        let last_log_id = self
            .last_entry_log_id()
            .map_err(read_err)?
            .or(last_purged_log_id.clone());
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.write_meta(VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        self.read_meta(VOTE)
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        // Not flushed on its own: a lost committed index is recomputed by Raft after restart.
        let bytes = encode(&committed).map_err(write_err)?;
        self.meta
            .insert(COMMITTED, bytes)
            .map_err(|e| write_err(std::io::Error::other(e)))?;
        Ok(())
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self
            .read_meta::<Option<LogId<C::NodeId>>>(COMMITTED)
            .map_err(read_err)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.purge_deferred().await?;
        // One batch and one flush for everything openraft hands us at once; the callback
        // (which lets Raft acknowledge) fires only once the entries are on disk.
        let mut batch = sled::Batch::default();
        let mut appended = Vec::new();
        for entry in entries {
            let index = entry.get_log_id().index;
            let bytes = encode(&entry).map_err(write_err)?;
            appended.push((index, bytes.len(), entry));
            batch.insert(&key(index), bytes);
        }
        {
            // Cached before the write completes: until the callback fires, openraft reads
            // none of these entries, and if the write fails the node stops.
            let mut recent = self.recent();
            for (index, bytes, entry) in appended {
                recent.push(index, entry, bytes);
            }
        }
        let result = async {
            self.logs
                .apply_batch(batch)
                .map_err(std::io::Error::other)?;
            muster_crashpoint::crash_point("log_after_write");
            self.db.flush().await?;
            muster_crashpoint::crash_point("log_after_flush");
            Ok::<(), std::io::Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = write_err(std::io::Error::other(e.to_string()));
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.recent().cut(log_id.index, false);
        let mut batch = sled::Batch::default();
        for item in self.logs.range(key(log_id.index)..) {
            let (k, _) = item.map_err(read_err)?;
            batch.remove(k);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| write_err(std::io::Error::other(e)))?;
        self.db.flush().await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        if let Some(bound) = &self.bound
            && bound.get().is_none_or(|stored| log_id.index > stored)
        {
            tracing::info!(
                upto = log_id.index,
                stored_snapshot = ?bound.get(),
                "log purge left for later: the snapshot covering it is not stored yet"
            );
            let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            if deferred.as_ref().is_none_or(|d| d.index < log_id.index) {
                *deferred = Some(log_id);
            }
            return Ok(());
        }
        self.purge_now(log_id).await
    }
}

impl<C> SledLogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
{
    /// The purge the bound held back, once the snapshot covering it is stored.
    async fn purge_deferred(&mut self) -> Result<(), StorageError<C::NodeId>> {
        let ready = {
            let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            let stored = self.bound.as_ref().and_then(PurgeBound::get);
            match (&*deferred, stored) {
                (Some(d), Some(stored)) if d.index <= stored => deferred.take(),
                _ => None,
            }
        };
        match ready {
            Some(log_id) => self.purge_now(log_id).await,
            None => Ok(()),
        }
    }

    async fn purge_now(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        {
            // A purge held back to here or before is done by this one.
            let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            if deferred.as_ref().is_some_and(|d| d.index <= log_id.index) {
                *deferred = None;
            }
        }
        // Never backwards: the entries below the recorded point are gone.
        let purged: Option<LogId<C::NodeId>> = self.read_meta(LAST_PURGED).map_err(read_err)?;
        if purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        // Record the purge point first: a crash between the two steps leaves extra entries
        // below it, which are harmless, never a gap.
        self.write_meta(LAST_PURGED, &log_id)
            .await
            .map_err(write_err)?;
        self.recent().cut(log_id.index, true);
        let mut batch = sled::Batch::default();
        for item in self.logs.range(..=key(log_id.index)) {
            let (k, _) = item.map_err(read_err)?;
            batch.remove(k);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| write_err(std::io::Error::other(e)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recent(indexes: std::ops::RangeInclusive<u64>, bytes: usize) -> RecentEntries<u64> {
        let mut recent = RecentEntries {
            entries: BTreeMap::new(),
            bytes: 0,
        };
        for i in indexes {
            recent.push(i, i, bytes);
        }
        recent
    }

    #[test]
    fn recent_entries_answer_only_ranges_they_hold_whole() {
        let recent = recent(5..=9, 10);
        assert_eq!(recent.get(5, Some(10)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(recent.get(7, None), Some(vec![7, 8, 9]));
        assert_eq!(recent.get(9, Some(9)), Some(vec![]));
        // Starts before the cache, or runs past the log's end: sled answers.
        assert_eq!(recent.get(4, Some(8)), None);
        assert_eq!(recent.get(6, Some(11)), None);
    }

    #[test]
    fn recent_entries_stay_within_their_byte_bound_and_follow_truncation_and_purge() {
        let entry = RECENT_ENTRIES_BYTES / 4;
        let mut recent = recent(1..=6, entry);
        assert_eq!(recent.bytes, 4 * entry);
        assert_eq!(recent.get(3, None), Some(vec![3, 4, 5, 6]));
        assert_eq!(recent.get(2, None), None, "the oldest were evicted");

        recent.cut(5, false);
        assert_eq!(recent.get(3, None), Some(vec![3, 4]));
        recent.push(5, 50, entry);
        assert_eq!(recent.get(3, None), Some(vec![3, 4, 50]));

        recent.cut(3, true);
        assert_eq!(recent.get(4, None), Some(vec![4, 50]));
        assert_eq!(recent.bytes, 2 * entry);
    }
}
