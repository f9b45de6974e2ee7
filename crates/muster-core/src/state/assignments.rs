//! What each node should run: assignments built from the state, with parameters substituted.

use super::*;

impl State {
    /// What `node` should be running now: its active attempts that nobody asked to stop.
    pub fn assignments_for(&self, node: &NodeId) -> Vec<Assignment> {
        self.assignments_among(node, |_, _| true)
    }

    /// The assignments of `node` whose (job, attempt) `wanted` accepts, in the order of
    /// [`Self::assignment_keys`]: describing an assignment costs more than naming it.
    pub fn assignments_among(
        &self,
        node: &NodeId,
        wanted: impl Fn(&JobId, u32) -> bool,
    ) -> Vec<Assignment> {
        let Some(n) = self.nodes.get(node) else {
            return Vec::new();
        };
        self.assigned_attempts(n)
            .filter(|(job, active)| wanted(&job.id, active.number))
            .map(|(job, active)| {
                let gpus: Vec<crate::GpuDevice> = active
                    .gpus
                    .iter()
                    .map(|i| {
                        n.inventory
                            .gpus
                            .iter()
                            .find(|g| g.index == *i)
                            .cloned()
                            .unwrap_or(crate::GpuDevice {
                                index: *i,
                                uuid: String::new(),
                                model: String::new(),
                                memory_mib: 0,
                                nvlink_peers: Vec::new(),
                            })
                    })
                    .collect();
                let mut environment = job.spec.container.environment.clone();
                // Muster decides which GPUs a job sees; values the user set are replaced.
                environment.retain(|(k, _)| {
                    !k.starts_with("AWS_BATCH_")
                        && k != "NVIDIA_VISIBLE_DEVICES"
                        && k != "CUDA_VISIBLE_DEVICES"
                });
                if n.inventory.capacity.gpus > 0 || !gpus.is_empty() {
                    let uuids: Vec<&str> = gpus
                        .iter()
                        .map(|g| g.uuid.as_str())
                        .filter(|u| !u.is_empty())
                        .collect();
                    let indices: Vec<String> = gpus.iter().map(|g| g.index.to_string()).collect();
                    let nvidia = if gpus.is_empty() {
                        "void".to_owned()
                    } else if uuids.len() == gpus.len() {
                        uuids.join(",")
                    } else {
                        indices.join(",")
                    };
                    environment.push(("NVIDIA_VISIBLE_DEVICES".to_owned(), nvidia));
                    environment.push(("CUDA_VISIBLE_DEVICES".to_owned(), indices.join(",")));
                }
                environment.extend([
                    ("AWS_BATCH_JOB_ID".to_owned(), job.id.to_string()),
                    (
                        "AWS_BATCH_JOB_ATTEMPT".to_owned(),
                        active.number.to_string(),
                    ),
                    ("AWS_BATCH_JQ_NAME".to_owned(), job.spec.queue.clone()),
                    (
                        "AWS_BATCH_CE_NAME".to_owned(),
                        n.compute_environment.clone(),
                    ),
                ]);
                if let Some(crate::ArrayRole::Child { index, size, .. }) = &job.array {
                    environment.push(("AWS_BATCH_JOB_ARRAY_INDEX".to_owned(), index.to_string()));
                    environment.push(("AWS_BATCH_JOB_ARRAY_SIZE".to_owned(), size.to_string()));
                }
                let mut options = self
                    .definition(&job.spec.definition_arn.0)
                    .map(|d| d.options.clone())
                    .unwrap_or_default();
                if let Some(crate::MultiNodeRole::Node {
                    index,
                    num_nodes,
                    main_node,
                }) = job.multinode.as_deref()
                {
                    environment.extend(self.gang_environment(job, *index, *num_nodes, *main_node));
                    options = job
                        .spec
                        .node_properties
                        .as_ref()
                        .and_then(|p| p.range_of(*index))
                        .map(|r| r.options.clone())
                        .unwrap_or_default();
                    options.host_network = true;
                }
                Assignment {
                    job: job.id.clone(),
                    attempt: active.number,
                    term: active.term,
                    image: job.spec.container.image.clone(),
                    command: substitute_parameters(
                        &job.spec.container.command,
                        &job.spec.parameters,
                    ),
                    environment,
                    resources: job.spec.container.resources(),
                    log_stream_name: job.log_stream_name(active.number),
                    gpus,
                    timeout_secs: job.spec.timeout_secs,
                    options,
                }
            })
            .collect()
    }

    /// Changes whenever an applied command may have made room, work or a node for a
    /// placement: a scheduler that already planned on this epoch and placed all it could
    /// has nothing new to find until it moves (or time passes, for time-based decisions).
    /// Under load most entries are attempts reported RUNNING, which change none of that.
    pub fn placement_epoch(&self) -> u64 {
        self.placement_epoch
    }

    pub(super) fn may_enable_placements(cmd: &Command) -> bool {
        match cmd {
            Command::ReportAttempt {
                event: AttemptEvent::Running,
                ..
            }
            | Command::SetWaitReasons { .. }
            // Archiving frees no room.
            | Command::ArchiveEnded { .. }
            | Command::SetClusterLevel { .. } => false,
            Command::ReportAttempts { reports, .. } => reports
                .iter()
                .any(|r| !matches!(r.event, AttemptEvent::Running)),
            _ => true,
        }
    }

    /// Which attempts [`Self::assignments_for`] would describe, as (job, attempt) in the same
    /// order: a cheap way to tell whether a node's assignments changed. What an assignment
    /// says is fixed when its attempt is placed.
    pub fn assignment_keys(&self, node: &NodeId) -> Vec<(JobId, u32)> {
        let Some(n) = self.nodes.get(node) else {
            return Vec::new();
        };
        self.assigned_attempts(n)
            .map(|(job, active)| (job.id.clone(), active.number))
            .collect()
    }

    /// The attempts placed on `node` that it should be running. The nodes of a multi-node
    /// job other than its main node start once the main node runs.
    pub(super) fn assigned_attempts<'a>(
        &'a self,
        node: &'a Node,
    ) -> impl Iterator<Item = (&'a Job, &'a crate::ActiveAttempt)> + 'a {
        node.placed_jobs
            .iter()
            .filter_map(|id| self.job(id))
            .filter(|job| job.terminate_reason.is_none())
            .filter(|job| match job.gang_node() {
                Some((parent, _, false)) => self
                    .jobs
                    .get(&parent)
                    .is_some_and(|p| p.status == JobStatus::Running),
                _ => true,
            })
            .filter_map(|job| Some((job, job.active.as_deref()?)))
    }

    /// What every node of a multi-node job is told: AWS's `AWS_BATCH_JOB_NODE_INDEX`,
    /// `AWS_BATCH_JOB_NUM_NODES`, `AWS_BATCH_JOB_MAIN_NODE_INDEX`, the main node's address
    /// (`AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS`, on the other nodes), and beyond AWS
    /// every node's address in index order (`MUSTER_NODE_ADDRESSES`), so that `mpirun` or
    /// `torchrun` need no rendezvous of their own. Fixed when the gang is placed.
    fn gang_environment(
        &self,
        job: &Job,
        index: u32,
        num_nodes: u32,
        main_node: u32,
    ) -> Vec<(String, String)> {
        let Some((parent, _, _)) = job.gang_node() else {
            return Vec::new();
        };
        let addresses: Vec<String> = (0..num_nodes)
            .map(|i| {
                self.job(&crate::node_job_id(&parent, i))
                    .and_then(|n| n.active.as_ref())
                    .and_then(|a| self.nodes.get(&a.node))
                    .map(|w| w.inventory.address.clone())
                    .unwrap_or_default()
            })
            .collect();
        let mut env = vec![
            ("AWS_BATCH_JOB_NODE_INDEX".to_owned(), index.to_string()),
            ("AWS_BATCH_JOB_NUM_NODES".to_owned(), num_nodes.to_string()),
            (
                "AWS_BATCH_JOB_MAIN_NODE_INDEX".to_owned(),
                main_node.to_string(),
            ),
        ];
        if index != main_node {
            env.push((
                "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS".to_owned(),
                addresses
                    .get(main_node as usize)
                    .cloned()
                    .unwrap_or_default(),
            ));
        }
        env.push(("MUSTER_NODE_ADDRESSES".to_owned(), addresses.join(",")));
        env
    }
}

/// Replaces every `Ref::name` in each argument of a command with the parameter's value (AWS's
/// parameter substitution), also inside a longer argument (`"test Ref::msg = hello"`); where
/// names share a prefix the longest that matches wins. Unknown references are left as written.
pub(crate) fn substitute_parameters(
    command: &[String],
    parameters: &BTreeMap<String, String>,
) -> Vec<String> {
    command
        .iter()
        .map(|arg| substitute_in(arg, parameters))
        .collect()
}

pub(super) fn substitute_in(arg: &str, parameters: &BTreeMap<String, String>) -> String {
    const MARK: &str = "Ref::";
    if parameters.is_empty() || !arg.contains(MARK) {
        return arg.to_owned();
    }
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let after = &rest[at + MARK.len()..];
        let longest = parameters
            .iter()
            .filter(|(name, _)| !name.is_empty() && after.starts_with(name.as_str()))
            .max_by_key(|(name, _)| name.len());
        match longest {
            Some((name, value)) => {
                out.push_str(value);
                rest = &after[name.len()..];
            }
            None => {
                out.push_str(MARK);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}
