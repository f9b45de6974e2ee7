//! The scheduler's view of RUNNABLE jobs, kept by `apply` so that a planning round never
//! scans the whole job table.

use crate::{Job, JobId};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

/// RUNNABLE jobs per queue, twice: in submit order (the FIFO of a queue without a scheduling
/// policy), and per share identifier by scheduling priority then submit order (what fair
/// share draws from). Derived from the jobs; never serialized.
#[derive(Debug, Clone, Default)]
pub(super) struct RunnableIndex {
    fifo: BTreeMap<String, BTreeSet<(u64, JobId)>>,
    by_share: BTreeMap<String, BTreeMap<String, BTreeSet<ShareKey>>>,
}

/// Higher scheduling priority first, then submit order.
type ShareKey = (Reverse<i64>, u64, JobId);

fn share_key(job: &Job) -> ShareKey {
    (
        Reverse(job.spec.scheduling_priority),
        job.seq,
        job.id.clone(),
    )
}

impl RunnableIndex {
    pub fn clear(&mut self) {
        self.fifo.clear();
        self.by_share.clear();
    }

    pub fn insert(&mut self, job: &Job) {
        self.fifo
            .entry(job.spec.queue.clone())
            .or_default()
            .insert((job.seq, job.id.clone()));
        self.by_share
            .entry(job.spec.queue.clone())
            .or_default()
            .entry(job.spec.share_identifier.clone().unwrap_or_default())
            .or_default()
            .insert(share_key(job));
    }

    pub fn remove(&mut self, job: &Job) {
        if let Some(fifo) = self.fifo.get_mut(&job.spec.queue) {
            fifo.remove(&(job.seq, job.id.clone()));
            if fifo.is_empty() {
                self.fifo.remove(&job.spec.queue);
            }
        }
        let share = job.spec.share_identifier.as_deref().unwrap_or_default();
        if let Some(shares) = self.by_share.get_mut(&job.spec.queue) {
            if let Some(set) = shares.get_mut(share) {
                set.remove(&share_key(job));
                if set.is_empty() {
                    shares.remove(share);
                }
            }
            if shares.is_empty() {
                self.by_share.remove(&job.spec.queue);
            }
        }
    }

    pub fn remove_queue(&mut self, queue: &str) {
        self.fifo.remove(queue);
        self.by_share.remove(queue);
    }

    pub fn fifo(&self, queue: &str) -> impl Iterator<Item = &JobId> + '_ {
        self.fifo.get(queue).into_iter().flatten().map(|(_, id)| id)
    }

    pub fn count(&self, queue: &str) -> usize {
        self.fifo.get(queue).map_or(0, BTreeSet::len)
    }

    /// Each share identifier with RUNNABLE jobs in `queue`, its jobs by scheduling priority
    /// (highest first) then submit order.
    pub fn shares(
        &self,
        queue: &str,
    ) -> impl Iterator<Item = (&str, impl Iterator<Item = &JobId> + '_)> + '_ {
        self.by_share
            .get(queue)
            .into_iter()
            .flatten()
            .map(|(share, set)| (share.as_str(), set.iter().map(|(_, _, id)| id)))
    }
}
