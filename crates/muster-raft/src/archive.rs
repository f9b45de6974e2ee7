//! [`EndedJobs`]: the archive of ended jobs on a control node, over `muster-store`'s
//! [`ArchiveStore`]. The state machine writes what each apply moved out of memory (under the
//! state's write lock, so a reader sees the state and the archive agree), and reads serve
//! DescribeJobs, ListJobs and logs from it.
//!
//! A record is a format byte then JSON `{spec, job, log_group}`; an array child's or a node's
//! spec is left out when it is its parent's (an array's ten thousand children hold one copy).
//!
//! Encoding and writing happen off Raft's threads, on one writer thread per archive, in the
//! order the applies made them: an apply only moves the jobs `ArchiveEnded` took out of the
//! state into an in-memory overlay, which reads consult first, until the writer has stored them (encoding ten thousand
//! jobs that ended together took long enough on Raft's threads to cost the leader its lease).
//! Records a purge forgot are removed by the same writer: the index no longer lists them, so
//! no read finds them meanwhile. A snapshot waits for the writer (see [`EndedJobs::flush`]). A listing
//! key is `queue 0x00 status seq(8 bytes, big-endian) id`, so that ListJobs of a queue and an
//! ended status pages through the keys in submit order. A stream key is `group 0x00 name`, with
//! what DescribeLogStreams lists of that attempt's stream.
//!
//! A snapshot sent to another node carries the records after the image (see
//! [`EndedJobs::append_to`] and [`EndedJobs::import`]).

use muster_core::{
    ArchiveChanges, ArchivedStream, Job, JobArchive, JobId, JobSpec, JobStatus, State,
};
use muster_store::{ArchiveStore, ArchivedKeys, ArchivedRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, RwLock, mpsc};

/// The record format this release writes and reads.
const RECORD_FORMAT: u8 = 1;

/// How many jobs the writer lets out of the overlay per hold of its lock.
const OVERLAY_CHUNK: usize = 256;

#[derive(Serialize)]
struct RecordOf<'a> {
    spec: Option<&'a JobSpec>,
    job: &'a Job,
    /// The log group of its streams, as its definition named it when it ended.
    log_group: &'a str,
}

#[derive(Deserialize)]
struct Record {
    spec: Option<JobSpec>,
    job: Job,
    log_group: String,
}

/// Jobs moved out of memory and not stored yet, with their log groups.
type Overlay = BTreeMap<JobId, (Arc<Job>, Arc<str>)>;

#[derive(Clone, Debug)]
pub struct EndedJobs {
    store: ArchiveStore,
    overlay: Arc<RwLock<Overlay>>,
    writer: Arc<Writer>,
}

/// The writer thread's queue, and the first error it met.
#[derive(Debug)]
struct Writer {
    queue: Mutex<mpsc::Sender<Work>>,
    failed: Arc<Mutex<Option<String>>>,
}

enum Work {
    /// Families moved out of memory, roots first, each job with its log group.
    Store(Vec<(Arc<Job>, Arc<str>)>),
    Forget(Vec<JobId>),
    /// Answered once everything queued before it is done.
    Barrier(mpsc::Sender<()>),
}

fn status_byte(status: JobStatus) -> u8 {
    if status == JobStatus::Succeeded {
        b'S'
    } else {
        b'F'
    }
}

fn listing_prefix(queue: &str, status: JobStatus) -> Vec<u8> {
    let mut key = Vec::with_capacity(queue.len() + 2 + 8 + 48);
    key.extend_from_slice(queue.as_bytes());
    key.push(0);
    key.push(status_byte(status));
    key
}

fn listing_key(job: &Job) -> Option<Vec<u8>> {
    if !job.listed_in_queue() {
        return None;
    }
    let mut key = listing_prefix(&job.spec.queue, job.status);
    key.extend_from_slice(&job.seq.to_be_bytes());
    key.extend_from_slice(job.id.as_str().as_bytes());
    Some(key)
}

fn stream_prefix(group: &str, prefix: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(group.len() + 1 + prefix.len());
    key.extend_from_slice(group.as_bytes());
    key.push(0);
    key.extend_from_slice(prefix.as_bytes());
    key
}

/// The stream keys and values of an ended job's attempts in `group`.
fn stream_entries(job: &Job, group: &str) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    ArchivedStream::of(job)
        .into_iter()
        .map(|stream| {
            let key = stream_prefix(group, &stream.name);
            Ok((key, serde_json::to_vec(&stream).map_err(io::Error::other)?))
        })
        .collect()
}

/// The family root's id of an array child or a node.
fn parent_of(job: &Job) -> Option<JobId> {
    job.array_parent()
        .or_else(|| job.gang_node().map(|(parent, _, _)| parent))
}

fn encode(job: &Job, with_spec: bool, log_group: &str) -> io::Result<Vec<u8>> {
    // Never `\n` or `\t`, which frame records in a snapshot (see `append_to`).
    const { assert!(RECORD_FORMAT != b'\n' && RECORD_FORMAT != b'\t') };
    let mut bytes = vec![RECORD_FORMAT];
    let record = RecordOf {
        spec: with_spec.then_some(&*job.spec),
        job,
        log_group,
    };
    serde_json::to_writer(&mut bytes, &record).map_err(io::Error::other)?;
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> io::Result<Record> {
    match bytes.split_first() {
        Some((&RECORD_FORMAT, body)) => serde_json::from_slice(body).map_err(io::Error::other),
        Some((v, _)) => Err(io::Error::other(format!(
            "archived job has unknown record format {v}"
        ))),
        None => Err(io::Error::other("archived job record is empty")),
    }
}

/// In memory: for tests and simulations.
impl Default for EndedJobs {
    fn default() -> Self {
        Self::in_memory()
    }
}

impl EndedJobs {
    pub fn new(store: ArchiveStore) -> Self {
        let (queue, work) = mpsc::channel();
        let failed = Arc::new(Mutex::new(None));
        let overlay = Arc::new(RwLock::new(Overlay::new()));
        // The writer holds no sender of its queue: it ends once every handle is dropped.
        let worker = Worker {
            store: store.clone(),
            overlay: overlay.clone(),
            failed: failed.clone(),
        };
        std::thread::Builder::new()
            .name("archive-writer".into())
            .spawn(move || worker.run(work))
            .expect("spawn the archive writer");
        Self {
            store,
            overlay,
            writer: Arc::new(Writer {
                queue: Mutex::new(queue),
                failed,
            }),
        }
    }

    fn send(&self, work: Work) {
        let queue = self.writer.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.send(work).is_err() {
            let mut failed = self.writer.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.get_or_insert_with(|| "the archive writer stopped".into());
        }
    }

    /// The first write the writer could not make, if any: the node must stop (as when its
    /// log cannot be written) rather than serve an archive missing what its index lists.
    pub fn failure(&self) -> Option<String> {
        self.writer
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the writer has done everything queued so far.
    fn wait_for_writer(&self) -> io::Result<()> {
        let (answer, done) = mpsc::channel();
        self.send(Work::Barrier(answer));
        done.recv()
            .map_err(|_| io::Error::other("the archive writer stopped"))
    }

    fn overlay(&self) -> std::sync::RwLockReadGuard<'_, Overlay> {
        self.overlay.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn in_memory() -> Self {
        Self::new(ArchiveStore::in_memory())
    }

    /// Takes what an apply moved out of memory (`state`, whose definitions name each job's
    /// log group, is the state they left) into the overlay and queues it for the writer, and
    /// queues what retention purged. Cheap: called under the state's write lock.
    pub fn write(&self, changes: ArchiveChanges, state: &State) {
        if !changes.moved.is_empty() {
            let jobs: Vec<(Arc<Job>, Arc<str>)> = changes
                .moved
                .into_iter()
                .map(|job| {
                    let group: Arc<str> = state.log_group_of(&job).into();
                    (Arc::from(job), group)
                })
                .collect();
            let mut overlay = self.overlay.write().unwrap_or_else(|p| p.into_inner());
            for (job, group) in &jobs {
                overlay.insert(job.id.clone(), (job.clone(), group.clone()));
            }
            drop(overlay);
            self.send(Work::Store(jobs));
        }
        if !changes.purged.is_empty() {
            self.send(Work::Forget(changes.purged));
        }
    }

    fn read(&self, id: &JobId) -> io::Result<Option<Job>> {
        if let Some((job, _)) = self.overlay().get(id) {
            return Ok(Some((**job).clone()));
        }
        Ok(read_stored(&self.store, id)?.map(|(job, _)| job))
    }

    fn read_logged(&self, id: &JobId) -> Option<Job> {
        self.read(id)
            .inspect_err(|e| tracing::error!(job = %id, error = %e, "archived job unreadable"))
            .ok()
            .flatten()
    }

    /// Makes everything queued so far stored and durable (a snapshot that lists ended jobs
    /// counts on their records, and one stored after a purge must not leave its records
    /// behind for good).
    pub fn flush(&self) -> io::Result<()> {
        self.wait_for_writer()?;
        if let Some(e) = self.failure() {
            return Err(io::Error::other(e));
        }
        self.store.flush()
    }

    /// How many records the archive holds.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Appends every record to a snapshot's bytes: one line each, `\n<id>\t<record>` (ids
    /// are UUIDs the API chose, with `:<index>` or `#<index>`: never a tab or a newline).
    /// Written as the store is read, so that a spool file takes an archive of any size.
    pub fn append_to(&self, out: &mut impl io::Write) -> io::Result<()> {
        self.wait_for_writer()?;
        self.store.for_each(|key, value| {
            out.write_all(b"\n")?;
            out.write_all(key)?;
            out.write_all(b"\t")?;
            // Records are compact JSON after their format byte: no raw newline inside.
            out.write_all(value)
        })
    }

    /// Replaces the archive with the records that follow a snapshot's image (`tail`, as
    /// [`EndedJobs::append_to`] wrote it), keeping only those `state` (the image) lists as
    /// ended: the sender's archive may hold jobs that ended after the image, which the log
    /// brings again. Returns how many it kept.
    /// `tail` is read a record at a time: it may be a spool file far larger than memory.
    pub fn import(&self, mut tail: impl io::BufRead, state: &State) -> io::Result<usize> {
        self.wait_for_writer()?;
        self.overlay
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.store.clear()?;
        let mut puts = Vec::new();
        let mut count = 0;
        let mut last_root: Option<(JobId, Arc<JobSpec>)> = None;
        let mut line = Vec::new();
        loop {
            line.clear();
            if tail.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            if line.is_empty() {
                continue;
            }
            let tab = line
                .iter()
                .position(|b| *b == b'\t')
                .ok_or_else(|| io::Error::other("archived record without its key"))?;
            let (key, value) = (&line[..tab], &line[tab + 1..]);
            let Record {
                spec,
                mut job,
                log_group,
            } = decode(value)?;
            if state.ended_job(&job.id).is_none() {
                continue;
            }
            job.spec = match (spec, parent_of(&job)) {
                (Some(spec), _) => Arc::new(spec),
                // A member's spec is its root's, whose key sorts before it: the last root read,
                // or one written already.
                (None, Some(parent)) => match &last_root {
                    Some((id, spec)) if *id == parent => spec.clone(),
                    _ => {
                        self.store.write(std::mem::take(&mut puts), Vec::new())?;
                        self.read(&parent)?
                            .ok_or_else(|| {
                                io::Error::other(format!("archived job {} has no parent", job.id))
                            })?
                            .spec
                    }
                },
                (None, None) => {
                    return Err(io::Error::other(format!(
                        "archived job {} has no spec",
                        job.id
                    )));
                }
            };
            if parent_of(&job).is_none() {
                last_root = Some((job.id.clone(), job.spec.clone()));
            }
            puts.push(ArchivedRecord {
                key: key.to_vec(),
                value: value.to_vec(),
                listing: listing_key(&job),
                streams: stream_entries(&job, &log_group)?,
            });
            count += 1;
            if puts.len() == 10_000 {
                self.store.write(std::mem::take(&mut puts), Vec::new())?;
            }
        }
        self.store.write(puts, Vec::new())?;
        self.store.flush()?;
        Ok(count)
    }
}

/// The writer thread: stores what applies moved out of memory and forgets what retention
/// purged, in the order they were queued.
struct Worker {
    store: ArchiveStore,
    overlay: Arc<RwLock<Overlay>>,
    failed: Arc<Mutex<Option<String>>>,
}

impl Worker {
    fn run(self, work: mpsc::Receiver<Work>) {
        // Behind Raft's threads and the API's when the CPU is short: what waits for the writer
        // stays readable in the overlay, while a heartbeat that waits costs the leader its
        // lease (with the writer at the same priority, a burst of ended jobs on a loaded
        // 2-core machine timed AppendEntries out by the hundred).
        lower_this_threads_priority();
        while let Ok(first) = work.recv() {
            // What queued meanwhile goes into the same batches, up to a barrier or a purge.
            let mut items = vec![first];
            while matches!(items.last(), Some(Work::Store(_))) {
                match work.try_recv() {
                    Ok(next) => items.push(next),
                    Err(_) => break,
                }
            }
            let mut stored = Vec::new();
            let mut rest = Vec::new();
            for item in items {
                match item {
                    Work::Store(jobs) if rest.is_empty() => stored.extend(jobs),
                    other => rest.push(other),
                }
            }
            let mut done = if stored.is_empty() {
                Ok(())
            } else {
                self.store_now(&stored)
            };
            for item in rest {
                let result = match item {
                    Work::Store(jobs) => self.store_now(&jobs),
                    Work::Forget(ids) => self.forget(&ids),
                    Work::Barrier(answer) => {
                        let _ = answer.send(());
                        Ok(())
                    }
                };
                done = done.and(result);
            }
            if let Err(e) = done {
                tracing::error!(error = %e, "archive write failed");
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                failed.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Stores jobs taken into the overlay, then lets them out of it.
    fn store_now(&self, jobs: &[(Arc<Job>, Arc<str>)]) -> io::Result<()> {
        let mut puts = Vec::with_capacity(jobs.len());
        let mut root: Option<Arc<JobSpec>> = None;
        for (job, group) in jobs {
            // Families arrive root first.
            let shares_root = parent_of(job).is_some()
                && root.as_ref().is_some_and(|r| Arc::ptr_eq(r, &job.spec));
            if parent_of(job).is_none() {
                root = Some(job.spec.clone());
            }
            puts.push(ArchivedRecord {
                key: job.id.as_str().as_bytes().to_vec(),
                value: encode(job, !shares_root, group)?,
                listing: listing_key(job),
                streams: stream_entries(job, group)?,
            });
        }
        self.store.write(puts, Vec::new())?;
        // A few hundred at a time: an apply waits for this lock under the state's write lock,
        // and this thread runs at a lower priority, so while it holds the lock for ten thousand
        // removals and is preempted, the whole node waits on it (a priority inversion that
        // timed out AppendEntries by the hundred in the bench).
        for chunk in jobs.chunks(OVERLAY_CHUNK) {
            let mut overlay = self.overlay.write().unwrap_or_else(|p| p.into_inner());
            for (job, _) in chunk {
                // Unless the same job was moved out again since (a node replaying its log).
                if overlay
                    .get(&job.id)
                    .is_some_and(|(o, _)| Arc::ptr_eq(o, job))
                {
                    overlay.remove(&job.id);
                }
            }
        }
        Ok(())
    }

    /// Removes purged records and the keys that point at them.
    fn forget(&self, ids: &[JobId]) -> io::Result<()> {
        for chunk in ids.chunks(OVERLAY_CHUNK) {
            let mut overlay = self.overlay.write().unwrap_or_else(|p| p.into_inner());
            for id in chunk {
                overlay.remove(id);
            }
        }
        for chunk in ids.chunks(10_000) {
            let mut deletes = Vec::with_capacity(chunk.len());
            for id in chunk {
                // Read before anything is removed: a member's spec may be its root's.
                let (listing, streams) = match read_stored(&self.store, id)? {
                    Some((job, group)) => (
                        listing_key(&job),
                        stream_entries(&job, &group)?
                            .into_iter()
                            .map(|(k, _)| k)
                            .collect(),
                    ),
                    None => (None, Vec::new()),
                };
                deletes.push(ArchivedKeys {
                    key: id.as_str().as_bytes().to_vec(),
                    listing,
                    streams,
                });
            }
            self.store.write(Vec::new(), deletes)?;
        }
        Ok(())
    }
}

/// Nice 10 for the calling thread (Linux schedules threads one by one); elsewhere nothing.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; they change only this thread's nice.
    unsafe {
        let thread = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, thread as libc::id_t, 10);
    }
}

/// A stored job and its log group.
fn read_stored(store: &ArchiveStore, id: &JobId) -> io::Result<Option<(Job, String)>> {
    let Some(bytes) = store.get(id.as_str().as_bytes())? else {
        return Ok(None);
    };
    let Record {
        spec,
        mut job,
        log_group,
    } = decode(&bytes)?;
    job.spec = match spec {
        Some(spec) => Arc::new(spec),
        None => {
            let parent = parent_of(&job)
                .ok_or_else(|| io::Error::other(format!("archived job {id} has no spec")))?;
            read_stored(store, &parent)?
                .ok_or_else(|| io::Error::other(format!("archived job {id} has no parent")))?
                .0
                .spec
        }
    };
    Ok(Some((job, log_group)))
}

impl JobArchive for EndedJobs {
    fn streams(
        &self,
        group: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<ArchivedStream> {
        // Those of jobs not stored yet (read first, as in `family`), then those stored.
        let mut streams: Vec<ArchivedStream> = self
            .overlay()
            .values()
            .filter(|(_, job_group)| &**job_group == group)
            .flat_map(|(job, _)| ArchivedStream::of(job))
            .filter(|s| muster_core::stream_listed(&s.name, prefix, after))
            .collect();
        let after_key = after.map(|a| stream_prefix(group, a));
        let found = match self.store.streams_with_prefix(
            &stream_prefix(group, prefix),
            after_key.as_deref(),
            limit,
        ) {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "archived streams unreadable");
                return Vec::new();
            }
        };
        streams.extend(
            found
                .iter()
                .filter_map(|(_, value)| serde_json::from_slice(value).ok()),
        );
        streams.sort();
        streams.dedup();
        streams.truncate(limit);
        streams
    }

    fn get(&self, id: &JobId) -> Option<Job> {
        self.read_logged(id)
    }

    fn in_queue<'a>(
        &'a self,
        queue: &str,
        status: JobStatus,
        after: Option<(u64, JobId)>,
    ) -> Box<dyn Iterator<Item = Job> + 'a> {
        // Those not stored yet, then those stored (a job in both is taken once).
        let waiting = muster_core::listed_in_order(
            self.overlay().values().map(|(job, _)| &**job),
            queue,
            status,
            &after,
        );
        let overlaid: std::collections::BTreeSet<JobId> =
            waiting.iter().map(|j| j.id.clone()).collect();
        let prefix = listing_prefix(queue, status);
        let id_at = prefix.len() + 8;
        let after = after.map(|(seq, id)| {
            let mut key = prefix.clone();
            key.extend_from_slice(&seq.to_be_bytes());
            key.extend_from_slice(id.as_str().as_bytes());
            key
        });
        let stored = self
            .store
            .listing(prefix, after)
            .filter_map(|key| {
                key.inspect_err(|e| tracing::error!(error = %e, "archive listing unreadable"))
                    .ok()
            })
            .filter_map(move |key| {
                let id = JobId::from(std::str::from_utf8(key.get(id_at..)?).ok()?);
                if overlaid.contains(&id) {
                    return None;
                }
                read_stored(&self.store, &id)
                    .inspect_err(
                        |e| tracing::error!(job = %id, error = %e, "archived job unreadable"),
                    )
                    .ok()
                    .flatten()
                    .map(|(job, _)| job)
            });
        Box::new(muster_core::merge_by_seq(stored, waiting.into_iter()))
    }

    fn family(&self, parent: &JobId) -> Vec<Job> {
        let Some(root) = self.read_logged(parent) else {
            return Vec::new();
        };
        // The overlay first, then the store: the writer stores a job before it lets it out of
        // the overlay, a few hundred at a time, so a member that left the overlay meanwhile is
        // in the store; one in both is taken from the overlay.
        let (array, nodes) = (format!("{parent}:"), format!("{parent}#"));
        let mut members: BTreeMap<JobId, Job> = self
            .overlay()
            .range(JobId::from(nodes.as_str())..)
            .take_while(|(id, _)| id.as_str() < format!("{parent};").as_str())
            .filter(|(id, _)| id.as_str().starts_with(&array) || id.as_str().starts_with(&nodes))
            .map(|(id, (job, _))| (id.clone(), (**job).clone()))
            .collect();
        for prefix in [array, nodes] {
            let records = match self.store.with_prefix(prefix.as_bytes()) {
                Ok(records) => records,
                Err(e) => {
                    tracing::error!(job = %parent, error = %e, "archive unreadable");
                    continue;
                }
            };
            for (_, bytes) in records {
                match decode(&bytes) {
                    Ok(Record { spec, mut job, .. }) => {
                        job.spec = spec.map_or_else(|| root.spec.clone(), Arc::new);
                        members.entry(job.id.clone()).or_insert(job);
                    }
                    Err(e) => tracing::error!(job = %parent, error = %e, "archived job unreadable"),
                }
            }
        }
        members.into_values().collect()
    }
}
