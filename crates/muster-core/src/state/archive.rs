//! Ended jobs leave memory. A job whose whole family (an array's children, a multi-node job's
//! nodes) has ended, and on which nothing waits, moves out of the job table when an
//! `ArchiveEnded` command names a cutoff after its end (the leader proposes one once it has
//! been ended for a while; until then it is answered from memory): the state keeps only an [`EndedIndex`] entry per job (its status, when
//! it ended, what a later submit's dependency check needs), some 60 bytes, and hands the job
//! itself to a [`JobArchive`] on disk. Reads of ended jobs (DescribeJobs, ListJobs, logs) go
//! to the archive; `apply` never does, so replicas stay deterministic whatever their disks
//! hold: every decision about an ended job is made from the index, which snapshots carry.

use crate::{ArrayRole, Job, JobId, JobStatus, Outcome, Timestamp};
use serde::de::{Error as _, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Where ended jobs are kept once they leave memory: a sled tree on every control node
/// (`muster-store`), written by the state machine after each apply from
/// [`State::take_archive_changes`](crate::State::take_archive_changes).
pub trait JobArchive: Send + Sync + fmt::Debug {
    /// An ended job, with its spec.
    fn get(&self, id: &JobId) -> Option<Job>;
    /// Ended jobs of `queue` with `status` that ListJobs lists (not array children or nodes
    /// of multi-node jobs), in submit order, after `(seq, id)` when given.
    fn in_queue<'a>(
        &'a self,
        queue: &str,
        status: JobStatus,
        after: Option<(u64, JobId)>,
    ) -> Box<dyn Iterator<Item = Job> + 'a>;
    /// The children of an ended array job, or the nodes of an ended multi-node job, in
    /// index order.
    fn family(&self, parent: &JobId) -> Vec<Job>;
    /// Up to `limit` log streams of ended jobs in `group` whose names start with `prefix` and
    /// sort after `after` (when given), by name.
    fn streams(
        &self,
        group: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<ArchivedStream>;
}

/// An attempt's log stream, as DescribeLogStreams lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ArchivedStream {
    pub name: String,
    pub job: JobId,
    pub attempt: u32,
    /// When the attempt started (or was placed, if it never did), epoch milliseconds.
    pub created_ms: u64,
    pub stopped_ms: u64,
}

/// Whether a stream named `name` is listed for `prefix` after `after`: DescribeLogStreams'
/// page of names that start with the prefix and sort after the last name of the page before.
pub fn stream_listed(name: &str, prefix: &str, after: Option<&str>) -> bool {
    name.starts_with(prefix) && after.is_none_or(|a| name > a)
}

impl ArchivedStream {
    /// The streams of an ended job's attempts.
    pub fn of(job: &Job) -> Vec<ArchivedStream> {
        job.attempts
            .iter()
            .enumerate()
            .map(|(i, record)| ArchivedStream {
                name: record.log_stream_name.clone(),
                job: job.id.clone(),
                attempt: i as u32 + 1,
                created_ms: record.started_at.unwrap_or(record.stopped_at).as_millis(),
                stopped_ms: record.stopped_at.as_millis(),
            })
            .collect()
    }
}

/// What moved out of memory since the last [`State::take_archive_changes`], to be written to
/// the archive in this order.
#[derive(Debug, Default)]
pub struct ArchiveChanges {
    /// Ended jobs, each family's root first.
    pub moved: Vec<Box<Job>>,
    /// Jobs forgotten by retention.
    pub purged: Vec<JobId>,
}

impl ArchiveChanges {
    pub fn is_empty(&self) -> bool {
        self.moved.is_empty() && self.purged.is_empty()
    }
}

/// The link from the state to its archive: the store that reads ended jobs back, and what
/// moved since the state machine last wrote to it. Without a store (the core's own tests) the
/// pending changes are the archive.
#[derive(Debug, Clone, Default)]
pub(super) struct ArchiveLink {
    store: Option<Arc<dyn JobArchive>>,
    /// Boxed as the job table holds them: moved out without copying.
    #[allow(clippy::vec_box)]
    moved: Vec<Box<Job>>,
    purged: Vec<JobId>,
}

impl ArchiveLink {
    pub(super) fn attach(&mut self, store: Arc<dyn JobArchive>) {
        self.store = Some(store);
    }

    pub(super) fn push(&mut self, job: Box<Job>) {
        self.moved.push(job);
    }

    pub(super) fn purge(&mut self, ids: Vec<JobId>) {
        if !self.moved.is_empty() {
            let gone: std::collections::BTreeSet<&JobId> = ids.iter().collect();
            self.moved.retain(|j| !gone.contains(&j.id));
        }
        self.purged.extend(ids);
    }

    pub(super) fn take(&mut self) -> ArchiveChanges {
        ArchiveChanges {
            moved: std::mem::take(&mut self.moved),
            purged: std::mem::take(&mut self.purged),
        }
    }

    pub(super) fn get(&self, id: &JobId) -> Option<Job> {
        match self.moved.iter().rev().find(|j| &j.id == id) {
            Some(job) => Some((**job).clone()),
            None => self.store.as_ref()?.get(id),
        }
    }

    pub(super) fn in_queue<'a>(
        &'a self,
        queue: &'a str,
        status: JobStatus,
        after: Option<(u64, JobId)>,
    ) -> Box<dyn Iterator<Item = Job> + 'a> {
        let pending = listed_in_order(self.moved.iter().map(|j| &**j), queue, status, &after);
        match &self.store {
            Some(store) => Box::new(merge_by_seq(
                store.in_queue(queue, status, after),
                pending.into_iter(),
            )),
            None => Box::new(pending.into_iter()),
        }
    }

    pub(super) fn family(&self, parent: &JobId) -> Vec<Job> {
        let prefix_array = format!("{parent}:");
        let prefix_nodes = format!("{parent}#");
        let mut pending: Vec<Job> = self
            .moved
            .iter()
            .filter(|j| j.id.0.starts_with(&prefix_array) || j.id.0.starts_with(&prefix_nodes))
            .map(|j| (**j).clone())
            .collect();
        if pending.is_empty()
            && let Some(store) = &self.store
        {
            pending = store.family(parent);
        }
        pending.sort_by_key(Job::family_index);
        pending
    }
}

/// The jobs of `jobs` that ListJobs lists for `queue` and `status` after `(seq, id)`, in
/// submit order.
pub fn listed_in_order<'a>(
    jobs: impl Iterator<Item = &'a Job>,
    queue: &str,
    status: JobStatus,
    after: &Option<(u64, JobId)>,
) -> Vec<Job> {
    let mut listed: Vec<Job> = jobs
        .filter(|j| j.spec.queue == queue && j.status == status && j.listed_in_queue())
        .filter(|j| {
            after
                .as_ref()
                .is_none_or(|(s, id)| (j.seq, &j.id) > (*s, id))
        })
        .cloned()
        .collect();
    listed.sort_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)));
    listed
}

/// Two iterators of jobs in submit order, merged into one in submit order.
pub fn merge_by_seq<'a, T>(
    a: impl Iterator<Item = T> + 'a,
    b: impl Iterator<Item = T> + 'a,
) -> impl Iterator<Item = T> + 'a
where
    T: std::borrow::Borrow<Job> + 'a,
{
    let mut a = a.peekable();
    let mut b = b.peekable();
    std::iter::from_fn(move || {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => {
                let (x, y) = (x.borrow(), y.borrow());
                (x.seq, &x.id) <= (y.seq, &y.id)
            }
            (Some(_), None) => true,
            (None, _) => false,
        };
        if take_a { a.next() } else { b.next() }
    })
}

/// What the state remembers of an ended job that left memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndedEntry {
    pub stopped_at: Timestamp,
    /// The children's count for an array parent (N_TO_N dependencies check it), else 0.
    pub array_size: u32,
    pub succeeded: bool,
    /// A node of a multi-node job (which dependencies may not name).
    pub gang_node: bool,
}

impl EndedEntry {
    pub fn status(&self) -> JobStatus {
        if self.succeeded {
            JobStatus::Succeeded
        } else {
            JobStatus::Failed
        }
    }

    fn of(job: &Job) -> Self {
        Self {
            stopped_at: job.stopped_at.unwrap_or(job.created_at),
            array_size: match job.array {
                Some(ArrayRole::Parent { size, .. }) => size,
                _ => 0,
            },
            succeeded: job.status == JobStatus::Succeeded,
            gang_node: job.gang_node().is_some(),
        }
    }
}

/// A job id packed for the index: a UUID's 16 bytes and its suffix (`:<index>` of an array
/// child, `#<index>` of a node), 24 bytes in all; ids of any other shape as their text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum EndedKey {
    Packed([u8; 16], u32),
    Text(Box<str>),
}

/// Suffix bits: 0 for none, else the index plus one, with this bit for `#` (a node).
const NODE_SUFFIX: u32 = 1 << 31;

impl EndedKey {
    fn of(id: &str) -> Self {
        Self::pack(id).unwrap_or_else(|| Self::Text(id.into()))
    }

    fn pack(id: &str) -> Option<Self> {
        let (uuid, suffix) = match id.get(36..) {
            Some("") => (id, 0),
            Some(rest) => {
                let (flag, index) = match rest.as_bytes().first()? {
                    b':' => (0, &rest[1..]),
                    b'#' => (NODE_SUFFIX, &rest[1..]),
                    _ => return None,
                };
                // Only the text `index.to_string()` gives back (no sign, no leading zero).
                if (index.len() > 1 && index.starts_with('0')) || index.starts_with('+') {
                    return None;
                }
                let index: u32 = index.parse().ok()?;
                if index >= NODE_SUFFIX - 1 {
                    return None;
                }
                (&id[..36], flag | (index + 1))
            }
            None => return None,
        };
        // Only ids that read back as the same text are packed: lower-case hex, dashed as a
        // UUID is. Checked byte by byte, without building the text: every lookup of an ended
        // job packs its id, and an array's status summary looks up ten thousand.
        let mut bytes = [0u8; 16];
        let mut nibbles = 0;
        for (at, b) in uuid.bytes().enumerate() {
            if matches!(at, 8 | 13 | 18 | 23) {
                if b != b'-' {
                    return None;
                }
                continue;
            }
            let nibble = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                _ => return None,
            };
            bytes[nibbles / 2] |= nibble << if nibbles % 2 == 0 { 4 } else { 0 };
            nibbles += 1;
        }
        (nibbles == 32).then_some(Self::Packed(bytes, suffix))
    }

    fn text(&self) -> String {
        match self {
            Self::Text(text) => text.to_string(),
            Self::Packed(bytes, suffix) => {
                use std::fmt::Write;
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let mut s = String::with_capacity(48);
                for (i, b) in bytes.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        s.push('-');
                    }
                    s.push(HEX[usize::from(b >> 4)] as char);
                    s.push(HEX[usize::from(b & 0xf)] as char);
                }
                if *suffix != 0 {
                    s.push(if suffix & NODE_SUFFIX != 0 { '#' } else { ':' });
                    let _ = write!(s, "{}", (suffix & !NODE_SUFFIX) - 1);
                }
                s
            }
        }
    }
}

/// Every ended job that left memory, by id. Carried by snapshots; replicas hold the same.
#[derive(Debug, Clone, Default)]
pub(super) struct EndedIndex {
    by_id: BTreeMap<EndedKey, EndedEntry>,
    /// The earliest `stopped_at` of any entry, so that asking whether a purge has work does
    /// not walk millions of entries. Derived.
    earliest: Option<Timestamp>,
}

impl EndedIndex {
    pub(super) fn get(&self, id: &JobId) -> Option<&EndedEntry> {
        self.by_id.get(&EndedKey::of(id.as_str()))
    }

    pub(super) fn contains(&self, id: &JobId) -> bool {
        self.get(id).is_some()
    }

    /// How many of an archived array's children ended with each status. One pass over the
    /// children's packed keys, which sort together under their parent's (ids that do not pack
    /// are looked up one by one).
    pub(super) fn array_counts(&self, parent: &JobId, size: u32) -> BTreeMap<JobStatus, u32> {
        let mut counts = BTreeMap::new();
        match EndedKey::of(parent.as_str()) {
            EndedKey::Packed(bytes, 0) => {
                let children = EndedKey::Packed(bytes, 1)..EndedKey::Packed(bytes, NODE_SUFFIX);
                for entry in self.by_id.range(children).map(|(_, e)| e) {
                    *counts.entry(entry.status()).or_default() += 1;
                }
            }
            _ => {
                for index in 0..size {
                    let child = JobId::from(format!("{parent}:{index}"));
                    if let Some(entry) = self.get(&child) {
                        *counts.entry(entry.status()).or_default() += 1;
                    }
                }
            }
        }
        counts
    }

    pub(super) fn insert(&mut self, job: &Job) {
        let entry = EndedEntry::of(job);
        self.earliest = Some(
            self.earliest
                .map_or(entry.stopped_at, |e| e.min(entry.stopped_at)),
        );
        self.by_id.insert(EndedKey::of(job.id.as_str()), entry);
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether any entry stopped before `before`.
    pub(super) fn any_stopped_before(&self, before: Timestamp) -> bool {
        self.earliest.is_some_and(|e| e < before)
    }

    /// Removes the families whose root stopped before `before`, returning every id removed
    /// (roots and members).
    pub(super) fn remove_stopped_before(&mut self, before: Timestamp) -> Vec<JobId> {
        let roots: Vec<EndedKey> = self
            .by_id
            .iter()
            .filter(|(key, e)| e.stopped_at < before && !key.is_member())
            .map(|(key, _)| key.clone())
            .collect();
        let mut removed = Vec::new();
        for root in roots {
            let members: Vec<EndedKey> = match &root {
                EndedKey::Packed(bytes, 0) => self
                    .by_id
                    .range(EndedKey::Packed(*bytes, 1)..=EndedKey::Packed(*bytes, u32::MAX))
                    .map(|(k, _)| k.clone())
                    .collect(),
                EndedKey::Text(text) => {
                    let (array, nodes) = (format!("{text}:"), format!("{text}#"));
                    let start = EndedKey::Text(nodes.as_str().into());
                    let end = EndedKey::Text(format!("{text};").into());
                    self.by_id
                        .range(start..end)
                        .map(|(k, _)| k.clone())
                        .filter(|k| {
                            let t = k.text();
                            t.starts_with(&array) || t.starts_with(&nodes)
                        })
                        .collect()
                }
                EndedKey::Packed(..) => Vec::new(),
            };
            for key in members.into_iter().chain([root]) {
                self.by_id.remove(&key);
                removed.push(JobId::from(key.text().as_str()));
            }
        }
        self.earliest = self.by_id.values().map(|e| e.stopped_at).min();
        removed
    }
}

impl EndedKey {
    /// An array child or a node: purged with its root, never alone.
    fn is_member(&self) -> bool {
        match self {
            Self::Packed(_, suffix) => *suffix != 0,
            Self::Text(text) => text.contains([':', '#']),
        }
    }
}

// As a sequence of `[id, stopped_at, array_size, succeeded, gang_node]`.
impl Serialize for EndedIndex {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.by_id.len()))?;
        for (key, e) in &self.by_id {
            seq.serialize_element(&(
                key.text(),
                e.stopped_at.0,
                e.array_size,
                e.succeeded,
                e.gang_node,
            ))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for EndedIndex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = EndedIndex;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence of [id, stopped_at, array_size, succeeded, gang_node]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EndedIndex, A::Error> {
                let mut index = EndedIndex::default();
                while let Some((id, stopped_at, array_size, succeeded, gang_node)) =
                    seq.next_element::<(Cow<'de, str>, u64, u32, bool, bool)>()?
                {
                    if id.is_empty() {
                        return Err(A::Error::custom("an ended job without an id"));
                    }
                    let stopped_at = Timestamp(stopped_at);
                    let entry = EndedEntry {
                        stopped_at,
                        array_size,
                        succeeded,
                        gang_node,
                    };
                    index.earliest = Some(index.earliest.map_or(stopped_at, |e| e.min(stopped_at)));
                    index.by_id.insert(EndedKey::of(&id), entry);
                }
                Ok(index)
            }
        }
        deserializer.deserialize_seq(Entries)
    }
}

impl Job {
    /// Whether ListJobs by queue lists this job (array children and nodes are listed
    /// through their parent).
    pub fn listed_in_queue(&self) -> bool {
        !matches!(self.array, Some(ArrayRole::Child { .. })) && self.gang_node().is_none()
    }

    /// A child's or node's index in its family; 0 for anything else.
    pub fn family_index(&self) -> u32 {
        match (&self.array, self.gang_node()) {
            (Some(ArrayRole::Child { index, .. }), _) => *index,
            (_, Some((_, index, _))) => index,
            _ => 0,
        }
    }
}

impl super::State {
    /// Connects the store that ended jobs are read back from. Until then (and in the core's
    /// own tests) they are read from what moved since the last
    /// [`take_archive_changes`](Self::take_archive_changes).
    pub fn attach_archive(&mut self, store: Arc<dyn JobArchive>) {
        self.archive.attach(store);
    }

    /// What left memory since the last call, for the state machine to write to the archive
    /// before the state is read again.
    pub fn take_archive_changes(&mut self) -> ArchiveChanges {
        self.archive.take()
    }

    /// A job, in memory or ended and archived. For reads: `apply` never reads the archive.
    pub fn find_job(&self, id: &JobId) -> Option<Cow<'_, Job>> {
        match self.job(id) {
            Some(job) => Some(Cow::Borrowed(job)),
            None if self.ended.contains(id) => self.archive.get(id).map(Cow::Owned),
            None => None,
        }
    }

    /// What the state remembers of an ended job that left memory.
    pub fn ended_job(&self, id: &JobId) -> Option<EndedEntry> {
        self.ended.get(id).copied()
    }

    /// A dependency's status, in memory or ended (from the index, never the archive).
    pub(super) fn status_for_dependency(&self, id: &JobId) -> Option<JobStatus> {
        match self.jobs.get(id) {
            Some(job) => Some(job.status),
            None => self.ended.get(id).map(EndedEntry::status),
        }
    }

    /// Whether a job exists, in memory or ended and archived.
    pub fn job_exists(&self, id: &JobId) -> bool {
        self.jobs.contains_key(id) || self.ended.contains(id)
    }

    /// Every ended job that left memory, by id: for checks and tools (it walks the index).
    pub fn ended_job_ids(&self) -> impl Iterator<Item = JobId> + '_ {
        self.ended
            .by_id
            .keys()
            .map(|key| JobId::from(key.text().as_str()))
    }

    /// How many ended jobs left memory (and are not yet forgotten by retention).
    pub fn ended_job_count(&self) -> usize {
        self.ended.len()
    }

    /// The jobs ListJobs lists for a queue, in memory or archived, in submit order: with
    /// `status`, only those; after `(seq, id)` when given.
    pub fn listed_jobs<'a>(
        &'a self,
        queue: &'a str,
        status: Option<JobStatus>,
        after: Option<(u64, JobId)>,
    ) -> Box<dyn Iterator<Item = Cow<'a, Job>> + 'a> {
        let start = after.clone();
        let live = self
            .jobs_in_queue(queue, status)
            .filter(|j| j.listed_in_queue())
            .filter(move |j| {
                start
                    .as_ref()
                    .is_none_or(|(s, id)| (j.seq, &j.id) > (*s, id))
            })
            .map(Cow::Borrowed);
        // The archive may hold records the index does not (yet) list: written after the
        // snapshot this node started from, until the log replays them. The index decides.
        let archived = |status| {
            self.archive
                .in_queue(queue, status, after.clone())
                .filter(|j| self.ended.contains(&j.id))
        };
        match status {
            Some(s) if s.is_terminal() => Box::new(merge_by_seq(live, archived(s).map(Cow::Owned))),
            Some(_) => Box::new(live),
            None => Box::new(merge_by_seq(
                live,
                merge_by_seq(archived(JobStatus::Succeeded), archived(JobStatus::Failed))
                    .map(Cow::Owned),
            )),
        }
    }

    /// The children of an array job or the nodes of a multi-node job, in memory or
    /// archived, in index order.
    pub fn family_of<'a>(&'a self, parent: &'a JobId) -> Vec<Cow<'a, Job>> {
        if self.jobs.contains_key(parent) {
            return self
                .array_children(parent)
                .chain(self.gang_nodes(parent))
                .map(Cow::Borrowed)
                .collect();
        }
        if !self.ended.contains(parent) {
            return Vec::new();
        }
        self.archive
            .family(parent)
            .into_iter()
            .filter(|j| self.ended.contains(&j.id))
            .map(Cow::Owned)
            .collect()
    }

    /// How many of an array's children have each status: counted from the children in memory,
    /// or from the index once they left it.
    pub fn array_status_counts(&self, parent: &Job) -> BTreeMap<JobStatus, u32> {
        let Some(ArrayRole::Parent { size, .. }) = parent.array else {
            return BTreeMap::new();
        };
        if !self.jobs.contains_key(&parent.id) {
            return self.ended.array_counts(&parent.id, size);
        }
        let mut counts = BTreeMap::new();
        for child in self.array_children(&parent.id) {
            *counts.entry(child.status).or_default() += 1;
        }
        counts
    }

    /// Up to `limit` log streams of archived jobs in `group` whose names start with `prefix`,
    /// by name.
    pub fn archived_streams(
        &self,
        group: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<ArchivedStream> {
        let mut streams: Vec<ArchivedStream> = self
            .archive
            .moved
            .iter()
            .filter(|j| self.log_group_of(j) == group)
            .flat_map(|j| ArchivedStream::of(j))
            .filter(|s| stream_listed(&s.name, prefix, after))
            .collect();
        if let Some(store) = &self.archive.store {
            // The store may still hold streams of jobs a purge just forgot (its writer removes
            // them after the apply): read on until `limit` of the rest, or the end, so that a
            // page is never cut short by them.
            let mut cursor = after.map(str::to_owned);
            let mut kept = 0;
            loop {
                let read = store.streams(group, prefix, cursor.as_deref(), limit);
                let exhausted = read.len() < limit;
                cursor = read.last().map(|s| s.name.clone()).or(cursor);
                for stream in read {
                    if self.ended.contains(&stream.job) {
                        kept += 1;
                        streams.push(stream);
                    }
                }
                if exhausted || kept >= limit {
                    break;
                }
            }
        }
        streams.sort();
        streams.truncate(limit);
        streams
    }

    /// Whether `ArchiveEnded { before }` would move anything now: a family that ended before
    /// `before` and is done (see [`State::family_done`]).
    pub fn has_archivable_before(&self, before: Timestamp) -> bool {
        self.ended_in_memory
            .iter()
            .take_while(|(at, _)| *at < before)
            .any(|(_, root)| self.family_done(root))
    }

    /// Whether a family can leave memory: its root and every member ended, none holds an
    /// attempt (a stopped gang's nodes until their agents report), nothing waits on any.
    fn family_done(&self, root: &JobId) -> bool {
        let done = |job: &Job| {
            job.status.is_terminal()
                && job.active.is_none()
                && !self.dependents.contains_key(&job.id)
        };
        self.jobs.get(root).is_some_and(|j| done(j))
            && self.array_children(root).all(done)
            && self.gang_nodes(root).all(done)
    }

    /// Moves out of memory the families that ended before `before` and are done, oldest
    /// first, starting none once `max_jobs` jobs have moved. Replicated as a command, with
    /// the cutoff the leader chose, so every replica moves the same jobs: the same ones stay
    /// in memory, and an apply that ends ten thousand jobs does not also store them.
    pub(super) fn archive_ended(&mut self, before: Timestamp, max_jobs: u32) -> Outcome {
        let (mut moved, mut more) = (0usize, false);
        // A cursor rather than a list of what is due: a backlog of a million is walked only
        // as far as this command's share of it.
        let mut after: Option<(Timestamp, JobId)> = None;
        loop {
            let next = match &after {
                None => self.ended_in_memory.iter().next(),
                Some(key) => self
                    .ended_in_memory
                    .range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
                    .next(),
            };
            let Some(key) = next.filter(|(at, _)| *at < before).cloned() else {
                break;
            };
            after = Some(key.clone());
            let root = &key.1;
            if !self.jobs.contains_key(root) {
                self.ended_in_memory.remove(&key);
                continue;
            }
            if !self.family_done(root) {
                continue;
            }
            if moved >= max_jobs as usize {
                more = true;
                break;
            }
            self.ended_in_memory.remove(&key);
            let members: Vec<JobId> = self
                .array_children(root)
                .chain(self.gang_nodes(root))
                .map(|j| j.id.clone())
                .collect();
            for id in std::iter::once(root.clone()).chain(members) {
                let Some(job) = self.jobs.remove(&id) else {
                    continue;
                };
                if let Some(set) = self.jobs_by_queue.get_mut(&job.spec.queue) {
                    set.remove(&(job.seq, job.id.clone()));
                }
                self.ended.insert(&job);
                self.archive.push(job);
                moved += 1;
            }
        }
        Outcome::Archived { jobs: moved, more }
    }
}

/// The key of an ended family's root in `ended_in_memory` (its root's end: the children of an
/// array terminated while some ran may end later, and leave with it once they have): `None` for a job that has not
/// ended, and for an array child or a node (which move with their root).
pub(super) fn ended_root_key(job: &Job) -> Option<(Timestamp, JobId)> {
    let member = job.array_parent().is_some() || job.gang_node().is_some();
    (job.status.is_terminal() && !member)
        .then(|| (job.stopped_at.unwrap_or_default(), job.id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_pack_and_read_back_as_the_same_text() {
        for id in [
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950e:0",
            "0f8fad5b-d9cb-469f-a165-70867728950e:9999",
            "0f8fad5b-d9cb-469f-a165-70867728950e#3",
        ] {
            let key = EndedKey::of(id);
            assert!(matches!(key, EndedKey::Packed(..)), "{id} not packed");
            assert_eq!(key.text(), id);
        }
        for id in [
            "job-1",
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
            "0f8fad5b-d9cb-469f-a165-70867728950e:01",
            "0f8fad5b-d9cb-469f-a165-70867728950e:x",
            "0f8fad5b-d9cb-469f-a165-70867728950e:+1",
            "0f8fad5b-d9cb-469f-a165-70867728950e:-1",
            "0f8fad5b-d9cb-469f-a165-70867728950e:",
            "0f8fad5b-d9cb-469f-a165-70867728950e/1",
            "0f8fad5bxd9cb-469f-a165-70867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950",
        ] {
            let key = EndedKey::of(id);
            assert!(matches!(key, EndedKey::Text(_)), "{id} packed");
            assert_eq!(key.text(), id);
        }
        assert_eq!(std::mem::size_of::<EndedKey>(), 24);
    }

    #[test]
    fn an_archived_arrays_counts_take_its_children_alone() {
        let entry = |succeeded| EndedEntry {
            stopped_at: Timestamp(1),
            array_size: 0,
            succeeded,
            gang_node: false,
        };
        let mut index = EndedIndex::default();
        let mut add = |id: &str, succeeded| {
            index.by_id.insert(EndedKey::of(id), entry(succeeded));
        };
        let parent = "0f8fad5b-d9cb-469f-a165-70867728950e";
        // Its neighbours in key order: a node of its own, and the next id's children.
        let next = "0f8fad5b-d9cb-469f-a165-70867728950f";
        add(parent, false);
        for (index, succeeded) in [true, false, true, true].into_iter().enumerate() {
            add(&format!("{parent}:{index}"), succeeded);
        }
        add(&format!("{parent}#0"), false);
        add(next, true);
        add(&format!("{next}:0"), false);
        // And an id that does not pack, counted one child at a time.
        add("arr", true);
        add("arr:0", false);
        add("arr:1", true);
        add("arr:10", true);

        assert_eq!(
            index.array_counts(&JobId::from(parent), 4),
            BTreeMap::from([(JobStatus::Succeeded, 3), (JobStatus::Failed, 1)])
        );
        assert_eq!(
            index.array_counts(&JobId::from("arr"), 2),
            BTreeMap::from([(JobStatus::Succeeded, 1), (JobStatus::Failed, 1)])
        );
    }
}
