//! A simulated agent: the real agent's protocol and safety rules, with jobs that "run" by
//! sleeping in simulated time. It registers, heartbeats every control node and counts only a
//! quorum-holding leader's answers to heartbeats as contact (from when each was sent; never
//! a message on the assignment stream), follows a newer leader named in those answers,
//! watches its assignments from the leader and reconciles each set (fencing sets of older
//! terms), stops every attempt once cut off for `STOP_AFTER`, and keeps attempt records on a
//! disk that survives its crashes, so that a restart reports what it lost and never runs an
//! attempt again. Every run is recorded with its simulated start and stop.

use super::control;
use super::records::{Records, Run, now};
use muster_proto::LEADER_METADATA_KEY;
use muster_proto::pb::agent_service_client::AgentServiceClient;
use muster_proto::pb::{
    AttemptExited, AttemptReport, AttemptReports, AttemptRunning, HeartbeatRequest, Inventory,
    RegisterRequest, Resources, WatchRequest, attempt_report::Event,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

/// The real agent's defaults.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
pub const STOP_AFTER: Duration = Duration::from_secs(20);
const STREAM_SILENCE: Duration = Duration::from_secs(15);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Each agent offers 8 vCPUs and 16 GiB; a job takes 1 vCPU and 256 MiB.
const MILLICPUS: u64 = 8000;
const MEMORY_MIB: u64 = 16384;

type Key = (String, u32);

struct Agent {
    name: String,
    addrs: Vec<String>,
    records: Records,
    last_contact: Mutex<Instant>,
    /// The agent address and term of the last quorum-holding leader that answered.
    leader_seen: watch::Sender<Option<(String, u64)>>,
    running: Mutex<BTreeMap<Key, JoinHandle<()>>>,
    /// The latest assignment set: what was held back while cut off starts from it.
    desired: Mutex<BTreeMap<Key, Vec<String>>>,
    reports: mpsc::UnboundedSender<AttemptReport>,
}

fn client(addr: &str) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(super::net::agent_channel(addr))
}

fn inventory(name: &str) -> Inventory {
    Inventory {
        capacity: Some(Resources {
            millicpus: MILLICPUS,
            memory_mib: MEMORY_MIB,
            gpus: 0,
        }),
        hostname: name.to_owned(),
        address: name.to_owned(),
        executor: "process".into(),
        gpus: Vec::new(),
        labels: Default::default(),
        log_address: String::new(),
    }
}

fn exited(code: Option<i32>, reason: Option<&str>) -> Event {
    Event::Exited(AttemptExited {
        exit_code: code,
        reason: reason.map(str::to_owned),
    })
}

impl Agent {
    fn report(&self, key: &Key, event: Event) {
        let _ = self.reports.send(AttemptReport {
            node_id: self.name.clone(),
            job_id: key.0.clone(),
            attempt: key.1,
            event: Some(event),
        });
    }

    fn touch(&self, at: Instant) {
        let mut last = self.last_contact.lock().unwrap();
        *last = (*last).max(at);
    }

    /// Records the end of this agent's open run of `key`.
    fn close_run(&self, key: &Key, exit_code: Option<i32>) {
        let mut shared = self.records.lock();
        if let Some(run) = shared.runs.iter_mut().rev().find(|r| {
            r.agent == self.name && r.job == key.0 && r.attempt == key.1 && r.stopped.is_none()
        }) {
            run.stopped = Some(now());
            run.exit_code = exit_code;
        }
        let disk = shared.agent_disks.entry(self.name.clone()).or_default();
        disk.started
            .insert(key.clone(), Some(exit_code.unwrap_or(-1)));
    }

    fn start(self: &Arc<Self>, key: Key, command: &[String]) {
        let millis: u64 = command.get(1).and_then(|m| m.parse().ok()).unwrap_or(1000);
        let code: i32 = command.get(2).and_then(|c| c.parse().ok()).unwrap_or(0);
        {
            let mut shared = self.records.lock();
            // Written before the run starts, as the real agent fsyncs its attempt record.
            shared
                .agent_disks
                .entry(self.name.clone())
                .or_default()
                .started
                .insert(key.clone(), None);
            shared.runs.push(Run {
                agent: self.name.clone(),
                job: key.0.clone(),
                attempt: key.1,
                started: now(),
                stopped: None,
                exit_code: None,
            });
        }
        self.report(&key, Event::Running(AttemptRunning {}));
        let agent = self.clone();
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            agent.running.lock().unwrap().remove(&task_key);
            agent.close_run(&task_key, Some(code));
            agent.report(&task_key, exited(Some(code), None));
        });
        self.running.lock().unwrap().insert(key, task);
    }

    fn stop(&self, key: &Key, why: &str) {
        let task = self.running.lock().unwrap().remove(key);
        if let Some(task) = task {
            task.abort();
            self.close_run(key, None);
            self.report(key, exited(None, Some(why)));
        }
    }

    fn cut_off(&self) -> bool {
        self.records.bug != super::Bug::AgentIgnoresCutOff
            && self.last_contact.lock().unwrap().elapsed() > STOP_AFTER
    }

    /// Starts what the set names and this agent never started (nothing while it is cut off);
    /// stops what it no longer names.
    fn reconcile(self: &Arc<Self>, desired: &BTreeMap<Key, Vec<String>>) {
        *self.desired.lock().unwrap() = desired.clone();
        let cut_off = self.cut_off();
        let running: Vec<Key> = self.running.lock().unwrap().keys().cloned().collect();
        for key in running.iter().filter(|k| !desired.contains_key(*k)) {
            self.stop(key, "no longer assigned");
        }
        for (key, command) in desired {
            let known = self
                .records
                .lock()
                .agent_disks
                .get(&self.name)
                .is_some_and(|d| d.started.contains_key(key));
            if !known && !cut_off {
                self.start(key.clone(), command);
            }
        }
    }

    async fn register(&self) {
        let mut turn = 0;
        loop {
            let addr = &self.addrs[turn % self.addrs.len()];
            turn += 1;
            let mut client = client(addr);
            let call = client.register(RegisterRequest {
                node_id: self.name.clone(),
                compute_environment: super::workload::ENVIRONMENT.into(),
                inventory: Some(inventory(&self.name)),
            });
            if let Ok(Ok(_)) = tokio::time::timeout(CALL_TIMEOUT * 5, call).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn heartbeats(self: Arc<Self>) {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            // As the real agent: every node at once, contact from when the heartbeat left.
            let sent_at = Instant::now();
            let name = self.name.as_str();
            let answers = futures::future::join_all(self.addrs.iter().map(|addr| async move {
                let mut client = client(addr);
                let call = client.heartbeat(HeartbeatRequest {
                    node_id: name.to_owned(),
                    inventory: Some(inventory(name)),
                    unhealthy: None,
                });
                (
                    addr,
                    tokio::time::timeout(HEARTBEAT.max(STOP_AFTER / 4), call).await,
                )
            }))
            .await;
            let mut unknown = false;
            for (addr, answer) in answers {
                match answer {
                    Ok(Ok(reply)) if reply.get_ref().leading => {
                        self.touch(sent_at);
                        let seen = Some((addr.clone(), reply.get_ref().term));
                        self.leader_seen.send_if_modified(|was| {
                            let newer = *was != seen;
                            *was = seen.clone();
                            newer
                        });
                    }
                    Ok(Err(status)) if status.code() == tonic::Code::NotFound => unknown = true,
                    _ => {}
                }
            }
            if unknown {
                self.register().await;
            }
        }
    }

    /// Stops every attempt once no quorum-holding leader has been heard from for `STOP_AFTER`.
    async fn lease(self: Arc<Self>) {
        loop {
            tokio::time::sleep(STOP_AFTER / 4).await;
            if !self.cut_off() {
                let desired = self.desired.lock().unwrap().clone();
                self.reconcile(&desired);
            } else {
                let running: Vec<Key> = self.running.lock().unwrap().keys().cloned().collect();
                for key in running {
                    self.stop(&key, "cut off from the control plane");
                }
            }
        }
    }

    async fn report_loop(self: Arc<Self>, mut queued: mpsc::UnboundedReceiver<AttemptReport>) {
        let mut batch = Vec::new();
        let mut turn = 0;
        loop {
            if batch.is_empty() {
                match queued.recv().await {
                    Some(r) => batch.push(r),
                    None => return,
                }
            }
            while let Ok(r) = queued.try_recv() {
                batch.push(r);
            }
            let addr = match self.leader_seen.borrow().clone() {
                Some((addr, _)) if turn % 2 == 0 => addr,
                _ => self.addrs[turn % self.addrs.len()].clone(),
            };
            turn += 1;
            let mut client = client(&addr);
            let call = client.report_attempts(AttemptReports {
                reports: batch.clone(),
            });
            match tokio::time::timeout(CALL_TIMEOUT * 5, call).await {
                Ok(Ok(_)) => batch.clear(),
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    async fn watch(self: Arc<Self>) {
        let mut max_term = 0;
        let mut hint: Option<String> = None;
        let mut turn = 0;
        loop {
            let addr = hint
                .take()
                .or_else(|| self.leader_seen.borrow().clone().map(|(a, _)| a))
                .unwrap_or_else(|| self.addrs[turn % self.addrs.len()].clone());
            turn += 1;
            let mut client = client(&addr);
            let call = client.watch_assignments(WatchRequest {
                node_id: self.name.clone(),
            });
            let mut stream = match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => {
                    hint = status
                        .metadata()
                        .get(LEADER_METADATA_KEY)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                Err(_) => continue,
            };
            let mut described: BTreeMap<Key, Vec<String>> = BTreeMap::new();
            let mut silent_until = Instant::now() + STREAM_SILENCE;
            let mut leader_seen = self.leader_seen.subscribe();
            loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    _ = tokio::time::sleep_until(silent_until) => break,
                    changed = leader_seen.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let seen = leader_seen.borrow_and_update().clone();
                        if let Some((seen_addr, term)) = seen
                            && term > max_term
                            && seen_addr != addr
                        {
                            hint = Some(seen_addr);
                            break;
                        }
                        continue;
                    }
                };
                let Ok(Some(set)) = message else { break };
                // Not contact: the leader's liveness moves only with heartbeats.
                silent_until = Instant::now() + STREAM_SILENCE;
                if set.term < max_term {
                    continue;
                }
                max_term = set.term;
                let mut desired = BTreeMap::new();
                for a in &set.assignments {
                    let key = (a.job_id.clone(), a.attempt);
                    described.insert(key.clone(), a.command.clone());
                    desired.insert(key, a.command.clone());
                }
                let mut complete = true;
                for k in &set.continuing {
                    let key = (k.job_id.clone(), k.attempt);
                    match described.get(&key) {
                        Some(command) => {
                            desired.insert(key, command.clone());
                        }
                        None => complete = false,
                    }
                }
                if !complete {
                    break;
                }
                self.reconcile(&desired);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One incarnation of the agent `name`; turmoil runs it again after a crash.
pub async fn run(name: String, control_ids: Vec<u64>, records: Records) -> turmoil::Result {
    let (reports, queued) = mpsc::unbounded_channel();
    let agent = Arc::new(Agent {
        addrs: control_ids
            .iter()
            .map(|id| control::agent_addr(*id))
            .collect(),
        name: name.clone(),
        records: records.clone(),
        last_contact: Mutex::new(Instant::now()),
        leader_seen: watch::channel(None).0,
        running: Mutex::new(BTreeMap::new()),
        desired: Mutex::new(BTreeMap::new()),
        reports,
    });
    // What an earlier incarnation left: an attempt with no recorded exit was running when the
    // agent died (its process died with it) and is reported lost; every recorded exit is
    // reported again (the control plane ignores what it already has).
    if records.bug == super::Bug::AgentForgetsItsAttempts {
        records.lock().agent_disks.remove(&name);
    }
    let left: Vec<(Key, Option<i32>)> = records
        .lock()
        .agent_disks
        .get(&name)
        .map(|d| d.started.iter().map(|(k, v)| (k.clone(), *v)).collect())
        .unwrap_or_default();
    for (key, exit) in left {
        match exit {
            None => {
                agent.close_run(&key, None);
                agent.report(&key, exited(None, Some("the agent restarted")));
            }
            Some(code) if code >= 0 => agent.report(&key, exited(Some(code), None)),
            Some(_) => agent.report(&key, exited(None, Some("stopped"))),
        }
    }
    tokio::spawn(agent.clone().report_loop(queued));
    agent.register().await;
    tokio::spawn(agent.clone().heartbeats());
    tokio::spawn(agent.clone().lease());
    agent.watch().await;
    Ok(())
}
