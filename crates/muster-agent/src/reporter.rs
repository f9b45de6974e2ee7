//! Talking to the control plane: cached channels to every control node, and reports sent in
//! batches, in order, retried until some node accepts them.

use muster_proto::pb::agent_service_client::AgentServiceClient;
use muster_proto::pb::{
    AttemptExited, AttemptReport, AttemptReports, AttemptRunning, attempt_report,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::{Channel, Endpoint};

/// How often an agent pings each control node over an idle connection, and how long an
/// unanswered ping is given before the connection is dropped.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub(crate) struct ControlClient {
    /// The control nodes' agent addresses: the config's, and those the cluster told last.
    addrs: Arc<std::sync::RwLock<Vec<String>>>,
    /// The config's, always kept: an agent may reach the control nodes through addresses of
    /// its own (a proxy, a NAT) rather than those they advertise.
    configured: Arc<[String]>,
    /// Where the addresses the cluster told are kept across restarts.
    learned_file: Option<std::path::PathBuf>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// `None`: plaintext.
    tls: Option<muster_tls::ClientTls>,
}

impl ControlClient {
    pub fn new(addrs: Vec<String>, tls: Option<muster_tls::ClientTls>) -> Self {
        Self {
            configured: addrs.clone().into(),
            addrs: Arc::new(std::sync::RwLock::new(addrs)),
            learned_file: None,
            channels: Arc::default(),
            tls,
        }
    }

    /// Keeps the addresses the cluster tells in `file`, and starts from those kept there
    /// before (beside the configured ones): an agent restarted after the control nodes it
    /// was configured with were all replaced still finds the cluster.
    pub fn remembering_in(mut self, file: std::path::PathBuf) -> Self {
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(kept) = serde_json::from_str::<Vec<String>>(&text)
        {
            let mut addrs = self.addrs.write().unwrap_or_else(|p| p.into_inner());
            for addr in kept {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
        }
        self.learned_file = Some(file);
        self
    }

    /// The control nodes' agent addresses as now known.
    pub fn addrs(&self) -> Vec<String> {
        self.addrs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The voters' addresses as a leader told them: from now on the control plane is these
    /// and the configured ones (a removed node's address is dropped unless configured).
    pub fn learn(&self, told: &[String]) {
        if told.is_empty() {
            return;
        }
        let mut told = told.to_vec();
        told.sort();
        told.dedup();
        {
            let mut now: Vec<String> = self.configured.to_vec();
            now.extend(
                told.iter()
                    .filter(|a| !self.configured.contains(a))
                    .cloned(),
            );
            let mut addrs = self.addrs.write().unwrap_or_else(|p| p.into_inner());
            if *addrs == now {
                return;
            }
            tracing::info!(was = ?*addrs, now = ?now, "the control plane's members changed");
            *addrs = now;
        }
        if let Some(file) = &self.learned_file
            && let Ok(text) = serde_json::to_string(&told)
        {
            let staged = file.with_extension("new");
            if let Err(e) =
                std::fs::write(&staged, text).and_then(|()| std::fs::rename(&staged, file))
            {
                tracing::warn!(error = %e, path = %file.display(), "cannot keep the control plane's addresses");
            }
        }
    }

    /// A channel to every control node now known.
    pub fn channels(&self) -> Vec<Channel> {
        self.addrs()
            .iter()
            .filter_map(|addr| self.channel(addr))
            .collect()
    }

    /// How this agent dials control nodes over TLS (`None`: plaintext).
    pub fn tls(&self) -> Option<&muster_tls::ClientTls> {
        self.tls.as_ref()
    }

    pub fn client(&self, addr: &str) -> Option<AgentServiceClient<Channel>> {
        self.channel(addr).map(AgentServiceClient::new)
    }

    /// The channel to the control node at `addr` (connected on first use).
    pub fn channel(&self, addr: &str) -> Option<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Some(ch.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(15))
            // A control node that vanished without a reset (stopped, cut off) is noticed by
            // its unanswered pings, and the connection made anew, within seconds.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let ch = match &self.tls {
            Some(tls) => tls.connect_lazy(endpoint),
            None => endpoint.connect_lazy(),
        };
        channels.insert(addr.to_owned(), ch.clone());
        Some(ch)
    }
}

pub enum Event {
    Running,
    Exited {
        exit_code: Option<i32>,
        reason: Option<String>,
    },
}

/// Most reports sent in one call.
const MAX_BATCH: usize = 512;

/// How long to wait after every control node failed a batch before sending it again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Sends an agent's attempt reports in the order they were made, batched: reports made while
/// the previous call is under way go out together in the next call, so an agent whose jobs
/// end together, or a job that starts and ends within one call, costs one call. A RUNNING
/// report is therefore never committed after its attempt's exit, and a batch is retried
/// whole (reports are idempotent) until some control node accepts it (any node forwards to
/// the leader), the control plane refuses it outright, or the agent shuts down.
#[derive(Clone)]
pub struct Reporter {
    node_id: Arc<str>,
    queue: mpsc::UnboundedSender<Queued>,
}

struct Queued {
    report: AttemptReport,
    delivered: oneshot::Sender<bool>,
}

impl Reporter {
    /// Starts the sending task; `channels` gives the control nodes as now known, tried in turn
    /// starting with the one that last accepted a batch. Every call that fails adds one to
    /// `failed_calls`.
    pub fn spawn(
        node_id: &str,
        channels: impl Fn() -> Vec<Channel> + Send + Sync + 'static,
        failed_calls: Arc<AtomicU64>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (queue, arrivals) = mpsc::unbounded_channel();
        tokio::spawn(send_batches(channels, arrivals, failed_calls, shutdown));
        Self {
            node_id: node_id.into(),
            queue,
        }
    }

    /// Queues a report behind every report queued before it. The returned future tells
    /// whether it was delivered (`false`: refused, or the agent stopped first); it need not be
    /// awaited for the report to be sent.
    pub fn report(
        &self,
        job: &str,
        attempt: u32,
        event: Event,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let event = match event {
            Event::Running => attempt_report::Event::Running(AttemptRunning {}),
            Event::Exited { exit_code, reason } => {
                attempt_report::Event::Exited(AttemptExited { exit_code, reason })
            }
        };
        let report = AttemptReport {
            node_id: self.node_id.to_string(),
            job_id: job.to_owned(),
            attempt,
            event: Some(event),
        };
        let (delivered, outcome) = oneshot::channel();
        let queued = self.queue.send(Queued { report, delivered }).is_ok();
        async move { queued && outcome.await.unwrap_or(false) }
    }
}

async fn send_batches(
    channels: impl Fn() -> Vec<Channel> + Send + Sync + 'static,
    mut arrivals: mpsc::UnboundedReceiver<Queued>,
    failed_calls: Arc<AtomicU64>,
    shutdown: watch::Receiver<bool>,
) {
    let mut preferred = 0;
    let mut batch: Vec<Queued> = Vec::new();
    loop {
        if batch.is_empty() {
            match arrivals.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match arrivals.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let mut outcome = None;
        let channels = channels();
        for turn in 0..channels.len() {
            let node = (preferred + turn) % channels.len();
            let mut client = AgentServiceClient::new(channels[node].clone());
            // Built for each try from the queued reports: the call consumes it, and most
            // batches need only the one.
            let request = AttemptReports {
                reports: batch.iter().map(|q| q.report.clone()).collect(),
            };
            match client.report_attempts(request).await {
                Ok(_) => {
                    preferred = node;
                    outcome = Some(true);
                    break;
                }
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    tracing::warn!(error = %status.message(), reports = batch.len(), "reports refused");
                    outcome = Some(false);
                    break;
                }
                Err(status) => {
                    failed_calls.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(node, error = %status, reports = batch.len(), "reports not delivered")
                }
            }
        }
        if outcome.is_none() && *shutdown.borrow() {
            outcome = Some(false);
        }
        match outcome {
            Some(delivered) => {
                for q in batch.drain(..) {
                    let _ = q.delivered.send(delivered);
                }
            }
            // Sent again, with whatever was queued meanwhile behind it.
            None => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
}
