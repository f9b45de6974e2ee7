//! Builders the planner's tests share: a compute environment `ce`, queues on it, the
//! definition `def` (1 vCPU, 64 MiB) and submissions.

use muster_core::{
    Arn, CeOrder, CeType, Command, ComputeEnvironment, ContainerOverrides, ContainerSpec,
    Dependency, EnabledState, Extra, JobDefinitionSpec, JobId, JobQueue, JobSubmission, Outcome,
    ResourceRequirement, ResourceType, State, Tags, Timestamp,
};
use muster_core::{NodeId, NodeInventory, Resources};

pub fn must(state: &mut State, cmd: Command) -> Outcome {
    let outcome = state.apply(cmd);
    assert!(!matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
    outcome
}

/// The UNMANAGED compute environment `ce`.
pub fn compute_environment(tags: Tags) -> Command {
    Command::CreateComputeEnvironment(ComputeEnvironment {
        name: "ce".into(),
        arn: Arn(String::new()),
        uuid: "u".into(),
        ce_type: CeType::Unmanaged,
        state: EnabledState::Enabled,
        unmanaged_vcpus: None,
        service_role: None,
        tags,
        created_at: Timestamp(0),
        extra: Default::default(),
    })
}

/// A queue on `ce`.
pub fn queue(name: &str, priority: i64, scheduling_policy_arn: Option<String>) -> Command {
    Command::CreateJobQueue(JobQueue {
        name: name.into(),
        arn: Arn(String::new()),
        priority,
        state: EnabledState::Enabled,
        compute_environment_order: vec![CeOrder {
            order: 1,
            compute_environment: "ce".into(),
        }],
        tags: Default::default(),
        created_at: Timestamp(0),
        scheduling_policy_arn,
        time_limit_actions: Vec::new(),
        extra: Default::default(),
    })
}

/// The definition `def`: 1 vCPU, 64 MiB.
pub fn definition() -> Command {
    Command::RegisterJobDefinition(JobDefinitionSpec {
        name: "def".into(),
        container: ContainerSpec {
            image: "busybox".into(),
            vcpus: Some(1),
            memory: Some(64),
            ..Default::default()
        },
        parameters: Default::default(),
        tags: Default::default(),
        retry: None,
        timeout_secs: None,
        extra: Default::default(),
        orchestration: Default::default(),
        options: Default::default(),
        scheduling_priority: None,
        node_properties: None,
    })
}

/// One job of `def` as a test wants it.
#[derive(Debug, Clone, Default)]
pub struct JobSpec {
    pub queue: String,
    pub at: u64,
    pub vcpus: i64,
    pub memory: i64,
    pub gpus: u32,
    pub timeout_secs: Option<u64>,
    pub tags: Tags,
    pub depends_on: Vec<Dependency>,
    pub share_identifier: Option<String>,
    pub scheduling_priority_override: Option<i64>,
    pub extra: Extra,
}

pub fn submission(id: &str, spec: JobSpec) -> Command {
    let resource_requirements = if spec.gpus > 0 {
        vec![ResourceRequirement {
            resource_type: ResourceType::Gpu,
            value: spec.gpus.to_string(),
        }]
    } else {
        Vec::new()
    };
    Command::SubmitJob(JobSubmission {
        id: JobId::from(id),
        at: Timestamp(spec.at),
        name: id.into(),
        queue: spec.queue,
        definition: "def".into(),
        overrides: ContainerOverrides {
            vcpus: Some(spec.vcpus),
            memory: Some(spec.memory),
            resource_requirements,
            ..Default::default()
        },
        parameters: Default::default(),
        tags: spec.tags,
        retry: None,
        timeout_secs: spec.timeout_secs,
        depends_on: spec.depends_on,
        array_size: None,
        share_identifier: spec.share_identifier,
        scheduling_priority_override: spec.scheduling_priority_override,
        extra: spec.extra,
        node_overrides: None,
    })
}

/// Registers (or re-registers) node `id` of `ce` offering `capacity`, with these GPUs and labels.
pub fn node_registration(
    id: &str,
    capacity: Resources,
    gpus: Vec<muster_core::GpuDevice>,
    labels: std::collections::BTreeMap<String, String>,
    at: Timestamp,
) -> Command {
    Command::RegisterNode {
        node: NodeId(id.into()),
        compute_environment: "ce".into(),
        inventory: NodeInventory {
            capacity,
            hostname: id.into(),
            address: "127.0.0.1".into(),
            executor: "process".into(),
            gpus,
            labels,
            log_address: String::new(),
        },
        at,
    }
}
