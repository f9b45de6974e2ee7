//! The latest snapshot: its metadata and the state machine's bytes.

use crate::FORMAT_VERSION;
use crate::codec::{decode, encode};
use crate::durable::Database;
use openraft::{RaftTypeConfig, SnapshotMeta, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// A snapshot as stored: openraft's metadata and the opaque state machine image.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct StoredSnapshot<C: RaftTypeConfig> {
    pub meta: SnapshotMeta<C::NodeId, C::Node>,
    pub data: Vec<u8>,
}

impl<C: RaftTypeConfig> Clone for StoredSnapshot<C> {
    fn clone(&self) -> Self {
        Self {
            meta: self.meta.clone(),
            data: self.data.clone(),
        }
    }
}

/// Keeps the one current snapshot. Saving replaces the previous one durably.
pub trait SnapshotStore<C: RaftTypeConfig>: Send + Sync + 'static {
    fn save(
        &self,
        snapshot: &StoredSnapshot<C>,
    ) -> impl Future<Output = Result<(), StorageError<C::NodeId>>> + Send;
    fn load(&self) -> Result<Option<StoredSnapshot<C>>, StorageError<C::NodeId>>;
}

/// Where the current snapshot is kept: its metadata (versioned JSON) and its image (a version
/// byte, then the state machine's bytes as they are). Written together in one batch.
const CURRENT_META: &[u8] = b"current-meta";
const CURRENT_IMAGE: &[u8] = b"current-image";
/// The layout before: metadata and image as one JSON value, the image a JSON array of
/// numbers (three to four bytes of text per byte, encoded and decoded byte by byte: seconds
/// of CPU and a gigabyte of memory for a state of a million jobs). Still read; replaced by
/// the next save.
const CURRENT_AS_ONE: &[u8] = b"current";

/// How far the log beside a snapshot store may be purged: up to the index of the snapshot
/// stored durably, none while none is known to be (see [`SledLogStore::bounded_by`]).
///
/// [`SledLogStore::bounded_by`]: crate::SledLogStore::bounded_by
#[derive(Clone, Debug, Default)]
pub struct PurgeBound(Arc<Mutex<Option<u64>>>);

impl PurgeBound {
    pub fn get(&self) -> Option<u64> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise_to(&self, index: u64) {
        let mut bound = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *bound = Some(bound.map_or(index, |b| b.max(index)));
    }
}

/// Snapshots in the node's sled database, beside the log.
#[derive(Clone)]
pub struct SledSnapshotStore {
    db: Database,
    tree: sled::Tree,
    stored: PurgeBound,
}

impl SledSnapshotStore {
    pub fn new(db: &Database) -> Result<Self, std::io::Error> {
        Ok(Self {
            db: db.clone(),
            tree: db
                .sled()
                .open_tree("snapshot")
                .map_err(std::io::Error::other)?,
            stored: PurgeBound::default(),
        })
    }

    /// The index of the snapshot this store holds on disk, as far as it has saved or loaded
    /// one: the log beside it is purged no further.
    pub fn purge_bound(&self) -> PurgeBound {
        self.stored.clone()
    }
}

impl<C: RaftTypeConfig> SnapshotStore<C> for SledSnapshotStore {
    async fn save(&self, snapshot: &StoredSnapshot<C>) -> Result<(), StorageError<C::NodeId>> {
        let sig = Some(snapshot.meta.signature());
        // Never an older one over a newer: a snapshot built from the state runs on a task of
        // its own, and can end after a newer one received from the leader was installed,
        // whose log this node never held. (openraft ignores the older one too.)
        let index =
            |meta: &SnapshotMeta<C::NodeId, C::Node>| meta.last_log_id.as_ref().map(|l| l.index);
        if let Some(stored) = self
            .tree
            .get(CURRENT_META)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        {
            let stored: SnapshotMeta<C::NodeId, C::Node> =
                decode(&stored).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
            if index(&stored) > index(&snapshot.meta) {
                tracing::info!(
                    stored = ?index(&stored),
                    offered = ?index(&snapshot.meta),
                    "an older snapshot than the one stored is not saved"
                );
                return Ok(());
            }
        }
        let meta =
            encode(&snapshot.meta).map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        let mut image = Vec::with_capacity(1 + snapshot.data.len());
        image.push(FORMAT_VERSION);
        image.extend_from_slice(&snapshot.data);
        let mut batch = sled::Batch::default();
        batch.insert(CURRENT_META, meta);
        batch.insert(CURRENT_IMAGE, image);
        batch.remove(CURRENT_AS_ONE);
        // Hundreds of MiB written for a large state: on a thread that may block.
        let tree = self.tree.clone();
        tokio::task::spawn_blocking(move || tree.apply_batch(batch))
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        self.db
            .flush()
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        if let Some(last) = &snapshot.meta.last_log_id {
            self.stored.raise_to(last.index);
        }
        Ok(())
    }

    fn load(&self) -> Result<Option<StoredSnapshot<C>>, StorageError<C::NodeId>> {
        let read = |key: &[u8]| {
            self.tree
                .get(key)
                .map_err(|e| StorageIOError::read_snapshot(None, &e))
        };
        let unreadable = |e: std::io::Error| StorageIOError::read_snapshot(None, &e);
        let Some(meta) = read(CURRENT_META)? else {
            return match read(CURRENT_AS_ONE)? {
                Some(bytes) => {
                    let stored: StoredSnapshot<C> = decode(&bytes).map_err(unreadable)?;
                    if let Some(last) = &stored.meta.last_log_id {
                        self.stored.raise_to(last.index);
                    }
                    Ok(Some(stored))
                }
                None => Ok(None),
            };
        };
        let meta: SnapshotMeta<C::NodeId, C::Node> = decode(&meta).map_err(unreadable)?;
        if let Some(last) = &meta.last_log_id {
            self.stored.raise_to(last.index);
        }
        let image = read(CURRENT_IMAGE)?
            .ok_or_else(|| unreadable(std::io::Error::other("snapshot image is missing")))?;
        let data = match image.split_first() {
            Some((&FORMAT_VERSION, data)) => data.to_vec(),
            Some((v, _)) => {
                return Err(unreadable(std::io::Error::other(format!(
                    "snapshot image has unknown format version {v}"
                )))
                .into());
            }
            None => return Err(unreadable(std::io::Error::other("snapshot image is empty")).into()),
        };
        Ok(Some(StoredSnapshot { meta, data }))
    }
}

/// The in-memory twin of [`SledSnapshotStore`].
pub struct MemSnapshotStore<C: RaftTypeConfig> {
    current: Arc<Mutex<Option<StoredSnapshot<C>>>>,
}

impl<C: RaftTypeConfig> Default for MemSnapshotStore<C> {
    fn default() -> Self {
        Self {
            current: Arc::new(Mutex::new(None)),
        }
    }
}

impl<C: RaftTypeConfig> Clone for MemSnapshotStore<C> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
        }
    }
}

impl<C: RaftTypeConfig> SnapshotStore<C> for MemSnapshotStore<C> {
    async fn save(&self, snapshot: &StoredSnapshot<C>) -> Result<(), StorageError<C::NodeId>> {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot.clone());
        Ok(())
    }

    fn load(&self) -> Result<Option<StoredSnapshot<C>>, StorageError<C::NodeId>> {
        Ok(self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{BasicNode, LogId, StoredMembership};

    openraft::declare_raft_types!(Config: D = u64, R = u64, SnapshotData = std::io::Cursor<Vec<u8>>);

    fn snapshot(index: u64, data: Vec<u8>) -> StoredSnapshot<Config> {
        StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
                last_membership: StoredMembership::<u64, BasicNode>::default(),
                snapshot_id: format!("1-{index}"),
            },
            data,
        }
    }

    fn image_bytes(store: &SledSnapshotStore) -> Option<usize> {
        store.tree.get(CURRENT_IMAGE).unwrap().map(|v| v.len())
    }

    #[tokio::test]
    async fn the_image_is_stored_as_its_bytes_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledSnapshotStore::new(&crate::open_sled(dir.path()).unwrap()).unwrap();
        assert!(SnapshotStore::<Config>::load(&store).unwrap().is_none());

        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        store.save(&snapshot(7, data.clone())).await.unwrap();
        assert_eq!(image_bytes(&store), Some(1 + data.len()), "not re-encoded");
        let loaded = SnapshotStore::<Config>::load(&store).unwrap().unwrap();
        assert_eq!(loaded.meta.snapshot_id, "1-7");
        assert_eq!(loaded.data, data);

        store.save(&snapshot(9, vec![1, 2, 3])).await.unwrap();
        let loaded = SnapshotStore::<Config>::load(&store).unwrap().unwrap();
        assert_eq!(
            (loaded.meta.snapshot_id.as_str(), loaded.data),
            ("1-9", vec![1, 2, 3])
        );
    }

    /// A purge past the stored snapshot (one being installed is stored after openraft orders
    /// the purge) is left undone; once a snapshot covering it is stored, it is done.
    #[tokio::test]
    async fn a_bounded_log_is_purged_no_further_than_the_stored_snapshot() {
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_sled(dir.path()).unwrap();
        let store = SledSnapshotStore::new(&db).unwrap();
        let mut log = crate::SledLogStore::<Config>::new(&db)
            .unwrap()
            .bounded_by(store.purge_bound());
        let purged = |log: &mut crate::SledLogStore<Config>| {
            let mut log = log.clone();
            async move {
                log.get_log_state()
                    .await
                    .unwrap()
                    .last_purged_log_id
                    .map(|l| l.index)
            }
        };
        let log_id = |index| LogId::new(openraft::CommittedLeaderId::new(1, 1), index);

        log.purge(log_id(5)).await.unwrap();
        assert_eq!(
            purged(&mut log).await,
            None,
            "purged with no snapshot stored"
        );
        store.save(&snapshot(7, vec![1])).await.unwrap();
        log.purge(log_id(9)).await.unwrap();
        assert_eq!(
            purged(&mut log).await,
            None,
            "purged past the snapshot at 7"
        );
        log.purge(log_id(7)).await.unwrap();
        assert_eq!(purged(&mut log).await, Some(7));

        // A store opened again learns the bound from the snapshot it loads.
        let reopened = SledSnapshotStore::new(&db).unwrap();
        assert_eq!(reopened.purge_bound().get(), None);
        SnapshotStore::<Config>::load(&reopened).unwrap();
        assert_eq!(reopened.purge_bound().get(), Some(7));
    }

    #[tokio::test]
    async fn a_snapshot_stored_in_the_old_layout_is_read_and_replaced_by_the_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledSnapshotStore::new(&crate::open_sled(dir.path()).unwrap()).unwrap();
        let old = snapshot(5, vec![9, 8, 7]);
        store
            .tree
            .insert(CURRENT_AS_ONE, encode(&old).unwrap())
            .unwrap();
        let loaded = SnapshotStore::<Config>::load(&store).unwrap().unwrap();
        assert_eq!(
            (loaded.meta.snapshot_id.as_str(), loaded.data),
            ("1-5", vec![9, 8, 7])
        );

        store.save(&snapshot(6, vec![4])).await.unwrap();
        assert!(store.tree.get(CURRENT_AS_ONE).unwrap().is_none());
        let loaded = SnapshotStore::<Config>::load(&store).unwrap().unwrap();
        assert_eq!(
            (loaded.meta.snapshot_id.as_str(), loaded.data),
            ("1-6", vec![4])
        );
    }
}
