//! The order in which a queue offers its RUNNABLE jobs: first in, first out; or, for a queue
//! with a fair-share scheduling policy, the job of the share identifier that has used the
//! least (weighted) next, by scheduling priority then submit order within a share.

use muster_core::{FairsharePolicy, Job, JobQueue, State, Timestamp};

pub(crate) enum QueueOrder<'s> {
    Fifo(Box<dyn Iterator<Item = &'s Job> + 's>),
    FairShare(FairShare<'s>),
}

pub(crate) struct FairShare<'s> {
    pub policy: FairsharePolicy,
    shares: Vec<Share<'s>>,
}

struct Share<'s> {
    name: &'s str,
    jobs: std::iter::Peekable<Box<dyn Iterator<Item = &'s Job> + 's>>,
    /// vCPUs: held now plus past use averaged over the decay half-life.
    usage: f64,
    weight: f64,
    /// Holds vCPU now (counts toward `computeReservation`'s active share identifiers).
    active: bool,
    /// Jobs of this share in a row that found no room this round.
    misses: usize,
}

/// A share identifier whose jobs missed this many times in a row sits out the rest of the
/// round, so that one share's unplaceable jobs do not use up the queue's scan.
const SHARE_MISSES_IN_A_ROW: usize = 16;

impl<'s> QueueOrder<'s> {
    pub fn new(state: &'s State, queue: &'s JobQueue, now: Timestamp) -> Self {
        let policy = queue
            .scheduling_policy_arn
            .as_deref()
            .and_then(|arn| state.scheduling_policy(arn));
        let Some(policy) = policy else {
            return QueueOrder::Fifo(Box::new(state.runnable_jobs(&queue.name)));
        };
        let policy = policy.fairshare_policy();
        let shares = state
            .runnable_by_share(&queue.name)
            .map(|(name, jobs)| {
                let running = state.share_running_millicpus(&queue.name, name);
                let past = state.share_usage(&queue.name, name).map_or(0.0, |u| {
                    u.decayed_to(now, policy.share_decay_seconds) as f64
                        / policy.share_decay_seconds.max(1) as f64
                });
                let jobs: Box<dyn Iterator<Item = &'s Job> + 's> = Box::new(jobs);
                Share {
                    name,
                    jobs: jobs.peekable(),
                    usage: (running as f64 + past) / 1000.0,
                    weight: policy.weight_of(name),
                    active: running > 0,
                    misses: 0,
                }
            })
            .collect();
        QueueOrder::FairShare(FairShare { policy, shares })
    }

    /// The next job to try, or `None` when the queue has no more.
    pub fn next(&mut self) -> Option<&'s Job> {
        match self {
            QueueOrder::Fifo(jobs) => jobs.next(),
            QueueOrder::FairShare(fs) => fs.next(),
        }
    }

    /// Tells the order that `job` was placed, so that its share's usage grows.
    pub fn placed(&mut self, job: &Job) {
        if let QueueOrder::FairShare(fs) = self {
            let share = job.spec.share_identifier.as_deref().unwrap_or_default();
            if let Some(s) = fs.shares.iter_mut().find(|s| s.name == share) {
                s.usage += job.spec.container.resources().vcpus();
                s.active = true;
                s.misses = 0;
            }
        }
    }

    /// Tells the order that `job` found no room.
    pub fn missed(&mut self, job: &Job) {
        if let QueueOrder::FairShare(fs) = self {
            let share = job.spec.share_identifier.as_deref().unwrap_or_default();
            if let Some(s) = fs.shares.iter_mut().find(|s| s.name == share) {
                s.misses += 1;
            }
        }
    }

    /// For a fair-share queue with `computeReservation`, whether a job of an active share
    /// identifier may take `millicpus` more, given the capacity and free vCPU of the queue's
    /// compute environments (computed only when needed): `(computeReservation/100)^active` of it stays for share
    /// identifiers that are not active yet.
    pub fn within_reservation(
        &self,
        job: &Job,
        millicpus: u64,
        capacity_and_free: impl FnOnce() -> (u64, u64),
    ) -> bool {
        let QueueOrder::FairShare(fs) = self else {
            return true;
        };
        if fs.policy.compute_reservation == 0 {
            return true;
        }
        let share = job.spec.share_identifier.as_deref().unwrap_or_default();
        let active: Vec<&Share> = fs.shares.iter().filter(|s| s.active).collect();
        if !active.iter().any(|s| s.name == share) {
            return true;
        }
        let kept = (fs.policy.compute_reservation as f64 / 100.0).powi(active.len() as i32);
        let (capacity, free) = capacity_and_free();
        let used = capacity.saturating_sub(free) + millicpus;
        used as f64 <= capacity as f64 * (1.0 - kept)
    }
}

impl<'s> FairShare<'s> {
    fn next(&mut self) -> Option<&'s Job> {
        let mut pick: Option<usize> = None;
        for i in 0..self.shares.len() {
            let s = &mut self.shares[i];
            if s.misses >= SHARE_MISSES_IN_A_ROW || s.jobs.peek().is_none() {
                continue;
            }
            let better = pick.is_none_or(|p| {
                let (a, b) = (&self.shares[i], &self.shares[p]);
                (a.usage * a.weight)
                    .total_cmp(&(b.usage * b.weight))
                    .then_with(|| a.name.cmp(b.name))
                    .is_lt()
            });
            if better {
                pick = Some(i);
            }
        }
        self.shares[pick?].jobs.next()
    }
}
