//! `muster-store`: where Raft keeps what must survive a crash.
//!
//! The Raft log, the vote, the committed index and the latest snapshot, behind openraft's
//! storage traits. [`SledLogStore`] and [`SledSnapshotStore`] keep them on disk in one sled
//! database; [`MemLogStore`] and [`MemSnapshotStore`] are in-memory twins for tests. Both
//! pairs pass openraft's storage suite (run from `muster-raft`, which owns the state machine).
//!
//! The log is purged no further than the snapshot stored beside it ([`PurgeBound`], see
//! [`SledLogStore::bounded_by`]).
//!
//! Every stored value starts with a format version byte ([`FORMAT_VERSION`]); a value written
//! by an unknown version is an error, never silently misread.
//!
//! [`ArchiveStore`] keeps ended jobs' records (written by the state machine) in two trees of
//! the same database, or in memory.
//!
//! Every flush that a write's acknowledgement waits for is durable: sled's own flush is not
//! on Linux (it stops at `sync_file_range`), so [`Database`] fsyncs sled's files after it.
//!
//! This is the only crate that names sled. It stores bytes and openraft types, and knows
//! nothing of Muster's domain.

#![allow(clippy::result_large_err)] // openraft's StorageError is large by design

mod archive;
mod codec;
mod durable;
mod mem;
mod sled_store;
mod snapshot;

pub use archive::{ArchiveStore, ArchivedKeys, ArchivedRecord};
pub use mem::MemLogStore;
pub use sled_store::{SledLogStore, open_sled, open_sled_waiting};

/// A node's open database, shared by its log and snapshot stores; its flushes are durable
/// (sled's own are not, see the `durable` module).
pub use durable::Database;
pub use snapshot::{
    MemSnapshotStore, PurgeBound, SledSnapshotStore, SnapshotStore, StoredSnapshot,
};

/// Version of every value this crate writes.
pub const FORMAT_VERSION: u8 = 1;
