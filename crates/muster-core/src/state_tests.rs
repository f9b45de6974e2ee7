//! Table and property tests of the state machine.

use crate::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn ce(name: &str) -> Command {
    Command::CreateComputeEnvironment(ComputeEnvironment {
        name: name.into(),
        arn: Arn(String::new()),
        uuid: format!("uuid-{name}"),
        ce_type: CeType::Unmanaged,
        state: EnabledState::Enabled,
        unmanaged_vcpus: None,
        service_role: None,
        tags: Default::default(),
        created_at: Timestamp(1),
        extra: Default::default(),
    })
}

fn queue(name: &str, ce: &str) -> Command {
    Command::CreateJobQueue(JobQueue {
        name: name.into(),
        arn: Arn(String::new()),
        priority: 1,
        state: EnabledState::Enabled,
        compute_environment_order: vec![CeOrder {
            order: 1,
            compute_environment: ce.into(),
        }],
        tags: Default::default(),
        created_at: Timestamp(1),
        scheduling_policy_arn: None,
        time_limit_actions: Vec::new(),
        extra: Default::default(),
    })
}

fn definition(name: &str, command: &[&str]) -> Command {
    Command::RegisterJobDefinition(JobDefinitionSpec {
        name: name.into(),
        container: ContainerSpec {
            image: "img".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            vcpus: Some(1),
            memory: Some(64),
            ..Default::default()
        },
        parameters: [("who".to_owned(), "world".to_owned())].into(),
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

fn submit(id: &str, at: u64, definition: &str) -> Command {
    Command::SubmitJob(JobSubmission {
        id: JobId::from(id),
        at: Timestamp(at),
        name: id.into(),
        queue: "q".into(),
        definition: definition.into(),
        overrides: Default::default(),
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
    })
}

fn node(id: &str) -> Command {
    Command::RegisterNode {
        node: NodeId(id.into()),
        compute_environment: "ce".into(),
        inventory: NodeInventory {
            capacity: Resources::new(2000, 1024, 0),
            hostname: id.into(),
            address: "127.0.0.1".into(),
            executor: "process".into(),
            gpus: Vec::new(),
            labels: Default::default(),
            log_address: String::new(),
        },
        at: Timestamp(2),
    }
}

fn base() -> State {
    let mut s = State::default();
    for cmd in [
        ce("ce"),
        queue("q", "ce"),
        definition("d", &["echo", "Ref::who"]),
        node("n1"),
    ] {
        assert!(!matches!(s.apply(cmd), Outcome::Rejected(_)));
    }
    s
}

#[test]
fn definitions_get_revisions_and_resolve_by_name_revision_and_arn() {
    let mut s = base();
    let second = s.apply(definition("d", &["true"]));
    assert_eq!(
        second,
        Outcome::DefinitionRegistered {
            name: "d".into(),
            revision: 2,
            arn: "arn:aws:batch:us-east-1:000000000000:job-definition/d:2".into()
        }
    );
    assert_eq!(s.definition("d").unwrap().revision, 2);
    assert_eq!(s.definition("d:1").unwrap().revision, 1);
    assert_eq!(
        s.definition("arn:aws:batch:us-east-1:000000000000:job-definition/d:1")
            .unwrap()
            .revision,
        1
    );
    assert!(s.definition("d:3").is_none());
    assert!(s.definition("d:0").is_none());
    assert!(s.definition("d:x").is_none());
}

#[test]
fn a_job_goes_through_its_lifecycle_and_parameters_fill_the_command() {
    let mut s = base();
    assert!(matches!(
        s.apply(submit("j", 10, "d")),
        Outcome::JobSubmitted { .. }
    ));
    assert_eq!(
        s.find_job(&JobId::from("j")).unwrap().status,
        JobStatus::Runnable
    );
    let placed = s.apply(Command::Place {
        term: 3,
        at: Timestamp(11),
        placements: vec![Placement {
            job: JobId::from("j"),
            node: NodeId("n1".into()),
            gpus: vec![],
        }],
    });
    assert_eq!(
        placed,
        Outcome::Placed {
            placed: 1,
            refused: 0
        }
    );
    let assignments = s.assignments_for(&NodeId("n1".into()));
    assert_eq!(assignments[0].command, vec!["echo", "world"]);
    assert_eq!(assignments[0].term, 3);
    assert!(
        assignments[0]
            .environment
            .contains(&("AWS_BATCH_JOB_ATTEMPT".into(), "1".into()))
    );
    let report = |event, at| Command::ReportAttempt {
        job: JobId::from("j"),
        attempt: 1,
        node: NodeId("n1".into()),
        event,
        at: Timestamp(at),
    };
    assert_eq!(s.apply(report(AttemptEvent::Running, 12)), Outcome::Done);
    // A report for another attempt number is stale.
    let stale = Command::ReportAttempt {
        job: JobId::from("j"),
        attempt: 2,
        node: NodeId("n1".into()),
        event: AttemptEvent::Exited {
            exit_code: Some(0),
            reason: None,
        },
        at: Timestamp(13),
    };
    assert!(matches!(s.apply(stale), Outcome::Ignored(_)));
    assert_eq!(
        s.apply(report(
            AttemptEvent::Exited {
                exit_code: Some(4),
                reason: None
            },
            14
        )),
        Outcome::Done
    );
    let job = s.find_job(&JobId::from("j")).unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(
        (job.started_at, job.stopped_at),
        (Some(Timestamp(12)), Some(Timestamp(14)))
    );
    assert_eq!(job.attempts[0].exit_code, Some(4));
    assert_eq!(
        s.node(&NodeId("n1".into())).unwrap().allocated,
        Resources::ZERO
    );
    // A terminal job never changes again.
    assert!(matches!(
        s.apply(report(AttemptEvent::Running, 15)),
        Outcome::Ignored(_)
    ));
}

/// The scheduler plans again only when the placement epoch moves, and an agent's stream
/// looks again only when its node is affected: an attempt reported RUNNING moves neither,
/// everything that frees room or adds work does.
#[test]
fn only_what_can_change_placements_or_assignments_wakes_the_scheduler_or_a_stream() {
    let mut s = base();
    let n1 = NodeId("n1".into());
    let epoch = s.placement_epoch();
    s.apply(submit("j", 10, "d"));
    assert!(s.placement_epoch() > epoch, "a submit adds work");
    s.apply(Command::Place {
        term: 1,
        at: Timestamp(11),
        placements: vec![Placement {
            job: JobId::from("j"),
            node: n1.clone(),
            gpus: vec![],
        }],
    });
    assert_eq!(
        s.assignment_keys(&n1),
        s.assignments_for(&n1)
            .iter()
            .map(|a| (a.job.clone(), a.attempt))
            .collect::<Vec<_>>()
    );
    assert_eq!(s.assignment_keys(&n1), vec![(JobId::from("j"), 1)]);
    let reports = |event| Command::ReportAttempts {
        reports: vec![AttemptReport {
            job: JobId::from("j"),
            attempt: 1,
            node: n1.clone(),
            event,
        }],
        at: Timestamp(12),
    };
    let running = reports(AttemptEvent::Running);
    assert_eq!(s.nodes_affected_by(&running), AffectedNodes::Some(vec![]));
    let epoch = s.placement_epoch();
    s.apply(running);
    assert_eq!(s.placement_epoch(), epoch, "RUNNING frees nothing");
    assert_eq!(s.assignment_keys(&n1).len(), 1);

    let exited = reports(AttemptEvent::Exited {
        exit_code: Some(0),
        reason: None,
    });
    assert_eq!(
        s.nodes_affected_by(&exited),
        AffectedNodes::Some(vec![n1.clone()])
    );
    s.apply(exited);
    assert!(s.placement_epoch() > epoch, "an exit frees room");
    assert!(s.assignment_keys(&n1).is_empty());
}

#[test]
fn submits_are_refused_for_unknown_or_disabled_targets() {
    let mut s = base();
    let Outcome::Rejected(r) = s.apply(submit("j", 1, "nope")) else {
        panic!()
    };
    assert_eq!(r.field, "jobDefinition");
    let mut sub = submit("j", 1, "d");
    if let Command::SubmitJob(ref mut j) = sub {
        j.queue = "missing".into();
    }
    let Outcome::Rejected(r) = s.apply(sub) else {
        panic!()
    };
    assert_eq!(r.field, "jobQueue");
    assert_eq!(s.job_count(), 0);
}

#[test]
fn resubmitting_the_same_id_returns_the_first_job() {
    let mut s = base();
    let first = s.apply(submit("j", 1, "d"));
    assert_eq!(s.apply(submit("j", 2, "d")), first);
    assert_eq!(s.job_count(), 1);
}

fn any_command() -> impl Strategy<Value = Command> {
    let ids = prop::sample::select(vec!["a", "b", "c", "d", "e"]);
    prop_oneof![
        (ids.clone(), 0u64..100).prop_map(|(id, at)| submit(id, at, "d")),
        (ids.clone(), prop::sample::select(vec!["n1", "n2"])).prop_map(|(id, n)| Command::Place {
            term: 1,
            at: Timestamp(200),
            placements: vec![Placement {
                job: JobId::from(id),
                node: NodeId(n.into()),
                gpus: vec![]
            }],
        }),
        (ids.clone(), 1u32..3, prop::bool::ANY, -1i32..3).prop_map(
            |(id, attempt, running, code)| {
                Command::ReportAttempt {
                    job: JobId::from(id),
                    attempt,
                    node: NodeId("n1".into()),
                    event: if running {
                        AttemptEvent::Running
                    } else {
                        AttemptEvent::Exited {
                            exit_code: (code >= 0).then_some(code),
                            reason: None,
                        }
                    },
                    at: Timestamp(300),
                }
            }
        ),
        ids.prop_map(|id| Command::TerminateJob {
            job: JobId::from(id),
            reason: "r".into(),
            at: Timestamp(400)
        }),
        Just(node("n2")),
        Just(definition("d", &["true"])),
    ]
}

proptest! {
    /// Replaying the same log gives the same state and outcomes; a snapshot taken at any point
    /// and restored behaves exactly like the original; no node is ever over its capacity.
    #[test]
    fn apply_is_deterministic_and_snapshots_are_faithful(commands in prop::collection::vec(any_command(), 0..60), cut in 0usize..60) {
        let mut a = base();
        let mut b = base();
        let mut restored: Option<State> = None;
        for (i, cmd) in commands.iter().enumerate() {
            if i == cut.min(commands.len()) {
                let bytes = serde_json::to_vec(&a).unwrap();
                let mut s: State = serde_json::from_slice(&bytes).unwrap();
                s.rebuild_indexes();
                restored = Some(s);
            }
            let out_a = a.apply(cmd.clone());
            let out_b = b.apply(cmd.clone());
            prop_assert_eq!(&out_a, &out_b);
            if let Some(r) = restored.as_mut() {
                prop_assert_eq!(&r.apply(cmd.clone()), &out_a);
            }
            // No node over its capacity, and every node's books match its jobs.
            prop_assert_eq!(a.resource_violations(), Vec::<String>::new());
        }
        prop_assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
        if let Some(r) = restored {
            prop_assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&r).unwrap());
            prop_assert_eq!(a.runnable_jobs("q").map(|j| j.id.clone()).collect::<Vec<_>>(),
                            r.runnable_jobs("q").map(|j| j.id.clone()).collect::<Vec<_>>());
        }
    }
}

#[test]
fn jobs_see_exactly_their_gpus_whatever_they_set() {
    let mut s = base();
    s.apply(Command::RegisterNode {
        node: NodeId("gpu".into()),
        compute_environment: "ce".into(),
        inventory: NodeInventory {
            capacity: Resources::new(4000, 4096, 2),
            hostname: "gpu".into(),
            address: "127.0.0.1".into(),
            executor: "process".into(),
            gpus: (0..2)
                .map(|i| GpuDevice {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    model: "H100".into(),
                    memory_mib: 81559,
                    nvlink_peers: vec![1 - i],
                })
                .collect(),
            labels: Default::default(),
            log_address: String::new(),
        },
        at: Timestamp(3),
    });
    let mut with_gpu = submit("g", 10, "d");
    if let Command::SubmitJob(ref mut j) = with_gpu {
        j.overrides.resource_requirements = vec![ResourceRequirement {
            resource_type: ResourceType::Gpu,
            value: "1".into(),
        }];
        j.overrides.environment = vec![("NVIDIA_VISIBLE_DEVICES".into(), "all".into())];
    }
    s.apply(with_gpu);
    s.apply(submit("c", 11, "d"));
    let gpu = NodeId("gpu".into());
    let placements = vec![
        Placement {
            job: JobId::from("g"),
            node: gpu.clone(),
            gpus: vec![1],
        },
        Placement {
            job: JobId::from("c"),
            node: gpu.clone(),
            gpus: vec![],
        },
    ];
    assert_eq!(
        s.apply(Command::Place {
            term: 1,
            at: Timestamp(12),
            placements
        }),
        Outcome::Placed {
            placed: 2,
            refused: 0
        }
    );
    let env = |job: &str| {
        let a = s
            .assignments_for(&gpu)
            .into_iter()
            .find(|a| a.job.as_str() == job)
            .unwrap();
        let get = |k: &str| {
            a.environment
                .iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        (
            get("NVIDIA_VISIBLE_DEVICES"),
            get("CUDA_VISIBLE_DEVICES"),
            a.gpus.len(),
        )
    };
    assert_eq!(
        env("g"),
        (vec!["GPU-1".to_owned()], vec!["1".to_owned()], 1)
    );
    assert_eq!(env("c"), (vec!["void".to_owned()], vec![String::new()], 0));
    // A placement naming a GPU already held, or the wrong number of GPUs, is refused.
    s.apply(submit("h", 13, "d"));
    let wrong = vec![Placement {
        job: JobId::from("h"),
        node: gpu.clone(),
        gpus: vec![1],
    }];
    assert_eq!(
        s.apply(Command::Place {
            term: 1,
            at: Timestamp(14),
            placements: wrong
        }),
        Outcome::Placed {
            placed: 0,
            refused: 1
        }
    );
}

#[test]
fn books_that_do_not_match_the_placed_jobs_are_reported() {
    let mut s = base();
    s.apply(submit("j", 10, "d"));
    s.apply(Command::Place {
        term: 1,
        at: Timestamp(11),
        placements: vec![Placement {
            job: JobId::from("j"),
            node: NodeId("n1".into()),
            gpus: vec![],
        }],
    });
    assert_eq!(s.resource_violations(), Vec::<String>::new());
    // The same state with the node's allocation doubled, as a bug in apply might leave it.
    let mut value = serde_json::to_value(&s).unwrap();
    let allocated = &mut value["nodes"]["n1"]["allocated"]["millicpus"];
    *allocated = serde_json::json!(allocated.as_u64().unwrap() * 100);
    let mut broken: State = serde_json::from_value(value).unwrap();
    broken.rebuild_indexes();
    let found = broken.resource_violations();
    assert!(
        found
            .iter()
            .any(|v| v.contains("the jobs placed there hold")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|v| v.contains("over-committed")),
        "{found:?}"
    );
}

#[test]
fn parameters_are_substituted_inside_arguments_longest_name_first() {
    let parameters: BTreeMap<String, String> = [("msg", "hello"), ("a", "1"), ("ab", "2")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let command: Vec<String> = [
        "sh",
        "-c",
        "test Ref::msg = hello",
        "Ref::abc",
        "Ref::a",
        "Ref::zz Ref::",
        "Ref::msgRef::ab",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(
        crate::state::assignments::substitute_parameters(&command, &parameters),
        [
            "sh",
            "-c",
            "test hello = hello",
            "2c",
            "1",
            "Ref::zz Ref::",
            "hello2"
        ]
    );
}

#[test]
fn jobs_of_eks_and_ecs_definitions_are_refused_by_the_state_machine() {
    let mut s = base();
    let Command::RegisterJobDefinition(mut spec) = definition("pod", &["true"]) else {
        unreachable!("definition() registers a definition")
    };
    spec.orchestration = Orchestration::Eks;
    s.apply(Command::RegisterJobDefinition(spec));
    let refused = s.apply(submit("p", 10, "pod"));
    assert!(
        matches!(&refused, Outcome::Rejected(r) if r.message.contains("eksProperties; Muster runs container jobs")),
        "{refused:?}"
    );
    assert!(s.find_job(&JobId::from("p")).is_none());
}

#[test]
fn a_share_identifier_is_refused_by_the_state_machine_on_a_fifo_queue() {
    let mut s = base();
    let Command::SubmitJob(mut sub) = submit("shared", 10, "d") else {
        unreachable!("submit() makes a SubmitJob")
    };
    sub.share_identifier = Some("teamA".into());
    let refused = s.apply(Command::SubmitJob(sub));
    assert!(
        matches!(&refused, Outcome::Rejected(r) if r.message.contains("only queues with a fair-share scheduling policy")),
        "{refused:?}"
    );
}

#[test]
fn multinode_definitions_stored_before_gangs_ran_must_be_registered_again() {
    // An earlier release stored multinode definitions untyped (their jobs were refused):
    // running their main node's container alone would not be the job that was asked for.
    let mut s = base();
    let Command::RegisterJobDefinition(mut spec) = definition("mpi", &["true"]) else {
        unreachable!("definition() registers a definition")
    };
    spec.extra
        .insert("type".into(), serde_json::json!("multinode"));
    s.apply(Command::RegisterJobDefinition(spec));
    let refused = s.apply(submit("m", 10, "mpi"));
    assert!(
        matches!(&refused, Outcome::Rejected(r) if r.field == "jobDefinition" && r.message.contains("register it again")),
        "{refused:?}"
    );
}

#[test]
fn terminating_a_starting_job_ends_it_at_once_and_a_running_one_when_its_agent_reports() {
    let mut s = base();
    for id in ["starting", "running"] {
        s.apply(submit(id, 10, "d"));
        s.apply(Command::Place {
            term: 1,
            at: Timestamp(11),
            placements: vec![Placement {
                job: JobId::from(id),
                node: NodeId("n1".into()),
                gpus: vec![],
            }],
        });
    }
    s.apply(Command::ReportAttempt {
        job: JobId::from("running"),
        attempt: 1,
        node: NodeId("n1".into()),
        event: AttemptEvent::Running,
        at: Timestamp(12),
    });
    for id in ["starting", "running"] {
        s.apply(Command::TerminateJob {
            job: JobId::from(id),
            reason: "stop".into(),
            at: Timestamp(13),
        });
    }
    // Its agent may never have seen the STARTING attempt: nothing would ever report its end.
    let starting = s.find_job(&JobId::from("starting")).unwrap();
    assert_eq!(starting.status, JobStatus::Failed);
    assert_eq!(starting.status_reason.as_deref(), Some("stop"));
    assert_eq!(starting.attempts.len(), 1, "no retry after a terminate");
    // The RUNNING one is stopped by its agent, whose report ends it.
    assert_eq!(
        s.find_job(&JobId::from("running")).unwrap().status,
        JobStatus::Running
    );
    assert!(s.assignments_for(&NodeId("n1".into())).is_empty());
    assert_eq!(s.resource_violations(), Vec::<String>::new());
}

#[test]
fn the_region_and_account_are_set_before_anything_names_them_and_then_fixed() {
    let scope = |region: &str, account: &str| {
        Command::Admin(AdminCommand::SetArnScope(ArnScope {
            region: region.into(),
            account: account.into(),
        }))
    };
    let mut state = State::default();
    for (bad, field) in [
        (scope("Mars", "123456789012"), "region"),
        (scope("eu-west", "123456789012"), "region"),
        (scope("eu-west-1", "1234"), "account_id"),
        (scope("eu-west-1", "12345678901x"), "account_id"),
    ] {
        match state.apply(bad) {
            Outcome::Rejected(r) => assert_eq!(r.field, field, "{}", r.message),
            other => panic!("accepted: {other:?}"),
        }
    }
    assert_eq!(
        state.apply(scope("eu-west-1", "123456789012")),
        Outcome::Done
    );
    assert_eq!(state.apply(ce("ce")), Outcome::Done);
    assert_eq!(
        state.compute_environment("ce").map(|c| c.arn.0.clone()),
        Some("arn:aws:batch:eu-west-1:123456789012:compute-environment/ce".into())
    );
    // The same again changes nothing; another is refused once an ARN exists.
    assert_eq!(
        state.apply(scope("eu-west-1", "123456789012")),
        Outcome::Done
    );
    match state.apply(scope("us-gov-west-1", "123456789012")) {
        Outcome::Rejected(r) => assert!(r.message.contains("already name region eu-west-1")),
        other => panic!("accepted: {other:?}"),
    }
    assert_eq!(state.arn_scope().region, "eu-west-1");
}

#[test]
fn join_tokens_are_made_once_revoked_by_id_and_agents_revoked_by_name() {
    let mut s = base();
    let token = |id: &str, expires: u64| {
        Command::Access(AccessCommand::CreateJoinToken(JoinToken {
            id: id.into(),
            secret_sha256: "ab".repeat(32),
            created_at: Timestamp(1_000),
            expires_at: Timestamp(expires),
            description: String::new(),
            revoked: false,
        }))
    };
    assert_eq!(s.apply(token("abcd1234", 5_000)), Outcome::Done);
    assert!(
        s.join_token("abcd1234")
            .unwrap()
            .usable_at(Timestamp(4_999))
    );
    assert!(
        !s.join_token("abcd1234")
            .unwrap()
            .usable_at(Timestamp(5_000))
    );
    // The same id twice, a bad id, an expiry before creation: refused, state unchanged.
    for bad in [
        token("abcd1234", 9_000),
        token("AB", 9_000),
        token("later123", 500),
    ] {
        assert!(matches!(s.apply(bad), Outcome::Rejected(_)));
    }
    assert_eq!(s.join_tokens().count(), 1);
    let revoke = |id: &str| Command::Access(AccessCommand::RevokeJoinToken { id: id.into() });
    assert!(matches!(s.apply(revoke("nosuch12")), Outcome::Rejected(_)));
    assert_eq!(s.apply(revoke("abcd1234")), Outcome::Done);
    assert!(
        !s.join_token("abcd1234")
            .unwrap()
            .usable_at(Timestamp(2_000))
    );

    let unknown = Command::Access(AccessCommand::RevokeAgent {
        node: NodeId("n1-typo".into()),
        at: Timestamp(3_000),
    });
    assert!(
        matches!(s.apply(unknown), Outcome::Rejected(_)),
        "a mistyped name was banned"
    );
    let node = NodeId("n1".into());
    assert!(!s.agent_revoked(&node));
    let revoke_agent = Command::Access(AccessCommand::RevokeAgent {
        node: node.clone(),
        at: Timestamp(3_000),
    });
    assert!(
        matches!(s.nodes_affected_by(&revoke_agent), AffectedNodes::Some(n) if n == vec![node.clone()])
    );
    assert_eq!(s.apply(revoke_agent), Outcome::Done);
    assert!(s.agent_revoked(&node));
    // Forgotten by retention once expired before its cutoff; revoked agents are not.
    let kept = s.clone();
    s.apply(Command::PurgeJobs {
        before: Timestamp(5_000),
    });
    assert!(
        s.join_token("abcd1234").is_some(),
        "expired at the cutoff, not before it"
    );
    s.apply(Command::PurgeJobs {
        before: Timestamp(5_001),
    });
    assert!(s.join_token("abcd1234").is_none());
    assert!(s.agent_revoked(&node));
    let s = kept;
    // Kept in snapshots.
    let restored: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert!(restored.agent_revoked(&node));
    assert!(restored.join_token("abcd1234").unwrap().revoked);
}

#[test]
fn a_reinstated_agent_is_refused_the_certificates_it_held_before_its_revocation() {
    let mut s = base();
    let node = NodeId("n1".into());
    let minute = 60_000;
    let reinstate = |at: u64| {
        Command::Access(AccessCommand::ReinstateAgent {
            node: node.clone(),
            at: Timestamp(at),
        })
    };
    let refused = |s: &State, issued: Option<u64>| {
        s.agent_certificate_refused(&node, || issued.map(Timestamp))
    };
    assert!(!refused(&s, Some(0)), "never revoked: any certificate");
    assert!(
        matches!(s.apply(reinstate(minute)), Outcome::Rejected(r) if r.message.contains("is not revoked"))
    );
    let revoked_at = 100 * minute;
    s.apply(Command::Access(AccessCommand::RevokeAgent {
        node: node.clone(),
        at: Timestamp(revoked_at),
    }));
    assert!(
        refused(&s, Some(revoked_at + 60 * minute)),
        "revoked: every certificate"
    );
    // Ten minutes after the revocation at the earliest, whatever the certificate.
    let too_soon = s.apply(reinstate(revoked_at + 10 * minute - 1));
    assert!(
        matches!(too_soon, Outcome::Rejected(ref r) if r.field == "node" && r.message.contains("in 1 s")),
        "{too_soon:?}"
    );
    let kept = s.clone();
    assert_eq!(s.apply(reinstate(revoked_at + 10 * minute)), Outcome::Done);
    assert!(!s.agent_revoked(&node));
    // Issued up to the clock skew after the revocation: taken for one from before it.
    let skew = 5 * minute;
    assert!(refused(&s, Some(revoked_at - minute)));
    assert!(refused(&s, Some(revoked_at + skew)));
    assert!(
        refused(&s, None),
        "a certificate whose issue cannot be read"
    );
    assert!(!refused(&s, Some(revoked_at + skew + 1)));
    assert!(
        matches!(
            s.apply(reinstate(revoked_at + 20 * minute)),
            Outcome::Rejected(_)
        ),
        "reinstated twice"
    );
    // Kept in snapshots; revoked again, every certificate is refused again.
    let restored: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert!(refused(&restored, Some(revoked_at)));
    assert!(!refused(&restored, Some(revoked_at + skew + 1)));
    s.apply(Command::Access(AccessCommand::RevokeAgent {
        node: node.clone(),
        at: Timestamp(revoked_at + 30 * minute),
    }));
    assert!(refused(&s, Some(revoked_at + 20 * minute)));
    assert_eq!(s.reinstated_agents().count(), 0);
    // A refused reinstatement changed nothing.
    assert!(kept.agent_revoked(&node) && kept.reinstated_agents().count() == 0);
}

#[test]
fn a_cluster_remembers_it_had_join_tokens_after_retention_forgets_them() {
    let mut s = base();
    assert!(
        !s.ever_had_join_tokens(),
        "a cluster being founded has had none"
    );
    let made = s.apply(Command::Access(AccessCommand::CreateJoinToken(JoinToken {
        id: "abcd1234".into(),
        secret_sha256: "ab".repeat(32),
        created_at: Timestamp(1_000),
        expires_at: Timestamp(5_000),
        description: String::new(),
        revoked: false,
    })));
    assert_eq!(made, Outcome::Done);
    s.apply(Command::PurgeJobs {
        before: Timestamp(6_000),
    });
    assert_eq!(
        s.join_tokens().count(),
        0,
        "retention forgot the expired token"
    );
    assert!(s.ever_had_join_tokens());
    // And a replica restored from a snapshot knows it too.
    let restored: State = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
    assert!(restored.ever_had_join_tokens());
}

#[test]
fn the_cluster_level_only_rises_and_a_state_that_records_none_is_level_one() {
    let mut s = base();
    assert_eq!(s.cluster_level(), 1);
    assert_eq!(
        s.apply(Command::SetClusterLevel { level: 3 }),
        Outcome::Done
    );
    assert_eq!(s.cluster_level(), 3);
    s.apply(Command::SetClusterLevel { level: 2 });
    assert_eq!(s.cluster_level(), 3, "a level never goes down");
    // A state written by a release before levels has no such member.
    let mut old = serde_json::to_value(&s).unwrap();
    old.as_object_mut().unwrap().remove("cluster_level");
    let read: State = serde_json::from_value(old).unwrap();
    assert_eq!(read.cluster_level(), 1);
}
