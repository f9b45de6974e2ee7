//! Multi-node jobs in the state machine: node jobs, placement of the whole gang or nothing,
//! the main node first, the attempt the main node ends, retries of the whole gang.

use crate::*;
use std::collections::BTreeSet;

const WORKERS: usize = 4;

fn container(image: &str, vcpus: i64) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        vcpus: Some(vcpus),
        memory: Some(64),
        ..Default::default()
    }
}

/// A compute environment of four 2-vCPU workers (`w0`…`w3`, at 10.0.0.1…), a queue `q`, and
/// the multi-node definition `mnp`: three nodes, node 0 the main one (image `main`), nodes
/// `1:` image `worker`, retried once.
fn setup() -> State {
    let mut s = State::default();
    let mut cmds = vec![
        Command::CreateComputeEnvironment(ComputeEnvironment {
            name: "ce".into(),
            arn: Arn(String::new()),
            uuid: "u".into(),
            ce_type: CeType::Unmanaged,
            state: EnabledState::Enabled,
            unmanaged_vcpus: None,
            service_role: None,
            tags: Default::default(),
            created_at: Timestamp(0),
            extra: Default::default(),
        }),
        Command::CreateJobQueue(JobQueue {
            name: "q".into(),
            arn: Arn(String::new()),
            priority: 1,
            state: EnabledState::Enabled,
            compute_environment_order: vec![CeOrder {
                order: 1,
                compute_environment: "ce".into(),
            }],
            tags: Default::default(),
            created_at: Timestamp(0),
            scheduling_policy_arn: None,
            time_limit_actions: Vec::new(),
            extra: Default::default(),
        }),
        setup_definition(),
    ];
    for i in 0..WORKERS {
        cmds.push(Command::RegisterNode {
            node: NodeId(format!("w{i}")),
            compute_environment: "ce".into(),
            inventory: NodeInventory {
                capacity: Resources::new(2000, 1024, 0),
                hostname: format!("w{i}"),
                address: format!("10.0.0.{}", i + 1),
                executor: "process".into(),
                gpus: Vec::new(),
                labels: Default::default(),
                log_address: String::new(),
            },
            at: Timestamp(0),
        });
    }
    for c in cmds {
        let outcome = s.apply(c);
        assert!(!matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
    }
    s
}

fn submit(s: &mut State, id: &str, overrides: Option<NodeOverrides>) -> Outcome {
    s.apply(submission(id, Vec::new(), overrides))
}

/// The submit of a job of `mnp` with these dependencies and node overrides.
fn submission(id: &str, depends_on: Vec<Dependency>, overrides: Option<NodeOverrides>) -> Command {
    Command::SubmitJob(JobSubmission {
        id: JobId::from(id),
        at: Timestamp(1),
        name: "gang".into(),
        queue: "q".into(),
        definition: "mnp".into(),
        overrides: Default::default(),
        parameters: Default::default(),
        tags: Default::default(),
        retry: None,
        timeout_secs: None,
        depends_on,
        array_size: None,
        share_identifier: None,
        scheduling_priority_override: None,
        extra: Default::default(),
        node_overrides: overrides,
    })
}

fn id(s: &str) -> JobId {
    JobId::from(s)
}

fn status(s: &State, job: &str) -> JobStatus {
    s.find_job(&id(job)).unwrap().status
}

fn place(s: &mut State, at: u64, placements: &[(&str, &str)]) -> Outcome {
    s.apply(Command::Place {
        term: 1,
        at: Timestamp(at),
        placements: placements
            .iter()
            .map(|(job, worker)| Placement {
                job: id(job),
                node: NodeId((*worker).into()),
                gpus: Vec::new(),
            })
            .collect(),
    })
}

fn report(s: &mut State, job: &str, event: AttemptEvent, at: u64) {
    let active = s
        .find_job(&id(job))
        .unwrap()
        .active
        .clone()
        .expect("placed");
    s.apply(Command::ReportAttempt {
        job: id(job),
        attempt: active.number,
        node: active.node.clone(),
        event,
        at: Timestamp(at),
    });
}

fn exited(code: i32) -> AttemptEvent {
    AttemptEvent::Exited {
        exit_code: Some(code),
        reason: None,
    }
}

/// The jobs each worker is assigned now.
fn assigned(s: &State) -> BTreeSet<(String, String)> {
    (0..WORKERS)
        .flat_map(|i| {
            let worker = NodeId(format!("w{i}"));
            s.assignments_for(&worker)
                .into_iter()
                .map(move |a| (worker.0.clone(), a.job.to_string()))
        })
        .collect()
}

fn env<'a>(a: &'a Assignment, name: &str) -> Option<&'a str> {
    a.environment
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn placed_gang(s: &mut State) {
    assert!(matches!(submit(s, "g", None), Outcome::JobSubmitted { .. }));
    let outcome = place(s, 10, &[("g#0", "w0"), ("g#1", "w1"), ("g#2", "w2")]);
    assert_eq!(
        outcome,
        Outcome::Placed {
            placed: 3,
            refused: 0
        }
    );
}

#[test]
fn a_submit_makes_a_parent_in_line_and_its_node_jobs_beside_it() {
    let mut s = setup();
    assert!(matches!(
        submit(&mut s, "g", None),
        Outcome::JobSubmitted { .. }
    ));
    // Only the parent waits in line; its nodes wait with it.
    let runnable: Vec<JobId> = s.runnable_jobs("q").map(|j| j.id.clone()).collect();
    assert_eq!(runnable, [id("g")]);
    let nodes: Vec<(JobId, JobStatus, String)> = s
        .gang_nodes(&id("g"))
        .map(|n| (n.id.clone(), n.status, n.spec.container.image.clone()))
        .collect();
    assert_eq!(
        nodes,
        [
            (id("g#0"), JobStatus::Runnable, "main".to_owned()),
            (id("g#1"), JobStatus::Runnable, "worker".to_owned()),
            (id("g#2"), JobStatus::Runnable, "worker".to_owned()),
        ]
    );
    assert_eq!(
        s.find_job(&id("g#1")).unwrap().gang_node(),
        Some((id("g"), 1, false))
    );
    // The parent describes the main node's container; ranges share one spec in memory.
    assert_eq!(s.find_job(&id("g")).unwrap().spec.container.image, "main");
    assert!(std::sync::Arc::ptr_eq(
        &s.find_job(&id("g#1")).unwrap().spec,
        &s.find_job(&id("g#2")).unwrap().spec
    ));
    // A snapshot read back rebuilds the same line.
    let mut copy: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
    copy.rebuild_indexes();
    let runnable: Vec<JobId> = copy.runnable_jobs("q").map(|j| j.id.clone()).collect();
    assert_eq!(runnable, [id("g")]);
}

#[test]
fn node_overrides_change_the_count_and_containers_and_bad_ones_are_refused() {
    let mut s = setup();
    let overrides = NodeOverrides {
        num_nodes: Some(4),
        ranges: vec![NodeOverride {
            target_nodes: "3".into(),
            container_overrides: ContainerOverrides {
                command: Some(vec!["last".into()]),
                ..Default::default()
            },
        }],
    };
    assert!(matches!(
        submit(&mut s, "g", Some(overrides)),
        Outcome::JobSubmitted { .. }
    ));
    assert_eq!(s.gang_nodes(&id("g")).count(), 4);
    assert_eq!(
        s.find_job(&id("g#3")).unwrap().spec.container.command,
        ["last"]
    );
    assert!(
        s.find_job(&id("g#2"))
            .unwrap()
            .spec
            .container
            .command
            .is_empty()
    );

    let too_many = NodeOverrides {
        num_nodes: Some(MAX_NODES + 1),
        ranges: Vec::new(),
    };
    let Outcome::Rejected(r) = submit(&mut s, "h", Some(too_many)) else {
        panic!("accepted")
    };
    assert_eq!(r.field, "nodeOverrides.numNodes");
    assert!(s.find_job(&id("h")).is_none() && s.find_job(&id("h#0")).is_none());
}

#[test]
fn a_gang_is_placed_whole_on_distinct_workers_or_not_at_all() {
    let mut s = setup();
    assert!(matches!(
        submit(&mut s, "g", None),
        Outcome::JobSubmitted { .. }
    ));
    // Part of the gang: nothing.
    let partial = place(&mut s, 10, &[("g#0", "w0"), ("g#1", "w1")]);
    assert_eq!(
        partial,
        Outcome::Placed {
            placed: 0,
            refused: 2
        }
    );
    // Two nodes on one worker: nothing.
    let doubled = place(&mut s, 10, &[("g#0", "w0"), ("g#1", "w1"), ("g#2", "w1")]);
    assert_eq!(
        doubled,
        Outcome::Placed {
            placed: 0,
            refused: 3
        }
    );
    // One node that does not fit (worker w1 full): nothing, and w0 keeps its room.
    let mut filled = s.clone();
    assert!(matches!(
        submit(&mut filled, "other", None),
        Outcome::JobSubmitted { .. }
    ));
    place(
        &mut filled,
        10,
        &[("other#0", "w3"), ("other#1", "w1"), ("other#2", "w2")],
    );
    // A worker runs at most one node of any multi-node job (they share its network).
    let why = filled
        .gang_conflict(
            &id("g"),
            &[("g#0", "w0"), ("g#1", "w1"), ("g#2", "w2")].map(|(job, worker)| Placement {
                job: id(job),
                node: NodeId(worker.into()),
                gpus: Vec::new(),
            }),
        )
        .unwrap();
    assert!(
        why.contains("runs a node of another multi-node job"),
        "{why}"
    );
    let blocked = place(
        &mut filled,
        11,
        &[("g#0", "w0"), ("g#1", "w1"), ("g#2", "w2")],
    );
    assert_eq!(
        blocked,
        Outcome::Placed {
            placed: 0,
            refused: 3
        }
    );
    assert_eq!(
        filled.node(&NodeId("w0".into())).unwrap().allocated,
        Resources::ZERO
    );
    assert!(filled.resource_violations().is_empty());

    let whole = place(&mut s, 10, &[("g#0", "w0"), ("g#1", "w1"), ("g#2", "w2")]);
    assert_eq!(
        whole,
        Outcome::Placed {
            placed: 3,
            refused: 0
        }
    );
    assert_eq!(status(&s, "g"), JobStatus::Starting);
    assert_eq!(s.runnable_count("q"), 0);
    assert!(s.resource_violations().is_empty());
}

#[test]
fn the_main_node_starts_first_and_the_others_learn_its_address() {
    let mut s = setup();
    placed_gang(&mut s);
    // Only the main node is assigned until it runs.
    let expected: BTreeSet<(String, String)> = [("w0".to_owned(), "g#0".to_owned())].into();
    assert_eq!(assigned(&s), expected);
    let nodes = s.nodes_affected_by(&Command::ReportAttempt {
        job: id("g#0"),
        attempt: 1,
        node: NodeId("w0".into()),
        event: AttemptEvent::Running,
        at: Timestamp(11),
    });
    assert_eq!(
        nodes,
        AffectedNodes::Some(vec![
            NodeId("w0".into()),
            NodeId("w1".into()),
            NodeId("w2".into())
        ])
    );
    report(&mut s, "g#0", AttemptEvent::Running, 11);
    assert_eq!(status(&s, "g"), JobStatus::Running);
    assert_eq!(assigned(&s).len(), 3);

    let worker = &s.assignments_for(&NodeId("w2".into()))[0];
    assert_eq!(worker.job, id("g#2"));
    assert_eq!(worker.image, "worker");
    assert!(worker.options.host_network);
    assert_eq!(env(worker, "AWS_BATCH_JOB_ID"), Some("g#2"));
    assert_eq!(env(worker, "AWS_BATCH_JOB_NODE_INDEX"), Some("2"));
    assert_eq!(env(worker, "AWS_BATCH_JOB_NUM_NODES"), Some("3"));
    assert_eq!(env(worker, "AWS_BATCH_JOB_MAIN_NODE_INDEX"), Some("0"));
    assert_eq!(
        env(worker, "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"),
        Some("10.0.0.1")
    );
    assert_eq!(
        env(worker, "MUSTER_NODE_ADDRESSES"),
        Some("10.0.0.1,10.0.0.2,10.0.0.3")
    );
    let main = &s.assignments_for(&NodeId("w0".into()))[0];
    assert_eq!(
        env(main, "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"),
        None
    );
}

#[test]
fn the_job_ends_as_its_main_node_ends_and_the_other_nodes_are_stopped() {
    let mut s = setup();
    placed_gang(&mut s);
    report(&mut s, "g#0", AttemptEvent::Running, 11);
    report(&mut s, "g#1", AttemptEvent::Running, 12);
    report(&mut s, "g#2", AttemptEvent::Running, 12);
    // A node other than the main one may end first with success: nothing follows.
    report(&mut s, "g#2", exited(0), 13);
    assert_eq!(status(&s, "g"), JobStatus::Running);
    report(&mut s, "g#0", exited(0), 14);
    // Node 1 is no longer assigned: its agent stops it; the job ends once it has.
    assert_eq!(status(&s, "g"), JobStatus::Running);
    assert!(!assigned(&s).iter().any(|(_, job)| job == "g#1"));
    assert_eq!(
        s.find_job(&id("g#1")).unwrap().terminate_reason.as_deref(),
        Some(MAIN_NODE_EXITED)
    );
    report(&mut s, "g#1", exited(143), 15);
    assert_eq!(status(&s, "g"), JobStatus::Succeeded);
    for node in ["g#0", "g#1", "g#2"] {
        assert_eq!(status(&s, node), JobStatus::Succeeded, "{node}");
    }
    let parent = s.find_job(&id("g")).unwrap();
    assert_eq!(parent.attempts.len(), 1);
    assert_eq!(parent.attempts[0].node, NodeId("w0".into()));
    assert_eq!(parent.attempts[0].exit_code, Some(0));
    assert!(s.resource_violations().is_empty());
    assert!(s.nodes().all(|n| n.allocated == Resources::ZERO));
}

#[test]
fn a_node_that_fails_fails_the_attempt_and_the_whole_gang_runs_again() {
    let mut s = setup();
    placed_gang(&mut s);
    report(&mut s, "g#0", AttemptEvent::Running, 11);
    report(&mut s, "g#1", AttemptEvent::Running, 12);
    report(&mut s, "g#2", AttemptEvent::Running, 12);
    report(&mut s, "g#1", exited(1), 13);
    // The others are stopped; the attempt ends once they have.
    assert!(assigned(&s).is_empty());
    report(&mut s, "g#0", exited(143), 14);
    assert_eq!(status(&s, "g"), JobStatus::Running);
    report(&mut s, "g#2", exited(143), 14);
    assert_eq!(status(&s, "g"), JobStatus::Runnable);
    let parent = s.find_job(&id("g")).unwrap();
    assert_eq!(parent.attempts.len(), 1);
    assert_eq!(parent.attempts[0].exit_code, Some(1));
    assert!(
        parent.attempts[0]
            .status_reason
            .starts_with("Node 1 failed"),
        "{}",
        parent.attempts[0].status_reason
    );
    for node in ["g#0", "g#1", "g#2"] {
        assert_eq!(status(&s, node), JobStatus::Runnable, "{node}");
    }
    assert!(s.nodes().all(|n| n.allocated == Resources::ZERO));

    // The second attempt: the whole gang again, on other workers if the plan says so.
    let again = place(&mut s, 20, &[("g#0", "w3"), ("g#1", "w0"), ("g#2", "w1")]);
    assert_eq!(
        again,
        Outcome::Placed {
            placed: 3,
            refused: 0
        }
    );
    assert_eq!(
        s.find_job(&id("g#1"))
            .unwrap()
            .active
            .as_ref()
            .unwrap()
            .number,
        2
    );
    report(&mut s, "g#0", AttemptEvent::Running, 21);
    assert_eq!(assigned(&s).len(), 3, "nobody is told to stop any more");
    report(&mut s, "g#1", exited(0), 22);
    // Node 2 never reported running: stopping it ends it at once, and with it the attempt.
    report(&mut s, "g#0", exited(2), 23);
    // Out of attempts: the main node's failure is the job's.
    assert_eq!(status(&s, "g"), JobStatus::Failed);
    let parent = s.find_job(&id("g")).unwrap();
    assert_eq!(parent.attempts.len(), 2);
    assert_eq!(parent.attempts[1].exit_code, Some(2));
    assert_eq!(status(&s, "g#1"), JobStatus::Failed);
}

#[test]
fn a_lost_worker_fails_the_attempt_and_one_not_started_ends_at_once() {
    let mut s = setup();
    placed_gang(&mut s);
    report(&mut s, "g#0", AttemptEvent::Running, 11);
    // Node 2 was never started (it had just been assigned) when its worker is lost.
    let affected = s.nodes_affected_by(&Command::NodeLost {
        node: NodeId("w2".into()),
        at: Timestamp(12),
    });
    let AffectedNodes::Some(affected) = affected else {
        panic!("all")
    };
    assert!(affected.contains(&NodeId("w0".into())));
    s.apply(Command::NodeLost {
        node: NodeId("w2".into()),
        at: Timestamp(12),
    });
    // Node 1 had not started either: it ends at once; the main node is stopped by its agent.
    assert_eq!(s.find_job(&id("g#1")).unwrap().active, None);
    assert_eq!(status(&s, "g"), JobStatus::Running);
    report(&mut s, "g#0", exited(143), 13);
    assert_eq!(status(&s, "g"), JobStatus::Runnable);
    assert!(s.resource_violations().is_empty());
}

#[test]
fn terminate_stops_every_node_and_cancel_fails_a_waiting_gang() {
    let mut s = setup();
    placed_gang(&mut s);
    report(&mut s, "g#0", AttemptEvent::Running, 11);
    report(&mut s, "g#1", AttemptEvent::Running, 11);
    // Terminating a node job terminates the job it belongs to.
    s.apply(Command::TerminateJob {
        job: id("g#1"),
        reason: "enough".into(),
        at: Timestamp(12),
    });
    assert!(assigned(&s).is_empty());
    // Node 2 had not started: it ended at once.
    assert_eq!(s.find_job(&id("g#2")).unwrap().active, None);
    report(&mut s, "g#0", exited(143), 13);
    report(&mut s, "g#1", exited(143), 13);
    assert_eq!(status(&s, "g"), JobStatus::Failed, "terminated: no retry");
    let parent = s.find_job(&id("g")).unwrap();
    assert_eq!(parent.status_reason.as_deref(), Some("enough"));
    assert!(parent.is_terminated);

    assert!(matches!(
        submit(&mut s, "w", None),
        Outcome::JobSubmitted { .. }
    ));
    s.apply(Command::Admin(AdminCommand::CancelJob {
        job: id("w"),
        reason: "no".into(),
        at: Timestamp(20),
    }));
    for job in ["w", "w#0", "w#1", "w#2"] {
        assert_eq!(status(&s, job), JobStatus::Failed, "{job}");
        assert!(s.find_job(&id(job)).unwrap().is_cancelled, "{job}");
    }
    assert_eq!(s.runnable_count("q"), 0);
    // Purged together.
    s.apply(Command::PurgeJobs {
        before: Timestamp(1_000),
    });
    assert!(s.jobs().next().is_none());
}

#[test]
fn no_job_depends_on_a_node_and_a_terminate_after_the_main_node_succeeded_changes_nothing() {
    let mut s = setup();
    placed_gang(&mut s);
    let mut sub = match submission_after("after", "g#1") {
        Command::SubmitJob(sub) => sub,
        _ => unreachable!(),
    };
    let Outcome::Rejected(r) = s.apply(Command::SubmitJob(sub.clone())) else {
        panic!("a dependency on a node was accepted")
    };
    assert_eq!(r.field, "dependsOn.jobId");
    assert!(r.message.contains("depend on g"), "{}", r.message);
    // On the job itself it is fine, and released when the job succeeds.
    sub.depends_on[0].job = Some(id("g"));
    assert!(matches!(
        s.apply(Command::SubmitJob(sub)),
        Outcome::JobSubmitted { .. }
    ));
    report(&mut s, "g#0", AttemptEvent::Running, 11);
    report(&mut s, "g#1", AttemptEvent::Running, 11);
    report(&mut s, "g#2", AttemptEvent::Running, 11);
    report(&mut s, "g#0", exited(0), 12);
    // The main node succeeded: the attempt's end is decided; a late terminate does not undo it.
    s.apply(Command::TerminateJob {
        job: id("g"),
        reason: "too late".into(),
        at: Timestamp(13),
    });
    report(&mut s, "g#1", exited(143), 14);
    report(&mut s, "g#2", exited(143), 14);
    assert_eq!(status(&s, "g"), JobStatus::Succeeded);
    assert!(!s.find_job(&id("g")).unwrap().is_terminated);
    assert_eq!(status(&s, "after"), JobStatus::Runnable);
}

#[test]
fn node_properties_that_do_not_cover_every_node_never_reach_the_state() {
    let mut s = setup();
    let Command::RegisterJobDefinition(mut spec) = setup_definition() else {
        unreachable!()
    };
    spec.name = "gap".into();
    if let Some(nodes) = spec.node_properties.as_mut() {
        nodes.ranges.truncate(1);
    }
    let Outcome::Rejected(r) = s.apply(Command::RegisterJobDefinition(spec)) else {
        panic!("accepted")
    };
    assert_eq!(r.field, "nodeProperties.nodeRangeProperties.targetNodes");
    assert!(s.definition("gap").is_none());
}

/// The definition `mnp`: three nodes, node 0 the main one (image `main`), nodes `1:` image
/// `worker`, retried once.
fn setup_definition() -> Command {
    Command::RegisterJobDefinition(JobDefinitionSpec {
        name: "mnp".into(),
        container: container("main", 1),
        parameters: Default::default(),
        tags: Default::default(),
        retry: Some(RetryStrategy {
            attempts: 2,
            evaluate_on_exit: Vec::new(),
        }),
        timeout_secs: None,
        extra: Default::default(),
        orchestration: Default::default(),
        options: Default::default(),
        scheduling_priority: None,
        node_properties: Some(NodeProperties {
            num_nodes: 3,
            main_node: 0,
            ranges: vec![
                NodeRange {
                    target_nodes: "0".into(),
                    container: container("main", 1),
                    options: Default::default(),
                },
                NodeRange {
                    target_nodes: "1:".into(),
                    container: container("worker", 2),
                    options: Default::default(),
                },
            ],
        }),
    })
}

fn submission_after(job: &str, dependency: &str) -> Command {
    let after = Dependency {
        job: Some(id(dependency)),
        kind: DependencyKind::Plain,
    };
    submission(job, vec![after], None)
}
