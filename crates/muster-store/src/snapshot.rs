//! The latest snapshot: its metadata and the state machine's bytes.

use crate::codec::{decode, encode};
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

const CURRENT: &[u8] = b"current";

/// Snapshots in the node's sled database, beside the log.
#[derive(Clone)]
pub struct SledSnapshotStore {
    db: sled::Db,
    tree: sled::Tree,
}

impl SledSnapshotStore {
    pub fn new(db: &sled::Db) -> Result<Self, std::io::Error> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("snapshot").map_err(std::io::Error::other)?,
        })
    }
}

impl<C: RaftTypeConfig> SnapshotStore<C> for SledSnapshotStore {
    async fn save(&self, snapshot: &StoredSnapshot<C>) -> Result<(), StorageError<C::NodeId>> {
        let sig = Some(snapshot.meta.signature());
        let bytes =
            encode(snapshot).map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        self.tree
            .insert(CURRENT, bytes)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        Ok(())
    }

    fn load(&self) -> Result<Option<StoredSnapshot<C>>, StorageError<C::NodeId>> {
        let Some(bytes) = self
            .tree
            .get(CURRENT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        decode(&bytes)
            .map(Some)
            .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
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
