//! The Docker executor (bollard): one container per attempt, labelled with the job id and
//! attempt so that it can be found again.

use super::{AttemptExit, STOPPED_BY_MUSTER, stopped};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, ResourcesUlimits};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder, WaitContainerOptions,
};
use futures::StreamExt;
use muster_core::Assignment;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// What the engine says of a container the agent waited on.
#[derive(Debug, PartialEq, Eq)]
enum Running {
    Yes,
    No,
    /// The engine did not answer before a stop was asked for.
    StopAsked,
}

const STOPPED_WHILE_PULLING: &str = "stopped while the image was pulled";

/// How long an attempt waits for an engine that does not answer before it fails to start.
/// An engine restarting (`systemctl restart docker`) is back in seconds; every attempt placed
/// here in those seconds used to fail at once, and its retries, placed here again before the
/// next heartbeat said the node could not run jobs, failed the same way (the chaos harness's
/// `docker_restart` saw jobs use up three attempts in 50 ms).
pub const ENGINE_WAIT: Duration = Duration::from_secs(30);

/// Whether the engine gave no answer at all (its socket absent or refused, the connection
/// broken or timed out), rather than an answer, or a request that could never be made.
fn engine_silent(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error;
    matches!(
        e,
        Error::IOError { .. }
            | Error::HyperLegacyError { .. }
            | Error::HyperResponseError { .. }
            | Error::SocketNotFoundError(_)
            | Error::RequestTimeoutError
    )
}

/// `host:container[:ro]` for each mount point: a host path, or a Docker volume by name.
fn binds(options: &muster_core::ContainerOptions) -> Vec<String> {
    options
        .mount_points
        .iter()
        .filter_map(|m| {
            let volume = options.volumes.iter().find(|v| v.name == m.source_volume)?;
            let source = volume
                .host_path
                .clone()
                .unwrap_or_else(|| volume.name.clone());
            let mode = if m.read_only { ":ro" } else { "" };
            Some(format!("{source}:{}{mode}", m.container_path))
        })
        .collect()
}

/// Docker's `rwm` form of `READ`, `WRITE`, `MKNOD` (all three when none are given).
fn device_permissions(permissions: &[String]) -> String {
    if permissions.is_empty() {
        return "rwm".to_owned();
    }
    ["READ", "WRITE", "MKNOD"]
        .iter()
        .zip(['r', 'w', 'm'])
        .filter(|(name, _)| permissions.iter().any(|p| p == *name))
        .map(|(_, letter)| letter)
        .collect()
}

/// The container of attempt `attempt` of `job`: one name per attempt, so a restarted agent
/// finds it again.
/// Docker names allow `[a-zA-Z0-9_.-]`: an array child's `:` becomes `-`, a multi-node job's
/// node's `#` becomes `_` (the two never meet in one id).
fn container_name(job: &str, attempt: u32) -> String {
    format!(
        "muster-{}-{attempt}",
        job.replace(':', "-").replace('#', "_")
    )
}

pub struct DockerExecutor {
    docker: Docker,
    cluster: String,
    /// This agent's identity on the host (kept in its work directory): two agents sharing a
    /// Docker engine never take or remove each other's containers.
    owner: String,
    pull: crate::ImagePull,
    pull_timeout: Duration,
    /// What containers may reach of this machine; nothing by default.
    allowances: crate::Allowances,
}

impl DockerExecutor {
    /// Connects to the local engine and agrees on an API version it speaks.
    pub async fn connect(cluster: &str) -> Result<Self, bollard::errors::Error> {
        Self::connect_with(Docker::connect_with_local_defaults()?, cluster).await
    }

    /// Connects to the engine listening on this unix socket (tests run engines of their own).
    pub async fn connect_to_socket(
        socket: &str,
        cluster: &str,
    ) -> Result<Self, bollard::errors::Error> {
        let docker = Docker::connect_with_unix(socket, 30, bollard::API_DEFAULT_VERSION)?;
        Self::connect_with(docker, cluster).await
    }

    async fn connect_with(docker: Docker, cluster: &str) -> Result<Self, bollard::errors::Error> {
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok(Self {
            docker,
            cluster: cluster.to_owned(),
            owner: String::new(),
            pull: crate::ImagePull::default(),
            pull_timeout: Duration::from_secs(600),
            allowances: crate::Allowances::default(),
        })
    }

    /// Sets the identity this agent labels its containers with.
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// Sets when images are pulled, and how long a pull may take.
    pub fn with_pull(mut self, pull: crate::ImagePull, timeout: Duration) -> Self {
        self.pull = pull;
        self.pull_timeout = timeout;
        self
    }

    /// Sets what containers may reach of this machine.
    pub fn with_allowances(mut self, allowances: crate::Allowances) -> Self {
        self.allowances = allowances;
        self
    }

    /// Pulls `image` from its registry, to the end of the engine's progress stream.
    async fn pull(&self, image: &str) -> Result<(), String> {
        let options = bollard::query_parameters::CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut progress = self.docker.create_image(Some(options), None, None);
        while let Some(step) = progress.next().await {
            step.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub async fn run(
        &self,
        a: &Assignment,
        log_path: &Path,
        started: oneshot::Sender<()>,
        stop: watch::Receiver<bool>,
        grace: Duration,
        resumed: bool,
    ) -> AttemptExit {
        let name = container_name(&a.job.0, a.attempt);
        // An agent restarted while this attempt's container ran: take it back instead of
        // starting the attempt again. One that started before and whose container is gone
        // (removed after it ended, before its end was recorded) is not run a second time.
        if resumed {
            return match self.find_own(&name, a).await {
                Some(found) => self.adopt(found, log_path, started, stop, grace).await,
                None => AttemptExit::failed_to_start(super::LOST_IN_AGENT_RESTART),
            };
        }
        // Defence in depth: the API let the definition through for its registering caller,
        // and this machine's operator decides what it exposes.
        if let Some(why) = self.allowances.refusal(&a.options) {
            return AttemptExit::failed_to_start(format!("CannotStartContainerError: {why}"));
        }
        let waited_since = tokio::time::Instant::now();
        let mut warned = false;
        let inspected = loop {
            // A stop is heard while the engine holds the request too (one starting up
            // accepts on its socket before it answers).
            let mut stop_asked = stop.clone();
            let inspected = tokio::select! {
                inspected = self.docker.inspect_image(&a.image) => inspected,
                _ = stopped(&mut stop_asked) => return AttemptExit::failed_to_start(STOPPED_BY_MUSTER),
            };
            match inspected {
                Err(e) if engine_silent(&e) && waited_since.elapsed() < ENGINE_WAIT => {
                    if !warned {
                        warned = true;
                        tracing::warn!(job = %a.job, error = %e, "the Docker engine does not answer: the attempt waits for it");
                    }
                    tokio::select! {
                        _ = stopped(&mut stop_asked) => return AttemptExit::failed_to_start(STOPPED_BY_MUSTER),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                other => break other,
            }
        };
        match inspected {
            Ok(_) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) if self.pull == crate::ImagePull::Never => {
                return AttemptExit::failed_to_start(format!(
                    "CannotPullContainerError: image {} is not present on this host and image_pull is never",
                    a.image
                ));
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => match tokio::time::timeout(self.pull_timeout, async {
                let mut stop = stop.clone();
                // A stop (TerminateJob, the lease's end) must not wait for a long pull, nor
                // be forgotten behind it.
                tokio::select! {
                    pulled = self.pull(&a.image) => pulled,
                    _ = stopped(&mut stop) => Err(STOPPED_WHILE_PULLING.to_owned()),
                }
            })
            .await
            {
                Ok(Err(e)) if e == STOPPED_WHILE_PULLING => {
                    return AttemptExit::failed_to_start(STOPPED_BY_MUSTER);
                }
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return AttemptExit::failed_to_start(format!(
                        "CannotPullContainerError: pulling {}: {e}",
                        a.image
                    ));
                }
                Err(_) => {
                    return AttemptExit::failed_to_start(format!(
                        "CannotPullContainerError: pulling {} took longer than {} s",
                        a.image,
                        self.pull_timeout.as_secs()
                    ));
                }
            },
            Err(e) => {
                return AttemptExit::failed_to_start(format!(
                    "CannotPullContainerError: the Docker engine did not answer (waited {} s): {e}",
                    ENGINE_WAIT.as_secs()
                ));
            }
        }
        // A container of this attempt without a record (an agent from before records were
        // kept) is taken back all the same.
        if let Some(found) = self.find_own(&name, a).await {
            return self.adopt(found, log_path, started, stop, grace).await;
        }
        let labels = HashMap::from([
            ("muster.job-id".to_owned(), a.job.to_string()),
            ("muster.attempt".to_owned(), a.attempt.to_string()),
            ("muster.cluster".to_owned(), self.cluster.clone()),
            ("muster.agent".to_owned(), self.owner.clone()),
        ]);
        let memory = (a.resources.memory_mib * 1024 * 1024) as i64;
        let body = ContainerCreateBody {
            image: Some(a.image.clone()),
            cmd: (!a.command.is_empty()).then(|| a.command.clone()),
            env: Some(
                a.environment
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            labels: Some(labels),
            host_config: Some(HostConfig {
                nano_cpus: Some((a.resources.millicpus * 1_000_000) as i64),
                memory: Some(memory),
                // Swap off: the memory limit is the whole budget.
                memory_swap: Some(memory),
                security_opt: Some(vec!["no-new-privileges".to_owned()]),
                // Exactly the GPUs Muster assigned, by UUID (the NVIDIA runtime hook).
                device_requests: (!a.gpus.is_empty()).then(|| {
                    vec![DeviceRequest {
                        driver: Some("nvidia".to_owned()),
                        device_ids: Some(a.gpus.iter().map(|g| g.uuid.clone()).collect()),
                        capabilities: Some(vec![vec!["gpu".to_owned()]]),
                        ..Default::default()
                    }]
                }),
                // Only what the definition asked for and this agent allows (checked above).
                privileged: Some(a.options.privileged),
                cap_add: (!a.options.capabilities_add.is_empty())
                    .then(|| a.options.capabilities_add.clone()),
                devices: (!a.options.devices.is_empty()).then(|| {
                    a.options
                        .devices
                        .iter()
                        .map(|d| bollard::models::DeviceMapping {
                            path_on_host: Some(d.host_path.clone()),
                            path_in_container: Some(
                                d.container_path
                                    .clone()
                                    .unwrap_or_else(|| d.host_path.clone()),
                            ),
                            cgroup_permissions: Some(device_permissions(&d.permissions)),
                        })
                        .collect()
                }),
                binds: Some({
                    let mut binds = binds(&a.options);
                    if a.environment.iter().any(|(k, _)| k == "MUSTER_HOSTFILE") {
                        binds.push(format!(
                            "{}:{}:ro",
                            super::hostfile_path(log_path).display(),
                            super::CONTAINER_HOSTFILE
                        ));
                    }
                    binds
                }),
                // The nodes of a multi-node job reach each other at their workers' addresses.
                network_mode: a.options.host_network.then(|| "host".to_owned()),
                readonly_rootfs: Some(a.options.readonly_root_filesystem),
                ulimits: (!a.options.ulimits.is_empty()).then(|| {
                    a.options
                        .ulimits
                        .iter()
                        .map(|u| ResourcesUlimits {
                            name: Some(u.name.clone()),
                            soft: Some(u.soft),
                            hard: Some(u.hard),
                        })
                        .collect()
                }),
                ..Default::default()
            }),
            user: a.options.user.clone(),
            ..Default::default()
        };
        // A container left by an earlier try of this same attempt is replaced.
        let _ = self
            .docker
            .remove_container(
                &name,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await;
        let created = match self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                return AttemptExit::failed_to_start(format!("CannotCreateContainerError: {e}"));
            }
        };
        let id = created.id;
        if let Err(e) = self.docker.start_container(&id, None).await {
            self.remove(&id).await;
            return AttemptExit::failed_to_start(format!("CannotStartContainerError: {e}"));
        }
        let _ = started.send(());
        self.follow(id, log_path, None, stop, grace).await
    }

    /// The container of this very attempt, left by an earlier run of the agent, if there is
    /// one that started: `(id, still running)`.
    async fn find_own(&self, name: &str, a: &Assignment) -> Option<(String, bool)> {
        let info = self.docker.inspect_container(name, None).await.ok()?;
        let labels = info.config.as_ref()?.labels.as_ref()?;
        let ours = labels.get("muster.job-id").map(String::as_str) == Some(a.job.as_str())
            && labels.get("muster.attempt") == Some(&a.attempt.to_string())
            && labels.get("muster.cluster") == Some(&self.cluster)
            && labels.get("muster.agent") == Some(&self.owner);
        let state = info.state?;
        let ever_started = state
            .started_at
            .as_deref()
            .is_some_and(|t| !t.starts_with("0001-"));
        (ours && ever_started).then(|| {
            (
                info.id.unwrap_or_else(|| name.to_owned()),
                state.running == Some(true),
            )
        })
    }

    /// Carries on with a container found again after a restart: follows it if it still runs,
    /// or reports how it ended while nobody watched.
    async fn adopt(
        &self,
        (id, running): (String, bool),
        log_path: &Path,
        started: oneshot::Sender<()>,
        stop: watch::Receiver<bool>,
        grace: Duration,
    ) -> AttemptExit {
        tracing::info!(container = %id, running, "re-adopting the container of an attempt");
        let _ = started.send(());
        // Output written before the restart is in the log already; take up from its last line.
        let since = std::fs::metadata(log_path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i32 + 1);
        self.follow(id, log_path, since, stop, grace).await
    }

    /// Copies the container's output, waits for it to end (or stops it when asked), reports
    /// how it ended, and removes it.
    async fn follow(
        &self,
        id: String,
        log_path: &Path,
        since: Option<i32>,
        mut stop: watch::Receiver<bool>,
        grace: Duration,
    ) -> AttemptExit {
        let logs = tokio::spawn(copy_logs(
            self.docker.clone(),
            id.clone(),
            log_path.to_owned(),
            since,
        ));
        let mut logs = logs;
        let stopped = loop {
            let mut wait = self
                .docker
                .wait_container(&id, None::<WaitContainerOptions>);
            let stop_asked = tokio::select! {
                _ = wait.next() => false,
                _ = stopped(&mut stop) => true,
            };
            drop(wait);
            // The wait ended: the container exited, or the engine went away (restarted,
            // crashed) while it may still run (`live-restore`). Only the engine can say which;
            // reporting an end it has not confirmed could let the cluster retry an attempt
            // that still runs here.
            let running = if stop_asked {
                Running::StopAsked
            } else {
                self.still_running(&id, &mut stop).await
            };
            match running {
                Running::StopAsked => {
                    self.stop_surely(&id, grace).await;
                    break true;
                }
                Running::No => break false,
                Running::Yes => {}
            }
            tracing::info!(container = %id, "the container outlived the engine's restart: following it again");
            let since = std::fs::metadata(log_path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs() as i32 + 1);
            logs.abort();
            logs = tokio::spawn(copy_logs(
                self.docker.clone(),
                id.clone(),
                log_path.to_owned(),
                since,
            ));
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), logs).await;
        let exit = match self.docker.inspect_container(&id, None).await {
            Ok(info) => {
                let state = info.state.unwrap_or_default();
                let reason = if stopped {
                    Some(STOPPED_BY_MUSTER.to_owned())
                } else if state.oom_killed == Some(true) {
                    Some("OutOfMemoryError: Container killed due to memory usage".to_owned())
                } else {
                    None
                };
                AttemptExit {
                    exit_code: state.exit_code.map(|c| c as i32),
                    reason,
                }
            }
            Err(e) => AttemptExit {
                exit_code: None,
                reason: Some(format!(
                    "CannotInspectContainerError: the Docker engine did not answer while the container ran: {e}"
                )),
            },
        };
        self.remove(&id).await;
        exit
    }

    /// Whether the container still runs, as soon as the engine answers (asking every second
    /// until it does, or until a stop is asked for).
    async fn still_running(&self, id: &str, stop: &mut watch::Receiver<bool>) -> Running {
        let mut warned = false;
        loop {
            match self.docker.inspect_container(id, None).await {
                Ok(info) => {
                    let running = info.state.and_then(|s| s.running).unwrap_or(false);
                    return if running { Running::Yes } else { Running::No };
                }
                // Gone (removed behind the agent's back): it runs no more.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => return Running::No,
                Err(e) => {
                    if !warned {
                        warned = true;
                        tracing::warn!(container = %id, error = %e, "the Docker engine does not answer: waiting for it before saying how the attempt ended");
                    }
                }
            }
            tokio::select! {
                _ = stopped(stop) => return Running::StopAsked,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Stops the container (SIGTERM, SIGKILL after `grace`), asking again every second while
    /// the engine does not answer: a stop that did not happen must not be reported as done.
    async fn stop_surely(&self, id: &str, grace: Duration) {
        let t = grace.as_secs().min(i32::MAX as u64) as i32;
        loop {
            match self
                .docker
                .stop_container(
                    id,
                    Some(StopContainerOptionsBuilder::default().t(t).build()),
                )
                .await
            {
                Ok(()) => return,
                // Not running any more (304), or gone (404).
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 304 | 404,
                    ..
                }) => return,
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot stop the container yet; asking again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// `Some(reason)` when the engine does not answer a ping within a few seconds.
    pub async fn health(&self) -> Option<String> {
        match tokio::time::timeout(Duration::from_secs(3), self.docker.ping()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("DockerEngineUnavailable: {e}")),
            Err(_) => Some("DockerEngineUnavailable: no answer to a ping within 3 s".to_owned()),
        }
    }

    /// Removes this agent's containers whose attempt is not in `keep`: left by an earlier run
    /// of the agent for attempts the leader has since given up on or moved.
    pub async fn remove_strays(&self, keep: &std::collections::HashSet<(String, u32)>) {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("muster.agent={}", self.owner)],
        )]);
        let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let Ok(containers) = self.docker.list_containers(Some(options)).await else {
            return;
        };
        for c in containers {
            let labels = c.labels.unwrap_or_default();
            let attempt = labels
                .get("muster.attempt")
                .and_then(|a| a.parse::<u32>().ok());
            let key = labels.get("muster.job-id").cloned().zip(attempt);
            if key.as_ref().is_some_and(|k| keep.contains(k)) {
                continue;
            }
            if let Some(id) = c.id {
                tracing::info!(container = %id, ?key, "removing a container no attempt owns any more");
                self.remove(&id).await;
            }
        }
    }

    /// The ids of this agent's containers that still run.
    pub async fn running(&self) -> Result<Vec<String>, bollard::errors::Error> {
        let filters = HashMap::from([
            (
                "label".to_owned(),
                vec![
                    format!("muster.agent={}", self.owner),
                    format!("muster.cluster={}", self.cluster),
                ],
            ),
            ("status".to_owned(), vec!["running".to_owned()]),
        ]);
        let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .filters(&filters)
            .build();
        Ok(self
            .docker
            .list_containers(Some(options))
            .await?
            .into_iter()
            .filter_map(|c| c.id)
            .collect())
    }

    /// Stops these containers (SIGTERM, SIGKILL after `grace`), all at once; the agent
    /// reports and removes them when it is back.
    pub async fn stop_all(&self, ids: &[String], grace: Duration) {
        let t = grace.as_secs().min(i32::MAX as u64) as i32;
        futures::future::join_all(ids.iter().map(|id| {
            self.docker.stop_container(
                id,
                Some(StopContainerOptionsBuilder::default().t(t).build()),
            )
        }))
        .await;
    }

    async fn remove(&self, id: &str) {
        let _ = self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await;
    }
}

/// Copies the container's stdout and stderr, with Docker's timestamps, into the attempt's log.
async fn copy_logs(docker: Docker, id: String, path: std::path::PathBuf, since: Option<i32>) {
    let mut options = LogsOptionsBuilder::default()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .timestamps(true);
    if let Some(since) = since {
        options = options.since(since);
    }
    let options = options.build();
    let mut stream = docker.logs(&id, Some(options));
    let Ok(mut file) = crate::logs::AttemptLog::open(&path, crate::logs::ATTEMPT_LOG_MAX_BYTES)
    else {
        tracing::warn!(path = %path.display(), "cannot open attempt log");
        return;
    };
    // Docker stamps every line (`timestamps`); the log keeps that time in milliseconds.
    while let Some(Ok(chunk)) = stream.next().await {
        let bytes = chunk.into_bytes();
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            let (at, text) = crate::logs::split_docker_line(line, crate::logs::now_millis());
            let _ = file.write_line(at, text);
        }
    }
}

#[cfg(test)]
mod name_tests {
    #[test]
    fn every_job_id_makes_a_name_docker_accepts() {
        let allowed = |name: &str| {
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        };
        for job in ["abc", "abc:7", "abc#3"] {
            let name = super::container_name(job, 2);
            assert!(allowed(&name), "{name}");
        }
        assert_ne!(
            super::container_name("abc:3", 1),
            super::container_name("abc#3", 1)
        );
    }
}
