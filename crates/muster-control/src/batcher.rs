//! Group commit: requests that arrive at one node while its previous batches are being
//! committed go out together as one Raft entry. A thousand agents reporting, or sixty-four
//! clients submitting, then cost one log append, one fsync on each replica and (on a follower)
//! one forward to the leader per batch instead of per request.
//!
//! A few batches are in flight at once, so that a batch waits for room in the pipeline, not
//! for the whole commit of the one before it (an entry's commit is mostly waiting: fsyncs on
//! three replicas and a network round trip). Batches in flight may commit in any order; what
//! must stay in order is sent as one group, which is never split between entries.

use muster_api::PlaneError;
use muster_core::{Command, Outcome};
use muster_raft::RaftNode;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Items that go into the log together and in this order, the size they add to the entry,
/// and who to tell how that went.
struct Pending<T> {
    items: Vec<T>,
    bytes: usize,
    done: oneshot::Sender<Result<Vec<Outcome>, PlaneError>>,
}

/// How large one batch may grow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    /// Items; a larger group goes out alone.
    pub items: usize,
    /// Encoded bytes; a larger group goes out alone.
    pub bytes: usize,
    /// Batches being committed at the same time.
    pub in_flight: usize,
}

/// Commits items of one kind in batches; see the module docs.
pub(crate) struct Batcher<T> {
    queue: mpsc::Sender<Pending<T>>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the committing task. `command` makes one entry of the items that arrived
    /// together, within `limits`; when the entry's outcome is [`Outcome::Each`] with one
    /// outcome per item, each item gets its own, otherwise all get the batch's.
    pub(crate) fn spawn(
        node: RaftNode,
        name: &'static str,
        limits: BatchLimits,
        command: impl Fn(Vec<T>) -> Command + Send + Sync + 'static,
    ) -> Self {
        let (queue, mut arrivals) = mpsc::channel::<Pending<T>>(limits.items);
        let command = Arc::new(command);
        tokio::spawn(async move {
            let pipeline = Arc::new(Semaphore::new(limits.in_flight.max(1)));
            // A group that did not fit the previous batch opens the next one.
            let mut held: Option<Pending<T>> = None;
            loop {
                // Waiting for room first lets what arrives meanwhile gather into one batch.
                let Ok(room) = pipeline.clone().acquire_owned().await else {
                    break;
                };
                let first = match held.take() {
                    Some(p) => p,
                    None => match arrivals.recv().await {
                        Some(p) => p,
                        None => break,
                    },
                };
                let batch = gather(first, &mut arrivals, &mut held, limits);
                let abandoned = batch.abandoned;
                if abandoned > 0 {
                    metrics::counter!("muster_batch_abandoned_total", "kind" => name)
                        .increment(abandoned as u64);
                }
                let (batch, items) = (batch.pending, batch.items);
                if batch.is_empty() {
                    continue;
                }
                metrics::histogram!("muster_batch_size", "kind" => name).record(items as f64);
                let (node, command) = (node.clone(), command.clone());
                tokio::spawn(async move {
                    let mut groups = Vec::with_capacity(batch.len());
                    let mut all = Vec::with_capacity(items);
                    for pending in batch {
                        groups.push((pending.items.len(), pending.done));
                        all.extend(pending.items);
                    }
                    let outcome = node.propose(command(all)).await;
                    drop(room);
                    match outcome {
                        Ok(Outcome::Each(outcomes)) if outcomes.len() == items => {
                            let mut outcomes = outcomes.into_iter();
                            for (len, done) in groups {
                                let _ = done.send(Ok(outcomes.by_ref().take(len).collect()));
                            }
                        }
                        result => {
                            let result = result.map_err(crate::plane::plane_error);
                            for (len, done) in groups {
                                let _ = done.send(result.clone().map(|o| vec![o; len]));
                            }
                        }
                    }
                });
            }
        });
        Self { queue }
    }

    /// Queues `item` (`bytes` long once encoded) and waits until the entry it went out in is
    /// committed and applied.
    pub(crate) async fn commit(&self, item: T, bytes: usize) -> Result<Outcome, PlaneError> {
        let mut outcomes = self.commit_in_order(vec![item], bytes).await?;
        outcomes.pop().ok_or_else(shutting_down)
    }

    /// Queues `items` (`bytes` long together) to go into one entry in this order, and waits
    /// until it is committed and applied: one outcome per item.
    pub(crate) async fn commit_in_order(
        &self,
        items: Vec<T>,
        bytes: usize,
    ) -> Result<Vec<Outcome>, PlaneError> {
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Pending { items, bytes, done })
            .await
            .map_err(|_| shutting_down())?;
        outcome.await.map_err(|_| shutting_down())?
    }
}

/// What goes out as one entry.
struct Gathered<T> {
    pending: Vec<Pending<T>>,
    items: usize,
    /// Groups left out because their callers stopped waiting.
    abandoned: usize,
}

/// Takes `first` and whatever else has arrived, within `limits`; a group that would overflow
/// the batch is put in `held` to open the next one. A group whose caller stopped waiting (its
/// deadline passed, its connection closed) is left out: it was never answered, so its caller
/// sends it again if it still wants it, and committing it as well would only apply it twice.
/// Under overload this is what keeps retries from doubling the work: an agent's reports that
/// waited past its deadline come back in its next call.
fn gather<T>(
    first: Pending<T>,
    arrivals: &mut mpsc::Receiver<Pending<T>>,
    held: &mut Option<Pending<T>>,
    limits: BatchLimits,
) -> Gathered<T> {
    let mut gathered = Gathered {
        pending: Vec::new(),
        items: 0,
        abandoned: 0,
    };
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(more) = next.take() {
        if more.done.is_closed() {
            gathered.abandoned += 1;
        } else if !gathered.pending.is_empty()
            && (gathered.items + more.items.len() > limits.items
                || bytes + more.bytes > limits.bytes)
        {
            *held = Some(more);
            break;
        } else {
            gathered.items += more.items.len();
            bytes += more.bytes;
            gathered.pending.push(more);
        }
        if gathered.items < limits.items {
            next = arrivals.try_recv().ok();
        }
    }
    gathered
}

/// A batch that will never be sent: the node stops (the caller may go to another).
fn shutting_down() -> PlaneError {
    PlaneError::Unavailable("this control node is shutting down".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BatchLimits = BatchLimits {
        items: 4,
        bytes: 1_000,
        in_flight: 1,
    };

    /// A group of `items`, and the receiver its caller waits on.
    fn group(
        items: Vec<u32>,
    ) -> (
        Pending<u32>,
        oneshot::Receiver<Result<Vec<Outcome>, PlaneError>>,
    ) {
        let (done, waiting) = oneshot::channel();
        let bytes = items.len() * 10;
        (Pending { items, bytes, done }, waiting)
    }

    fn items(gathered: &Gathered<u32>) -> Vec<u32> {
        gathered
            .pending
            .iter()
            .flat_map(|p| p.items.clone())
            .collect()
    }

    #[test]
    fn groups_whose_callers_stopped_waiting_are_left_out() {
        let (queue, mut arrivals) = mpsc::channel(16);
        let (first, _first_waits) = group(vec![1]);
        let (gave_up, gone) = group(vec![2, 3]);
        drop(gone);
        let (last, _last_waits) = group(vec![4]);
        queue.try_send(gave_up).ok().unwrap();
        queue.try_send(last).ok().unwrap();
        let mut held = None;
        let gathered = gather(first, &mut arrivals, &mut held, LIMITS);
        assert_eq!(items(&gathered), vec![1, 4]);
        assert_eq!((gathered.items, gathered.abandoned), (2, 1));
        assert!(held.is_none());

        // Even a batch's first group.
        let (alone, gone) = group(vec![5]);
        drop(gone);
        let gathered = gather(alone, &mut arrivals, &mut held, LIMITS);
        assert!(gathered.pending.is_empty());
        assert_eq!(gathered.abandoned, 1);
    }

    #[test]
    fn a_group_that_would_overflow_opens_the_next_batch_and_a_large_one_goes_alone() {
        let (queue, mut arrivals) = mpsc::channel(16);
        let (first, _a) = group(vec![1, 2, 3]);
        let (overflows, _b) = group(vec![4, 5]);
        queue.try_send(overflows).ok().unwrap();
        let mut held = None;
        let gathered = gather(first, &mut arrivals, &mut held, LIMITS);
        assert_eq!(items(&gathered), vec![1, 2, 3]);
        let next = held.take().expect("held for the next batch");
        assert_eq!(next.items, vec![4, 5]);

        let (large, _c) = group(vec![6, 7, 8, 9, 10]);
        let gathered = gather(large, &mut arrivals, &mut held, LIMITS);
        assert_eq!(items(&gathered), vec![6, 7, 8, 9, 10]);
    }
}
