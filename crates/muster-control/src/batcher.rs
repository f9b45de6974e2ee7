//! Group commit: requests that arrive at one node while its previous batch is being committed
//! go out together as one Raft entry. A thousand agents reporting, or sixty-four clients
//! submitting, then cost one log append, one fsync on each replica and (on a follower) one
//! forward to the leader per batch instead of per request.

use muster_core::{Command, Outcome};
use muster_raft::RaftNode;
use tokio::sync::{mpsc, oneshot};

/// An item waiting for the batch it goes out in, its size in the entry, and who to tell how
/// that went.
struct Pending<T> {
    item: T,
    bytes: usize,
    done: oneshot::Sender<Result<Outcome, String>>,
}

/// How large one batch may grow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub items: usize,
    /// Encoded bytes; an item larger than this goes out alone.
    pub bytes: usize,
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
    /// outcome per item, each caller gets its own, otherwise all get the batch's.
    pub(crate) fn spawn(
        node: RaftNode,
        name: &'static str,
        limits: BatchLimits,
        command: impl Fn(Vec<T>) -> Command + Send + 'static,
    ) -> Self {
        let (queue, mut arrivals) = mpsc::channel::<Pending<T>>(limits.items);
        tokio::spawn(async move {
            // An arrival that did not fit the previous batch opens the next one.
            let mut held: Option<Pending<T>> = None;
            loop {
                let first = match held.take() {
                    Some(p) => p,
                    None => match arrivals.recv().await {
                        Some(p) => p,
                        None => break,
                    },
                };
                let mut bytes = first.bytes;
                let mut batch = vec![first];
                while batch.len() < limits.items {
                    match arrivals.try_recv() {
                        Ok(more) if bytes + more.bytes > limits.bytes => {
                            held = Some(more);
                            break;
                        }
                        Ok(more) => {
                            bytes += more.bytes;
                            batch.push(more);
                        }
                        Err(_) => break,
                    }
                }
                metrics::histogram!("muster_batch_size", "kind" => name).record(batch.len() as f64);
                let (items, waiting): (Vec<T>, Vec<_>) =
                    batch.into_iter().map(|p| (p.item, p.done)).unzip();
                match node.propose(command(items)).await {
                    Ok(Outcome::Each(outcomes)) if outcomes.len() == waiting.len() => {
                        for (w, outcome) in waiting.into_iter().zip(outcomes) {
                            let _ = w.send(Ok(outcome));
                        }
                    }
                    result => {
                        let result = result.map_err(|e| e.to_string());
                        for w in waiting {
                            let _ = w.send(result.clone());
                        }
                    }
                }
            }
        });
        Self { queue }
    }

    /// Queues `item` (`bytes` long once encoded) and waits until the entry it went out in is
    /// committed and applied.
    pub(crate) async fn commit(&self, item: T, bytes: usize) -> Result<Outcome, String> {
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Pending { item, bytes, done })
            .await
            .map_err(|_| "this control node is shutting down".to_owned())?;
        outcome
            .await
            .map_err(|_| "this control node is shutting down".to_owned())?
    }
}
