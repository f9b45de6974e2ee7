//! The agent's main loops: register, heartbeat, watch assignments, run attempts.

use crate::attempt::run_attempt;
use crate::backoff::Backoff;
use crate::executor::{DockerExecutor, Executor, ProcessExecutor};
use crate::heartbeat::{SeenLeader, heartbeat_loop};
use crate::lease::Lease;
use crate::logs::serve_logs;
use crate::reporter::{ControlClient, Reporter};
use crate::{AgentConfig, ExecutorKind, inventory};
use muster_core::Assignment;
use muster_proto::pb::{AssignmentSet, RegisterRequest, WatchRequest};
use muster_proto::{LEADER_METADATA_KEY, assignment_from_pb, inventory_to_pb};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// An assignment stream that says nothing for this long is presumed dead and reopened
/// (the leader resends every few seconds).
const STREAM_SILENCE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the docker executor needs a Docker engine: {0}")]
    Docker(String),
    #[error("cannot use the work directory: {0}")]
    WorkDir(std::io::Error),
    #[error(
        "log_listen_addr: cannot listen for log reads on {0}: {1} (another agent on this host? give each its own log_listen_addr)"
    )]
    LogListener(std::net::SocketAddr, std::io::Error),
    #[error(transparent)]
    Join(#[from] crate::join::JoinError),
}

pub struct Agent {
    config: AgentConfig,
    /// How long attempts may run on without contact with a quorum-holding leader.
    lease: Arc<Lease>,
    /// Found once at start: GPUs do not come and go while the agent runs.
    gpus: Vec<muster_core::GpuDevice>,
    executor: Arc<Executor>,
    control: ControlClient,
    /// Bound at start; served by [`Agent::run`].
    log_listener: std::sync::Mutex<Option<tokio::net::TcpListener>>,
    /// Where control nodes reach this agent's log service.
    log_address: String,
}

/// One attempt this agent started.
struct Slot {
    /// Set to `true` to stop the attempt.
    stop: watch::Sender<bool>,
    /// The attempt ended and its exit was reported.
    done: Arc<AtomicBool>,
}

impl Agent {
    pub async fn new(config: AgentConfig) -> Result<Self, AgentError> {
        // The lease file, attempt records and logs all live here: it exists from the start.
        std::fs::create_dir_all(&config.work_dir).map_err(AgentError::WorkDir)?;
        let config = crate::join::ensure_identity(config).await?;
        let executor = executor_for(&config).await?;
        let control = ControlClient::new(
            config.control_plane.clone(),
            config
                .tls
                .as_ref()
                .map(|id| id.client_tls(muster_tls::CONTROL_SERVER_NAME)),
        )
        .remembering_in(config.work_dir.join("control_plane.json"));
        let log_listener = tokio::net::TcpListener::bind(config.log_listen_addr)
            .await
            .map_err(|e| AgentError::LogListener(config.log_listen_addr, e))?;
        let bound = log_listener
            .local_addr()
            .map_err(|e| AgentError::LogListener(config.log_listen_addr, e))?;
        let log_address = match &config.log_advertise_address {
            Some(a) => a.clone(),
            None if bound.ip().is_unspecified() => {
                format!("{}:{}", inventory::hostname(), bound.port())
            }
            None => bound.to_string(),
        };
        Ok(Self {
            log_listener: std::sync::Mutex::new(Some(log_listener)),
            log_address,
            lease: Arc::new(Lease::new(&config)),
            config,
            gpus: inventory::gpus(),
            executor: Arc::new(executor),
            control,
        })
    }

    /// What this agent offers to the cluster.
    pub fn inventory(&self) -> muster_core::NodeInventory {
        let mut inventory = inventory::collect(
            &self.config,
            self.config.private_address.to_string(),
            self.gpus.clone(),
        );
        inventory.log_address = self.log_address.clone();
        inventory
    }

    pub fn executor_kind(&self) -> &'static str {
        self.executor.kind()
    }

    /// Runs until `shutdown` flips to `true`, then stops the attempts it runs.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let listener = self
            .log_listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Control nodes read logs with their certificates; the agent presents its own, which
        // a renewal replaces without a restart.
        let (log_tls, served) = match &self.config.tls {
            Some(identity) => {
                match identity.renewable_server_config(muster_tls::ClientCertificates::Required) {
                    Ok((config, served)) => (Some(config), Some(served)),
                    Err(e) => {
                        tracing::error!(error = %e, "the agent's certificate cannot serve its logs");
                        (None, None)
                    }
                }
            }
            None => (None, None),
        };
        let log_server = listener.map(|l| {
            tokio::spawn(serve_logs(
                self.config.clone(),
                l,
                log_tls,
                shutdown.clone(),
            ))
        });
        // A joined agent renews its own certificate; one whose files an operator manages
        // (`[tls]`) gets new files from the operator.
        let renewal = match (&self.config.join, &self.config.tls) {
            (Some(_), Some(identity)) => Some(tokio::spawn(crate::renewal::keep_renewed(
                self.config.node_id.clone(),
                crate::join::files(&self.config),
                identity.clone(),
                self.control.clone(),
                served,
                shutdown.clone(),
            ))),
            _ => None,
        };
        if !self.register(&shutdown).await {
            return;
        }
        let (leader_seen, seen) = watch::channel(None);
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.config.clone(),
            self.inventory(),
            self.executor.clone(),
            self.control.clone(),
            self.lease.clone(),
            leader_seen,
            shutdown.clone(),
        ));
        // Its own task, so that the lease ends on time whatever the watch loop awaits
        // (a reconnect, the engine's answer while sweeping strays).
        let lease_keeper = tokio::spawn({
            let (lease, shutdown) = (self.lease.clone(), shutdown.clone());
            async move { lease.keep(shutdown).await }
        });
        let control = self.control.clone();
        let reporter = Reporter::spawn(
            &self.config.node_id,
            move || control.channels(),
            Arc::default(),
            shutdown.clone(),
        );
        let mut slots = HashMap::new();
        self.watch_loop(&mut slots, &reporter, seen, shutdown.clone())
            .await;
        for slot in slots.values() {
            let _ = slot.stop.send(true);
        }
        // Give stopped attempts their grace period to end (and try to report it).
        let deadline =
            tokio::time::Instant::now() + self.config.stop_grace + Duration::from_secs(2);
        while slots.values().any(|s| !s.done.load(Ordering::SeqCst))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        heartbeat.abort();
        // Only now: the lease file tells the warden attempts are still covered.
        let _ = lease_keeper.await;
        if let Some(server) = log_server {
            server.abort();
        }
        if let Some(renewal) = renewal {
            renewal.abort();
        }
    }

    /// Registers with any control node; retries until it succeeds or the agent stops.
    async fn register(&self, shutdown: &watch::Receiver<bool>) -> bool {
        let request = RegisterRequest {
            node_id: self.config.node_id.clone(),
            compute_environment: self.config.compute_environment.clone(),
            inventory: Some(inventory_to_pb(&self.inventory())),
        };
        let mut backoff = Backoff::for_control_plane(&self.config.node_id);
        let mut shutdown = shutdown.clone();
        loop {
            for addr in &self.control.addrs() {
                let Some(mut client) = self.control.client(addr) else {
                    continue;
                };
                match client.register(request.clone()).await {
                    Ok(_) => {
                        tracing::info!(node = %self.config.node_id, ce = %self.config.compute_environment, "agent registered");
                        return true;
                    }
                    Err(e) => tracing::warn!(addr, error = %e.message(), "registration failed"),
                }
            }
            if *shutdown.borrow() {
                return false;
            }
            tokio::select! {
                _ = shutdown.changed() => return false,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn watch_loop(
        &self,
        slots: &mut HashMap<(String, u32), Slot>,
        reporter: &Reporter,
        mut leader_seen: watch::Receiver<Option<SeenLeader>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut leader_hint: Option<String> = None;
        let mut backoff = Backoff::for_control_plane(&self.config.node_id);
        let mut next = 0usize;
        let mut max_term = 0u64;
        let mut swept = false;
        let mut expired = self.lease.expired();
        while !*shutdown.borrow() {
            let addr = leader_hint.take().unwrap_or_else(|| {
                next += 1;
                let addrs = self.control.addrs();
                addrs[next % addrs.len()].clone()
            });
            let Some(mut client) = self.control.client(&addr) else {
                continue;
            };
            let request = WatchRequest {
                node_id: self.config.node_id.clone(),
            };
            let mut stream = match client.watch_assignments(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    // A refusal that names the leader is followed at once, but only once in
                    // a row: during an election, nodes may name each other or a leader that
                    // is gone, and a fleet looping on such hints would drown the election.
                    let hint = status
                        .metadata()
                        .get(LEADER_METADATA_KEY)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let pause = backoff.failing();
                    let delay = backoff.next_delay();
                    match hint {
                        Some(hint) if !pause => leader_hint = Some(hint),
                        hint => {
                            leader_hint = hint;
                            tokio::select! {
                                _ = shutdown.changed() => {}
                                _ = tokio::time::sleep(delay) => {}
                            }
                        }
                    }
                    continue;
                }
            };
            tracing::debug!(addr, "watching assignments");
            // What this stream has described: its later sets name these by key only.
            let mut described: HashMap<(String, u32), Assignment> = HashMap::new();
            // Set once per stream and moved only by a message: a timer made afresh on every
            // pass of the loop (which also wakes to check the cut-off) would never fire.
            let mut silent_until = tokio::time::Instant::now() + STREAM_SILENCE;
            // Whether this stream has sent a set yet: before it has, `described` says nothing
            // about what should run.
            let mut got_set = false;
            loop {
                let message = tokio::select! {
                    _ = shutdown.changed() => return,
                    m = stream.message() => m,
                    _ = tokio::time::sleep_until(silent_until) => {
                        tracing::warn!(addr, silent = ?STREAM_SILENCE, "the assignment stream went silent; watching again");
                        break;
                    }
                    _ = expired.changed() => {
                        // Attempts held back while cut off start once contact is back. (Those
                        // running stop by themselves when the lease ends: see `run_attempt`.)
                        if got_set && !*expired.borrow_and_update() {
                            self.reconcile(slots, described.values().cloned().collect(), reporter);
                        }
                        continue;
                    }
                    changed = leader_seen.changed(), if leader_seen.has_changed().is_ok() => {
                        if changed.is_ok()
                            && let Some(seen) = leader_seen.borrow_and_update().clone()
                            && seen.term > max_term
                            && seen.address != addr
                        {
                            // Another control node leads a newer term with a quorum: this
                            // stream's node was deposed or cut off, whether or not it knows.
                            tracing::info!(from = addr, to = seen.address, term = seen.term, "following the newer leader");
                            leader_hint = Some(seen.address);
                            break;
                        }
                        continue;
                    }
                };
                match message {
                    Ok(Some(set)) => {
                        // Not contact (see `heartbeat_loop`): the leader's liveness clock for
                        // this node moves only with heartbeats, and a stream that still
                        // delivers says nothing of whether they arrive.
                        silent_until = tokio::time::Instant::now() + STREAM_SILENCE;
                        backoff.reset();
                        // Fencing: a set from an older leader term is stale.
                        if set.term < max_term {
                            continue;
                        }
                        max_term = set.term;
                        let Some(desired) = desired_set(&set, &mut described) else {
                            tracing::warn!(
                                addr,
                                "an assignment set named an attempt it never described; watching again"
                            );
                            break;
                        };
                        if !swept {
                            // Containers of attempts the leader no longer assigns to this
                            // node (it moved or ended them while the agent was down) go.
                            swept = true;
                            let keep = desired
                                .iter()
                                .map(|a| (a.job.to_string(), a.attempt))
                                .collect();
                            self.executor.remove_strays(&keep).await;
                        }
                        self.reconcile(slots, desired, reporter);
                        got_set = true;
                    }
                    _ => break,
                }
            }
        }
    }

    /// Starts what is newly assigned and stops what is no longer assigned.
    fn reconcile(
        &self,
        slots: &mut HashMap<(String, u32), Slot>,
        desired: Vec<Assignment>,
        reporter: &Reporter,
    ) {
        let wanted: HashMap<(String, u32), Assignment> = desired
            .into_iter()
            .map(|a| ((a.job.to_string(), a.attempt), a))
            .collect();
        slots.retain(|key, slot| {
            if wanted.contains_key(key) {
                return true;
            }
            let _ = slot.stop.send(true);
            !slot.done.load(Ordering::SeqCst)
        });
        // A node cut off starts nothing: the leader may already be retrying these attempts
        // elsewhere. They start when contact is back and they are still assigned.
        let cut_off = self.lease.is_expired();
        for (key, assignment) in wanted {
            if slots.contains_key(&key) || cut_off {
                continue;
            }
            let (stop, stop_rx) = watch::channel(false);
            let done = Arc::new(AtomicBool::new(false));
            tokio::spawn(run_attempt(
                self.executor.clone(),
                reporter.clone(),
                assignment,
                self.log_path(&key),
                stop_rx,
                self.lease.expired(),
                done.clone(),
                self.config.stop_grace,
            ));
            slots.insert(key, Slot { stop, done });
        }
    }

    fn log_path(&self, (job, attempt): &(String, u32)) -> PathBuf {
        crate::logs::attempt_log_path(&self.config.work_dir, job, *attempt)
    }
}

/// The executor `config` names, as this agent's (labelling containers with its identity).
pub(crate) async fn executor_for(config: &AgentConfig) -> Result<Executor, AgentError> {
    Ok(match config.executor {
        ExecutorKind::Docker => Executor::Docker(
            DockerExecutor::connect(&config.compute_environment)
                .await
                .map_err(|e| AgentError::Docker(e.to_string()))?
                .with_owner(agent_identity(&config.work_dir).map_err(AgentError::WorkDir)?)
                .with_pull(config.image_pull, config.image_pull_timeout)
                .with_allowances(config.allowances.clone()),
        ),
        ExecutorKind::Process => {
            Executor::Process(ProcessExecutor::new(Path::new("/sys/fs/cgroup")))
        }
    })
}

/// This agent's identity on its host, made once and kept in `work_dir/agent-id`: the same
/// across restarts, different for every agent (every work directory) sharing the host.
fn agent_identity(work_dir: &std::path::Path) -> std::io::Result<String> {
    let path = work_dir.join("agent-id");
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_owned());
    }
    std::fs::create_dir_all(work_dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = format!("{nanos:x}-{:x}", std::process::id());
    std::fs::write(&path, &id)?;
    Ok(id)
}

/// The attempts `set` asks for: those it describes, and those it names that an earlier set
/// of the stream described (`described`, which is left holding exactly the set). `None` when
/// it names one never described, which a stream never does.
fn desired_set(
    set: &AssignmentSet,
    described: &mut HashMap<(String, u32), Assignment>,
) -> Option<Vec<Assignment>> {
    let mut desired: HashMap<(String, u32), Assignment> = set
        .assignments
        .iter()
        .map(|a| ((a.job_id.clone(), a.attempt), assignment_from_pb(a)))
        .collect();
    for key in &set.continuing {
        let key = (key.job_id.clone(), key.attempt);
        let assignment = described.remove(&key)?;
        desired.insert(key, assignment);
    }
    *described = desired;
    Some(described.values().cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::desired_set;
    use muster_proto::pb::{self, AssignmentSet, AttemptKey};
    use std::collections::HashMap;

    fn described(job: &str, attempt: u32, image: &str) -> pb::Assignment {
        pb::Assignment {
            job_id: job.into(),
            attempt,
            image: image.into(),
            resources: Some(pb::Resources {
                millicpus: 1000,
                memory_mib: 64,
                gpus: 0,
            }),
            ..Default::default()
        }
    }

    fn named(job: &str, attempt: u32) -> AttemptKey {
        AttemptKey {
            job_id: job.into(),
            attempt,
        }
    }

    fn images(desired: Option<Vec<muster_core::Assignment>>) -> Vec<(String, u32, String)> {
        let mut out: Vec<_> = desired
            .expect("a consistent set")
            .into_iter()
            .map(|a| (a.job.to_string(), a.attempt, a.image))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_set_names_what_the_stream_described_before_and_describes_what_is_new() {
        let mut known = HashMap::new();
        let first = AssignmentSet {
            term: 1,
            assignments: vec![described("a", 1, "img-a"), described("b", 1, "img-b")],
            continuing: vec![],
        };
        assert_eq!(
            images(desired_set(&first, &mut known)),
            [
                ("a".into(), 1, "img-a".into()),
                ("b".into(), 1, "img-b".into())
            ]
        );
        // `a` ended, `b` goes on (named only), `c` is new.
        let second = AssignmentSet {
            term: 1,
            assignments: vec![described("c", 2, "img-c")],
            continuing: vec![named("b", 1)],
        };
        assert_eq!(
            images(desired_set(&second, &mut known)),
            [
                ("b".into(), 1, "img-b".into()),
                ("c".into(), 2, "img-c".into())
            ]
        );
        // `a` left the set, so it can no longer be named; a set that does is inconsistent.
        let third = AssignmentSet {
            term: 1,
            assignments: vec![],
            continuing: vec![named("a", 1)],
        };
        assert!(desired_set(&third, &mut known).is_none());
    }
}
