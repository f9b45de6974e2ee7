//! The simulated clients: one beside each control node, calling that node's `RaftPlane` (the
//! plane under the AWS API) as the API would. Each submit carries a unique name; every call is
//! recorded as ok, failed (certainly not applied) or indeterminate. A client dies with its
//! node: a call it left unanswered counts as indeterminate.

use super::records::{Call, CallKind, CallResult, Records, now};
use muster_api::{ControlPlane, PlaneError};
use muster_control::RaftPlane;
use muster_core::{
    AdminCommand, Arn, CeOrder, CeType, Command, ComputeEnvironment, ContainerOverrides,
    ContainerSpec, EnabledState, JobDefinitionSpec, JobId, JobQueue, JobSubmission, Outcome,
    RetryStrategy, Timestamp,
};
use std::time::Duration;

pub const ENVIRONMENT: &str = "sim";
pub const QUEUE: &str = "work";
pub const DEFINITION: &str = "sleeper";
/// Attempts each job gets (its definition's retry strategy).
pub const ATTEMPTS: u32 = 3;

/// What the scheduler has to place: a compute environment, a queue and a definition. Created
/// by the first client that finds them missing; creating one again is refused and harmless.
fn setup_commands() -> Vec<Command> {
    vec![
        Command::CreateComputeEnvironment(ComputeEnvironment {
            name: ENVIRONMENT.into(),
            arn: Arn(format!(
                "arn:aws:batch:us-east-1:000000000000:compute-environment/{ENVIRONMENT}"
            )),
            uuid: "sim".into(),
            ce_type: CeType::Unmanaged,
            state: EnabledState::Enabled,
            unmanaged_vcpus: None,
            service_role: None,
            tags: Default::default(),
            created_at: Timestamp(0),
            extra: Default::default(),
        }),
        Command::CreateJobQueue(JobQueue {
            name: QUEUE.into(),
            arn: Arn(format!(
                "arn:aws:batch:us-east-1:000000000000:job-queue/{QUEUE}"
            )),
            priority: 1,
            state: EnabledState::Enabled,
            compute_environment_order: vec![CeOrder {
                order: 1,
                compute_environment: ENVIRONMENT.into(),
            }],
            tags: Default::default(),
            created_at: Timestamp(0),
            scheduling_policy_arn: None,
            time_limit_actions: Vec::new(),
            extra: Default::default(),
        }),
        Command::RegisterJobDefinition(JobDefinitionSpec {
            name: DEFINITION.into(),
            container: ContainerSpec {
                image: "busybox".into(),
                command: vec!["run".into(), "1000".into(), "0".into()],
                vcpus: Some(1),
                memory: Some(256),
                ..Default::default()
            },
            parameters: Default::default(),
            tags: Default::default(),
            retry: Some(RetryStrategy {
                attempts: ATTEMPTS,
                evaluate_on_exit: Vec::new(),
            }),
            timeout_secs: None,
            extra: Default::default(),
            orchestration: Default::default(),
            options: Default::default(),
            node_properties: None,
            scheduling_priority: None,
        }),
    ]
}

async fn set_up(plane: &RaftPlane) {
    for command in setup_commands() {
        loop {
            match plane.propose(command.clone()).await {
                Ok(_) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// A job's command for the simulated agent: run for `millis`, then exit with `code`.
fn job_command(millis: u64, code: i32) -> Vec<String> {
    vec!["run".into(), millis.to_string(), code.to_string()]
}

fn result_of(answer: &Result<Outcome, PlaneError>) -> CallResult {
    match answer {
        Ok(Outcome::Rejected(_)) => CallResult::Failed,
        Ok(_) => CallResult::Ok,
        Err(PlaneError::Unavailable(_) | PlaneError::Refused(_)) => CallResult::Failed,
        Err(PlaneError::Indeterminate(_)) => CallResult::Indeterminate,
    }
}

/// Calls until the workload is over. Runs again, as a new client, when its node restarts.
pub async fn client(id: u64, plane: RaftPlane, records: Records) {
    let first = id == 1;
    if first && !records.lock().set_up {
        set_up(&plane).await;
        records.lock().set_up = true;
    }
    loop {
        let pause = match records.mix {
            super::Mix::Everything => records.rng().between(200, 1200),
            super::Mix::LongCutOffs => records.rng().between(400, 2000),
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let (over, set_up, known) = {
            let shared = records.lock();
            (shared.workload_over, shared.set_up, shared.next_job)
        };
        if over {
            return;
        }
        if !set_up {
            continue;
        }
        let (choice, pick, millis, fails) = {
            let mut rng = records.rng();
            let (choice, pick) = (rng.between(0, 100), rng.between(0, known.max(1)));
            // Most jobs are short, and one in five of those fails (and is retried); one in ten
            // (one in four in `Mix::LongCutOffs`) runs long enough to outlive an agent's
            // cut-off and the node-lost TTL, and succeeds, so that its retries cannot outlast
            // the quiescence bound.
            let long = match records.mix {
                super::Mix::Everything => 10,
                super::Mix::LongCutOffs => 25,
            };
            if rng.percent(long) {
                (choice, pick, rng.between(25_000, 50_000), false)
            } else {
                (choice, pick, rng.between(200, 6000), rng.percent(20))
            }
        };
        let (kind, command) = if choice < 80 || known == 0 {
            let n = {
                let mut shared = records.lock();
                shared.next_job += 1;
                shared.next_job
            };
            let job = format!("00000000-0000-4000-8000-{n:012}");
            let name = format!("job-{n}");
            let submission = JobSubmission {
                id: JobId::from(job.as_str()),
                at: muster_control::now_millis(),
                name: name.clone(),
                queue: QUEUE.into(),
                definition: DEFINITION.into(),
                overrides: ContainerOverrides {
                    command: Some(job_command(millis, if fails { 1 } else { 0 })),
                    ..Default::default()
                },
                parameters: Default::default(),
                tags: Default::default(),
                retry: None,
                timeout_secs: None,
                depends_on: Vec::new(),
                array_size: None,
                share_identifier: None,
                scheduling_priority_override: None,
                extra: Default::default(),
                node_overrides: None,
            };
            (
                CallKind::Submit { job, name },
                Command::SubmitJob(submission),
            )
        } else {
            let job = format!("00000000-0000-4000-8000-{:012}", pick + 1);
            let at = muster_control::now_millis();
            if choice < 92 {
                (
                    CallKind::Terminate { job: job.clone() },
                    Command::TerminateJob {
                        job: JobId::from(job.as_str()),
                        reason: "terminated by the simulation".into(),
                        at,
                    },
                )
            } else {
                (
                    CallKind::Cancel { job: job.clone() },
                    Command::Admin(AdminCommand::CancelJob {
                        job: JobId::from(job.as_str()),
                        reason: "cancelled by the simulation".into(),
                        at,
                    }),
                )
            }
        };
        let index = {
            let mut shared = records.lock();
            shared.calls.push(Call {
                client: id,
                kind,
                invoked: now(),
                ended: None,
            });
            shared.calls.len() - 1
        };
        let answer = plane.propose(command).await;
        let mut result = result_of(&answer);
        if records.bug == super::Bug::IndeterminateCountsAsOk && result == CallResult::Indeterminate
        {
            result = CallResult::Ok;
        }
        records.lock().calls[index].ended = Some((now(), result));
    }
}
