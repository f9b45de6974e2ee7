//! Ended jobs' records, off the heap: one tree of records by key, one of listing keys (kept in
//! the order ListJobs pages through them) pointing at those records, and one of log streams
//! with what DescribeLogStreams says of each. Bytes only; the state machine (`muster-raft`)
//! decides what the keys and records are.

use crate::durable::Database;
use sled::Tree;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, RwLock};

/// A record to write: its key, its bytes, the listing key that points at it, if any, and its
/// log streams (key and value).
pub struct ArchivedRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub listing: Option<Vec<u8>>,
    pub streams: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A record to remove, with every key that points at it.
pub struct ArchivedKeys {
    pub key: Vec<u8>,
    pub listing: Option<Vec<u8>>,
    pub streams: Vec<Vec<u8>>,
}

/// The archive's two trees, on disk in the node's sled database or in memory.
#[derive(Clone)]
pub struct ArchiveStore(Trees);

#[derive(Clone)]
enum Trees {
    Sled {
        db: Database,
        records: Tree,
        listing: Tree,
        streams: Tree,
    },
    Mem(Arc<RwLock<MemTrees>>),
}

#[derive(Default)]
struct MemTrees {
    records: BTreeMap<Vec<u8>, Vec<u8>>,
    listing: BTreeMap<Vec<u8>, ()>,
    streams: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl std::fmt::Debug for ArchiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Trees::Sled { .. } => "ArchiveStore(sled)",
            Trees::Mem(_) => "ArchiveStore(memory)",
        })
    }
}

fn sled_err(e: sled::Error) -> io::Error {
    io::Error::other(e)
}

impl ArchiveStore {
    /// The archive in a database of its own in `dir`, so that writing it never makes the Raft
    /// log's flushes (one before every append is acknowledged) carry its pages: the log's
    /// database is flushed only when asked, this one every second and before a snapshot.
    pub async fn open(dir: &std::path::Path) -> io::Result<Self> {
        let open = || {
            Database::open(
                sled::Config::new()
                    .cache_capacity(32 * 1024 * 1024)
                    .flush_every_ms(Some(1000)),
                dir,
            )
        };
        // A database reopened in the same process (a node restarted in place) may find the
        // previous instance letting go of its lock for a moment.
        let mut tries = 0;
        let db = loop {
            match open() {
                Ok(db) => break db,
                Err(e) if tries >= 50 => return Err(e),
                Err(_) => tries += 1,
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        Self::on_disk(&db)
    }

    /// The archive in trees `ended_jobs`, `ended_listing` and `ended_streams` of `db`.
    pub fn on_disk(db: &Database) -> io::Result<Self> {
        let sled = db.sled();
        Ok(Self(Trees::Sled {
            db: db.clone(),
            records: sled.open_tree("ended_jobs").map_err(sled_err)?,
            listing: sled.open_tree("ended_listing").map_err(sled_err)?,
            streams: sled.open_tree("ended_streams").map_err(sled_err)?,
        }))
    }

    pub fn in_memory() -> Self {
        Self(Trees::Mem(Arc::default()))
    }

    fn mem(trees: &RwLock<MemTrees>) -> std::sync::RwLockReadGuard<'_, MemTrees> {
        trees.read().unwrap_or_else(|p| p.into_inner())
    }

    fn mem_mut(trees: &RwLock<MemTrees>) -> std::sync::RwLockWriteGuard<'_, MemTrees> {
        trees.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes records and removes others (each with its listing key and log streams). Not
    /// flushed: see [`ArchiveStore::flush`].
    pub fn write(&self, puts: Vec<ArchivedRecord>, deletes: Vec<ArchivedKeys>) -> io::Result<()> {
        match &self.0 {
            Trees::Sled {
                records,
                listing,
                streams,
                ..
            } => {
                // One operation at a time, never `apply_batch`: sled guards batches with a
                // lock shared by every database in the process, held exclusively while a batch
                // is applied, so a batch of ten thousand records held up the Raft log's
                // appends (and, in one process, every node's) for as long as it took: the
                // archive cost the bench three quarters of its placements. The order below
                // keeps what a batch per tree kept: the keys that point at a record go after
                // it is written and before it is removed, so a reader (or a crash) never
                // finds a key without its record, which a later purge needs to find the keys.
                for r in &puts {
                    records.insert(&r.key[..], &r.value[..]).map_err(sled_err)?;
                }
                for r in puts {
                    for (k, v) in r.streams {
                        streams.insert(k, v).map_err(sled_err)?;
                    }
                    if let Some(l) = r.listing {
                        listing.insert(l, &[][..]).map_err(sled_err)?;
                    }
                }
                for d in &deletes {
                    if let Some(l) = &d.listing {
                        listing.remove(&l[..]).map_err(sled_err)?;
                    }
                    for k in &d.streams {
                        streams.remove(&k[..]).map_err(sled_err)?;
                    }
                }
                for d in deletes {
                    records.remove(d.key).map_err(sled_err)?;
                }
                Ok(())
            }
            Trees::Mem(trees) => {
                let mut t = Self::mem_mut(trees);
                for r in puts {
                    if let Some(l) = r.listing {
                        t.listing.insert(l, ());
                    }
                    t.streams.extend(r.streams);
                    t.records.insert(r.key, r.value);
                }
                for d in deletes {
                    if let Some(l) = d.listing {
                        t.listing.remove(&l);
                    }
                    for k in d.streams {
                        t.streams.remove(&k);
                    }
                    t.records.remove(&d.key);
                }
                Ok(())
            }
        }
    }

    /// Up to `limit` log stream entries whose keys start with `prefix` and sort after
    /// `after` (when given), in key order.
    pub fn streams_with_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let start = match after {
            Some(after) if after >= prefix => std::ops::Bound::Excluded(after.to_vec()),
            _ => std::ops::Bound::Included(prefix.to_vec()),
        };
        let range = (start, std::ops::Bound::Unbounded);
        match &self.0 {
            Trees::Sled { streams, .. } => streams
                .range::<Vec<u8>, _>(range)
                .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
                .take(limit)
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(sled_err))
                .collect(),
            Trees::Mem(trees) => Ok(Self::mem(trees)
                .streams
                .range::<Vec<u8>, _>(range)
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()),
        }
    }

    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        match &self.0 {
            Trees::Sled { records, .. } => {
                Ok(records.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
            }
            Trees::Mem(trees) => Ok(Self::mem(trees).records.get(key).cloned()),
        }
    }

    /// Listing keys that start with `prefix` and sort after `after` (from the start of the
    /// prefix when `None`), in order, read lazily.
    pub fn listing<'a>(
        &'a self,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
    ) -> Box<dyn Iterator<Item = io::Result<Vec<u8>>> + 'a> {
        let start = std::ops::Bound::Excluded(after.unwrap_or_else(|| prefix.clone()));
        let within = move |key: &[u8]| key.starts_with(&prefix);
        match &self.0 {
            Trees::Sled { listing, .. } => Box::new(
                listing
                    .range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded))
                    .keys()
                    .map(|k| k.map(|k| k.to_vec()).map_err(sled_err))
                    .take_while(move |k| k.as_ref().map_or(true, |k| within(k))),
            ),
            Trees::Mem(trees) => {
                let keys: Vec<Vec<u8>> = Self::mem(trees)
                    .listing
                    .range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded))
                    .map(|(k, _)| k.clone())
                    .take_while(|k| within(k))
                    .collect();
                Box::new(keys.into_iter().map(Ok))
            }
        }
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn with_prefix(&self, prefix: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match &self.0 {
            Trees::Sled { records, .. } => sled_prefixed(records, prefix, usize::MAX),
            Trees::Mem(trees) => Ok(mem_prefixed(&Self::mem(trees).records, prefix, usize::MAX)),
        }
    }

    /// Calls `f` with every record, in key order (for a snapshot sent to another node).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8]) -> io::Result<()>) -> io::Result<()> {
        match &self.0 {
            Trees::Sled { records, .. } => {
                for r in records.iter() {
                    let (k, v) = r.map_err(sled_err)?;
                    f(&k, &v)?;
                }
                Ok(())
            }
            Trees::Mem(trees) => {
                for (k, v) in &Self::mem(trees).records {
                    f(k, v)?;
                }
                Ok(())
            }
        }
    }

    /// Removes everything (before a snapshot from another node replaces the state).
    pub fn clear(&self) -> io::Result<()> {
        match &self.0 {
            Trees::Sled {
                records,
                listing,
                streams,
                ..
            } => {
                listing.clear().map_err(sled_err)?;
                streams.clear().map_err(sled_err)?;
                records.clear().map_err(sled_err)
            }
            Trees::Mem(trees) => {
                *Self::mem_mut(trees) = MemTrees::default();
                Ok(())
            }
        }
    }

    /// Makes everything written so far durable (before a snapshot that counts on it is
    /// stored).
    pub fn flush(&self) -> io::Result<()> {
        match &self.0 {
            // One flush writes the whole database, every tree.
            Trees::Sled { db, .. } => db.flush_blocking(),
            Trees::Mem(_) => Ok(()),
        }
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Trees::Sled { records, .. } => records.len(),
            Trees::Mem(trees) => Self::mem(trees).records.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Up to `limit` entries of `tree` whose key starts with `prefix`, in key order.
fn sled_prefixed(tree: &Tree, prefix: &[u8], limit: usize) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    tree.scan_prefix(prefix)
        .take(limit)
        .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(sled_err))
        .collect()
}

/// The same of an in-memory tree.
fn mem_prefixed(
    tree: &BTreeMap<Vec<u8>, Vec<u8>>,
    prefix: &[u8],
    limit: usize,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    tree.range(prefix.to_vec()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> Vec<(ArchiveStore, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::open_sled(dir.path()).unwrap();
        let unused = tempfile::tempdir().unwrap();
        vec![
            (ArchiveStore::on_disk(&db).unwrap(), dir),
            (ArchiveStore::in_memory(), unused),
        ]
    }

    #[test]
    fn records_are_listed_by_prefix_after_a_key_and_deleted_with_their_listing() {
        for (store, _dir) in both() {
            let put = |key: &str, listing: Option<&str>| ArchivedRecord {
                key: key.into(),
                value: format!("v-{key}").into(),
                listing: listing.map(Into::into),
                streams: vec![(format!("g\0{key}-1").into(), key.into())],
            };
            store
                .write(
                    vec![
                        put("a", Some("q1/1/a")),
                        put("a:0", None),
                        put("b", Some("q1/2/b")),
                        put("c", Some("q2/1/c")),
                    ],
                    vec![],
                )
                .unwrap();
            let listed = |prefix: &str, after: Option<&str>| -> Vec<String> {
                store
                    .listing(prefix.into(), after.map(Into::into))
                    .map(|k| String::from_utf8(k.unwrap()).unwrap())
                    .collect()
            };
            assert_eq!(listed("q1/", None), ["q1/1/a", "q1/2/b"]);
            assert_eq!(listed("q1/", Some("q1/1/a")), ["q1/2/b"]);
            assert_eq!(listed("q2/", None), ["q2/1/c"]);
            assert_eq!(store.get(b"a:0").unwrap(), Some(b"v-a:0".to_vec()));
            assert_eq!(store.with_prefix(b"a:").unwrap().len(), 1);
            assert_eq!(
                store.streams_with_prefix(b"g\0", None, 10).unwrap().len(),
                4
            );
            assert_eq!(store.streams_with_prefix(b"g\0", None, 2).unwrap().len(), 2);
            // A page after the first two: the other two, and nothing after the last.
            let first = store.streams_with_prefix(b"g\0", None, 2).unwrap();
            let rest = store
                .streams_with_prefix(b"g\0", Some(&first[1].0), 10)
                .unwrap();
            assert_eq!(rest.len(), 2);
            assert!(rest[0].0 > first[1].0);
            assert_eq!(
                store
                    .streams_with_prefix(b"g\0", Some(&rest[1].0), 10)
                    .unwrap(),
                vec![]
            );
            store
                .write(
                    vec![],
                    vec![ArchivedKeys {
                        key: b"b".to_vec(),
                        listing: Some(b"q1/2/b".to_vec()),
                        streams: vec![b"g\0b-1".to_vec()],
                    }],
                )
                .unwrap();
            assert_eq!(listed("q1/", None), ["q1/1/a"]);
            assert_eq!(
                store.streams_with_prefix(b"g\0b", None, 10).unwrap(),
                vec![]
            );
            assert_eq!(store.get(b"b").unwrap(), None);
            let mut all = Vec::new();
            store
                .for_each(|k, _| {
                    all.push(k.to_vec());
                    Ok(())
                })
                .unwrap();
            assert_eq!(all, [b"a".to_vec(), b"a:0".to_vec(), b"c".to_vec()]);
            store.clear().unwrap();
            assert!(store.is_empty());
        }
    }
}
