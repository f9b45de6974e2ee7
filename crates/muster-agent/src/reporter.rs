//! Talking to the control plane: cached channels to every control node, and reports that
//! are retried until some node accepts them.

use muster_proto::pb::agent_service_client::AgentServiceClient;
use muster_proto::pb::{AttemptExited, AttemptReport, AttemptRunning, attempt_report};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone)]
pub(crate) struct ControlClient {
    pub addrs: Vec<String>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl ControlClient {
    pub fn new(addrs: Vec<String>) -> Self {
        Self {
            addrs,
            channels: Arc::default(),
        }
    }

    pub fn client(&self, addr: &str) -> Option<AgentServiceClient<Channel>> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Some(AgentServiceClient::new(ch.clone()));
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        channels.insert(addr.to_owned(), ch.clone());
        Some(AgentServiceClient::new(ch))
    }
}

pub(crate) enum Event {
    Running,
    Exited {
        exit_code: Option<i32>,
        reason: Option<String>,
    },
}

/// Sends one attempt report, trying every control node in turn until one accepts it (any
/// node forwards to the leader). Reports are idempotent, so resending after an unknown
/// outcome is safe. Gives up only when the control plane refuses the report outright or the
/// agent shuts down.
pub(crate) async fn report(
    control: &ControlClient,
    node_id: &str,
    job: &str,
    attempt: u32,
    event: Event,
    shutdown: &watch::Receiver<bool>,
) {
    let event = match event {
        Event::Running => attempt_report::Event::Running(AttemptRunning {}),
        Event::Exited { exit_code, reason } => {
            attempt_report::Event::Exited(AttemptExited { exit_code, reason })
        }
    };
    let request = AttemptReport {
        node_id: node_id.to_owned(),
        job_id: job.to_owned(),
        attempt,
        event: Some(event),
    };
    loop {
        for addr in &control.addrs {
            let Some(mut client) = control.client(addr) else {
                continue;
            };
            match client.report_attempt(request.clone()).await {
                Ok(_) => return,
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    tracing::warn!(job, attempt, error = %status.message(), "report refused");
                    return;
                }
                Err(status) => {
                    tracing::debug!(job, attempt, addr, error = %status, "report not delivered")
                }
            }
        }
        if *shutdown.borrow() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
