//! Group commit: requests that arrive at one node while its previous batches are being
//! committed go out together as one Raft entry. A thousand agents reporting, or sixty-four
//! clients submitting, then cost one log append, one fsync on each replica and (on a follower)
//! one forward to the leader per batch instead of per request.
//!
//! A few batches are in flight at once, so that a batch waits for room in the pipeline, not
//! for the whole commit of the one before it (an entry's commit is mostly waiting: fsyncs on
//! three replicas and a network round trip). Batches in flight may commit in any order; what
//! must stay in order is sent as one group, which is never split between entries.

use muster_core::{Command, Outcome};
use muster_raft::RaftNode;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Items that go into the log together and in this order, the size they add to the entry,
/// and who to tell how that went.
struct Pending<T> {
    items: Vec<T>,
    bytes: usize,
    done: oneshot::Sender<Result<Vec<Outcome>, String>>,
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
                let (mut items, mut bytes) = (first.items.len(), first.bytes);
                let mut batch = vec![first];
                while items < limits.items {
                    match arrivals.try_recv() {
                        Ok(more)
                            if items + more.items.len() > limits.items
                                || bytes + more.bytes > limits.bytes =>
                        {
                            held = Some(more);
                            break;
                        }
                        Ok(more) => {
                            items += more.items.len();
                            bytes += more.bytes;
                            batch.push(more);
                        }
                        Err(_) => break,
                    }
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
                            let result = result.map_err(|e| e.to_string());
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
    pub(crate) async fn commit(&self, item: T, bytes: usize) -> Result<Outcome, String> {
        let mut outcomes = self.commit_in_order(vec![item], bytes).await?;
        outcomes.pop().ok_or_else(|| SHUTTING_DOWN.to_owned())
    }

    /// Queues `items` (`bytes` long together) to go into one entry in this order, and waits
    /// until it is committed and applied: one outcome per item.
    pub(crate) async fn commit_in_order(
        &self,
        items: Vec<T>,
        bytes: usize,
    ) -> Result<Vec<Outcome>, String> {
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Pending { items, bytes, done })
            .await
            .map_err(|_| SHUTTING_DOWN.to_owned())?;
        outcome.await.map_err(|_| SHUTTING_DOWN.to_owned())?
    }
}

const SHUTTING_DOWN: &str = "this control node is shutting down";
