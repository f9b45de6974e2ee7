//! Retries, dependencies and array jobs in the state machine, driven by a simulated agent.

use crate::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn setup(vcpus: u64) -> State {
    let mut s = State::default();
    let cmds = [
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
        Command::RegisterJobDefinition(JobDefinitionSpec {
            name: "d".into(),
            container: ContainerSpec {
                image: "i".into(),
                vcpus: Some(1),
                memory: Some(16),
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
        }),
        Command::RegisterNode {
            node: NodeId("n".into()),
            compute_environment: "ce".into(),
            inventory: NodeInventory {
                capacity: Resources::new(vcpus * 1000, 1 << 20, 0),
                hostname: "n".into(),
                address: "a".into(),
                executor: "process".into(),
                gpus: Vec::new(),
                labels: Default::default(),
                log_address: String::new(),
            },
            at: Timestamp(0),
        },
    ];
    for c in cmds {
        assert!(!matches!(s.apply(c), Outcome::Rejected(_)));
    }
    s
}

fn submission(
    id: &str,
    deps: Vec<Dependency>,
    array: Option<u32>,
    retry: Option<RetryStrategy>,
) -> Command {
    Command::SubmitJob(JobSubmission {
        id: JobId::from(id),
        at: Timestamp(1),
        name: "j".into(),
        queue: "q".into(),
        definition: "d".into(),
        overrides: Default::default(),
        parameters: Default::default(),
        tags: Default::default(),
        retry,
        timeout_secs: None,
        depends_on: deps,
        array_size: array,
        share_identifier: None,
        scheduling_priority_override: None,
        extra: Default::default(),
        node_overrides: None,
    })
}

fn after(id: &str) -> Dependency {
    Dependency {
        job: Some(JobId::from(id)),
        kind: DependencyKind::Plain,
    }
}

fn status(s: &State, id: &str) -> JobStatus {
    s.job(&JobId::from(id)).unwrap().status
}

/// Places every RUNNABLE job that fits and lets `exit` decide each attempt's exit code.
/// Returns the order in which attempts ran.
fn run_until_idle(s: &mut State, mut exit: impl FnMut(&JobId, u32) -> i32) -> Vec<JobId> {
    let mut ran = Vec::new();
    for round in 0..10_000u64 {
        let runnable: Vec<JobId> = s.runnable_jobs("q").map(|j| j.id.clone()).collect();
        if runnable.is_empty() {
            break;
        }
        let placements = runnable
            .iter()
            .map(|j| Placement {
                job: j.clone(),
                node: NodeId("n".into()),
                gpus: vec![],
            })
            .collect();
        s.apply(Command::Place {
            term: 1,
            at: Timestamp(10 + round),
            placements,
        });
        let placed: Vec<JobId> = s
            .node(&NodeId("n".into()))
            .unwrap()
            .placed_jobs
            .iter()
            .cloned()
            .collect();
        for id in placed {
            let attempt = s.job(&id).unwrap().active.as_ref().unwrap().number;
            // No job runs before every dependency succeeded.
            if let Some(dep) = s.job(&id).unwrap().waiting_on.first() {
                panic!("{id} runs while waiting on {dep}");
            }
            let node = NodeId("n".into());
            let at = Timestamp(10 + round);
            s.apply(Command::ReportAttempt {
                job: id.clone(),
                attempt,
                node: node.clone(),
                event: AttemptEvent::Running,
                at,
            });
            let code = exit(&id, attempt);
            let event = AttemptEvent::Exited {
                exit_code: Some(code),
                reason: None,
            };
            s.apply(Command::ReportAttempt {
                job: id.clone(),
                attempt,
                node,
                event,
                at,
            });
            ran.push(id);
        }
    }
    ran
}

#[test]
fn retries_follow_evaluate_on_exit_first_match_wins() {
    let strategy = RetryStrategy {
        attempts: 3,
        evaluate_on_exit: vec![
            ExitRule {
                on_status_reason: None,
                on_reason: None,
                on_exit_code: Some("4*".into()),
                action: RetryAction::Exit,
            },
            ExitRule {
                on_status_reason: Some("Host*".into()),
                on_reason: None,
                on_exit_code: None,
                action: RetryAction::Retry,
            },
        ],
    };
    assert!(!strategy.retries(1, Some(42), None, "Essential container in task exited"));
    assert!(
        strategy.retries(1, Some(1), None, "Essential container in task exited"),
        "no match retries"
    );
    assert!(strategy.retries(2, None, None, "Host n terminated."));
    assert!(
        !strategy.retries(3, Some(1), None, "x"),
        "never past the attempts"
    );

    let mut s = setup(4);
    s.apply(submission(
        "flaky",
        vec![],
        None,
        Some(RetryStrategy {
            attempts: 3,
            evaluate_on_exit: vec![],
        }),
    ));
    let ran = run_until_idle(&mut s, |_, attempt| if attempt < 3 { 1 } else { 0 });
    assert_eq!(ran.len(), 3);
    let job = s.job(&JobId::from("flaky")).unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(
        job.attempts.iter().map(|a| a.exit_code).collect::<Vec<_>>(),
        vec![Some(1), Some(1), Some(0)]
    );

    s.apply(submission("doomed", vec![], None, Some(strategy)));
    run_until_idle(&mut s, |_, _| 42);
    let job = s.job(&JobId::from("doomed")).unwrap();
    assert_eq!(
        (job.status, job.attempts.len()),
        (JobStatus::Failed, 1),
        "exit code 42 matched EXIT"
    );
}

/// Ended jobs stay for the retention period on every replica: one that made a single attempt
/// holds room for one record, not the four a growing `Vec` would reserve.
#[test]
fn an_ended_job_holds_room_only_for_the_attempts_it_made() {
    let mut s = setup(4);
    s.apply(submission("once", vec![], None, None));
    s.apply(submission(
        "thrice",
        vec![],
        None,
        Some(RetryStrategy {
            attempts: 3,
            evaluate_on_exit: vec![],
        }),
    ));
    run_until_idle(&mut s, |id, attempt| {
        if id.as_str() == "thrice" && attempt < 3 {
            1
        } else {
            0
        }
    });
    for (id, attempts) in [("once", 1), ("thrice", 3)] {
        let job = s.job(&JobId::from(id)).unwrap();
        assert_eq!(job.status, JobStatus::Succeeded);
        assert_eq!(job.attempts.len(), attempts, "{id}");
        assert_eq!(job.attempts.capacity(), attempts, "{id} keeps spare room");
    }
}

#[test]
fn dependencies_release_and_failures_cascade() {
    let mut s = setup(4);
    s.apply(submission("a", vec![], None, None));
    s.apply(submission("b", vec![after("a")], None, None));
    s.apply(submission("c", vec![after("b")], None, None));
    s.apply(submission("x", vec![], None, None));
    s.apply(submission("y", vec![after("x"), after("a")], None, None));
    assert_eq!(status(&s, "b"), JobStatus::Pending);
    let Outcome::Rejected(r) = s.apply(submission("z", vec![after("nope")], None, None)) else {
        panic!()
    };
    assert_eq!(r.field, "dependsOn.jobId");
    run_until_idle(&mut s, |id, _| if id.as_str() == "x" { 3 } else { 0 });
    assert_eq!(
        [status(&s, "a"), status(&s, "b"), status(&s, "c")],
        [JobStatus::Succeeded; 3]
    );
    assert_eq!(status(&s, "y"), JobStatus::Failed);
    assert_eq!(
        s.job(&JobId::from("y")).unwrap().status_reason.as_deref(),
        Some("Dependent Job x failed")
    );
    // Depending on a job that already failed fails at once.
    s.apply(submission("late", vec![after("y")], None, None));
    assert_eq!(status(&s, "late"), JobStatus::Failed);
}

#[test]
fn a_chain_of_ten_thousand_resolves() {
    let mut s = setup(1);
    s.apply(submission("j0", vec![], None, None));
    for i in 1..10_000 {
        s.apply(submission(
            &format!("j{i}"),
            vec![after(&format!("j{}", i - 1))],
            None,
            None,
        ));
    }
    s.apply(Command::TerminateJob {
        job: JobId::from("j0"),
        reason: "stop".into(),
        at: Timestamp(5),
    });
    // One terminate fails the whole chain, in one apply, without recursion.
    assert_eq!(status(&s, "j9999"), JobStatus::Failed);
}

#[test]
fn arrays_have_children_a_summary_and_array_dependencies() {
    let mut s = setup(2);
    s.apply(submission("arr", vec![], Some(3), None));
    assert_eq!(status(&s, "arr"), JobStatus::Pending);
    assert_eq!(s.array_children(&JobId::from("arr")).count(), 3);
    s.apply(submission(
        "seq",
        vec![Dependency {
            job: None,
            kind: DependencyKind::Sequential,
        }],
        Some(3),
        None,
    ));
    s.apply(submission(
        "nn",
        vec![Dependency {
            job: Some(JobId::from("arr")),
            kind: DependencyKind::NToN,
        }],
        Some(3),
        None,
    ));
    s.apply(submission("after-all", vec![after("arr")], None, None));
    assert_eq!(status(&s, "seq:0"), JobStatus::Runnable);
    assert_eq!(status(&s, "seq:1"), JobStatus::Pending);
    assert_eq!(status(&s, "nn:0"), JobStatus::Pending);
    let Outcome::Rejected(r) = s.apply(submission(
        "bad",
        vec![Dependency {
            job: Some(JobId::from("arr")),
            kind: DependencyKind::NToN,
        }],
        Some(4),
        None,
    )) else {
        panic!()
    };
    assert_eq!(r.field, "dependsOn.type");

    let env_of = |s: &State, id: &str| {
        s.assignments_for(&NodeId("n".into()))
            .into_iter()
            .find(|a| a.job.as_str() == id)
            .map(|a| a.environment)
    };
    s.apply(Command::Place {
        term: 1,
        at: Timestamp(2),
        placements: vec![Placement {
            job: JobId::from("arr:1"),
            node: NodeId("n".into()),
            gpus: vec![],
        }],
    });
    let env = env_of(&s, "arr:1").unwrap();
    assert!(env.contains(&("AWS_BATCH_JOB_ARRAY_INDEX".into(), "1".into())));
    assert!(env.contains(&("AWS_BATCH_JOB_ID".into(), "arr:1".into())));

    let mut order = Vec::new();
    let ran = run_until_idle(&mut s, |id, _| {
        order.push(id.0.clone());
        if id.as_str() == "arr:2" { 1 } else { 0 }
    });
    assert!(!ran.is_empty());
    assert_eq!(status(&s, "arr"), JobStatus::Failed, "one child failed");
    assert_eq!(
        [status(&s, "nn:0"), status(&s, "nn:1"), status(&s, "nn:2")],
        [
            JobStatus::Succeeded,
            JobStatus::Succeeded,
            JobStatus::Failed
        ]
    );
    assert_eq!(status(&s, "after-all"), JobStatus::Failed);
    let seq: Vec<&str> = order
        .iter()
        .map(|o| &**o)
        .filter(|o| o.starts_with("seq:"))
        .collect();
    assert_eq!(
        seq,
        ["seq:0", "seq:1", "seq:2"],
        "SEQUENTIAL runs children in order"
    );
    assert_eq!(status(&s, "seq"), JobStatus::Succeeded);
}

#[test]
fn cancelling_a_parent_cancels_its_children() {
    let mut s = setup(1);
    s.apply(submission("arr", vec![], Some(4), None));
    s.apply(Command::Admin(AdminCommand::CancelJob {
        job: JobId::from("arr"),
        reason: "no".into(),
        at: Timestamp(3),
    }));
    for i in 0..4 {
        assert_eq!(status(&s, &format!("arr:{i}")), JobStatus::Failed);
    }
    assert_eq!(status(&s, "arr"), JobStatus::Failed);
    assert_eq!(s.runnable_jobs("q").count(), 0);
}

proptest! {
    /// Random DAGs with random retry budgets and random exit codes: every job ends, no job
    /// runs before its dependencies succeeded (checked while running), attempts never exceed
    /// the strategy, a job succeeds only if all its dependencies did, and a snapshot restored
    /// mid-way gives the same result.
    #[test]
    fn random_dags_always_end(
        edges in prop::collection::vec(prop::collection::vec(any::<prop::sample::Index>(), 0..3), 1..30),
        attempts in prop::collection::vec(1u32..4, 30),
        exits in prop::collection::vec(0i32..3, 200),
    ) {
        let mut s = setup(3);
        let mut deps_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (i, parents) in edges.iter().enumerate() {
            let deps: Vec<String> = if i == 0 { vec![] } else { parents.iter().map(|p| format!("j{}", p.index(i))).collect() };
            let retry = RetryStrategy { attempts: attempts[i], evaluate_on_exit: vec![] };
            s.apply(submission(&format!("j{i}"), deps.iter().map(|d| after(d)).collect(), None, Some(retry)));
            deps_of.insert(format!("j{i}"), deps);
        }
        let mut roll = exits.iter().cycle();
        run_until_idle(&mut s, |_, _| *roll.next().unwrap());
        let restored: State = {
            let mut r: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
            r.rebuild_indexes();
            r
        };
        for (i, _) in edges.iter().enumerate() {
            let id = format!("j{i}");
            let job = s.job(&JobId::from(id.clone())).unwrap();
            prop_assert!(job.status.is_terminal(), "{} ended {:?}", id, job.status);
            prop_assert!(job.attempts.len() as u32 <= attempts[i]);
            if job.status == JobStatus::Succeeded {
                for d in &deps_of[&id] {
                    prop_assert_eq!(status(&s, d), JobStatus::Succeeded);
                }
            }
            prop_assert_eq!(restored.job(&JobId::from(id.clone())).unwrap().status, job.status);
        }
    }
}

#[test]
fn a_client_token_makes_submit_idempotent_and_purge_forgets_old_jobs() {
    let mut s = setup(1);
    let with_token = |id: &str| {
        let Command::SubmitJob(mut sub) = submission(id, vec![], None, None) else {
            unreachable!()
        };
        sub.tags
            .insert("muster:client-token".into(), "tok-1".into());
        Command::SubmitJob(sub)
    };
    let first = s.apply(with_token("first"));
    assert_eq!(
        s.apply(with_token("second")),
        first,
        "the retried submit returns the first job"
    );
    assert!(s.job(&JobId::from("second")).is_none());

    s.apply(submission("arr", vec![], Some(2), None));
    s.apply(submission("waiting", vec![after("arr")], None, None));
    run_until_idle(&mut s, |_, _| 0);
    s.apply(submission("open", vec![], None, None)); // not placed again: still RUNNABLE
    let Outcome::Purged { jobs } = s.apply(Command::PurgeJobs {
        before: Timestamp(1_000_000),
    }) else {
        panic!()
    };
    assert_eq!(jobs, 5, "first, the array with its 2 children, and waiting");
    assert!(s.job(&JobId::from("arr:1")).is_none());
    assert_eq!(status(&s, "open"), JobStatus::Runnable);
    // The token is forgotten with its job: the same token now makes a new job.
    assert!(
        matches!(s.apply(with_token("third")), Outcome::JobSubmitted { id, .. } if id.as_str() == "third")
    );
}

#[test]
fn a_lost_host_fails_its_attempts_which_retry_on_host_reasons() {
    let mut s = setup(2);
    let strategy = RetryStrategy {
        attempts: 2,
        evaluate_on_exit: vec![
            ExitRule {
                on_status_reason: Some("Host*".into()),
                on_reason: None,
                on_exit_code: None,
                action: RetryAction::Retry,
            },
            ExitRule {
                on_status_reason: Some("*".into()),
                on_reason: None,
                on_exit_code: None,
                action: RetryAction::Exit,
            },
        ],
    };
    s.apply(submission("retried", vec![], None, Some(strategy)));
    s.apply(submission("once", vec![], None, None));
    let placements = ["retried", "once"]
        .iter()
        .map(|j| Placement {
            job: JobId::from(*j),
            node: NodeId("n".into()),
            gpus: vec![],
        })
        .collect();
    s.apply(Command::Place {
        term: 1,
        at: Timestamp(2),
        placements,
    });
    assert_eq!(
        s.apply(Command::NodeLost {
            node: NodeId("n".into()),
            at: Timestamp(3)
        }),
        Outcome::Done
    );
    let retried = s.job(&JobId::from("retried")).unwrap();
    assert_eq!(retried.status, JobStatus::Runnable);
    assert_eq!(retried.attempts[0].status_reason, "Host n terminated.");
    assert_eq!(status(&s, "once"), JobStatus::Failed);
    let node = s.node(&NodeId("n".into())).unwrap();
    assert_eq!(
        (node.status, node.allocated),
        (NodeStatus::Lost, Resources::ZERO)
    );
    // Lost again is a no-op; the planner does not use a lost node.
    assert!(matches!(
        s.apply(Command::NodeLost {
            node: NodeId("n".into()),
            at: Timestamp(4)
        }),
        Outcome::Ignored(_)
    ));
}

#[test]
fn an_arrays_children_share_one_spec_in_memory_and_in_snapshots() {
    let mut s = setup(2);
    s.apply(submission("arr", vec![], Some(1000), None));
    s.apply(submission("single", vec![], None, None));
    let spec = |s: &State, id: &str| s.job(&JobId::from(id)).unwrap().spec.clone();
    let shares_parents = |s: &State| {
        (0..1000).all(|i| std::sync::Arc::ptr_eq(&spec(s, "arr"), &spec(s, &format!("arr:{i}"))))
    };
    assert!(shares_parents(&s));
    assert!(!std::sync::Arc::ptr_eq(
        &spec(&s, "arr"),
        &spec(&s, "single")
    ));

    let snapshot = serde_json::to_string(&s).unwrap();
    // One copy for the array and one for the single job, not 1,002.
    assert_eq!(
        snapshot.matches("\"definition_arn\"").count(),
        2,
        "{snapshot:.2000}"
    );
    let mut restored: State = serde_json::from_str(&snapshot).unwrap();
    restored.rebuild_indexes();
    assert!(shares_parents(&restored));
    assert_eq!(
        spec(&restored, "arr:999").container.command,
        spec(&s, "arr").container.command
    );
    assert_eq!(serde_json::to_string(&restored).unwrap(), snapshot);

    // Children report no tags of their own and cannot be tagged; the parent can.
    let arn = |s: &State, id: &str| s.job(&JobId::from(id)).unwrap().arn(s.arn_scope()).0;
    let tag = |arn: String| {
        Command::Admin(AdminCommand::TagResource {
            arn,
            tags: [("team".to_owned(), "a".to_owned())].into(),
        })
    };
    assert!(matches!(
        s.apply(tag(arn(&s, "arr:7"))),
        Outcome::Rejected(_)
    ));
    assert!(!matches!(
        s.apply(tag(arn(&s, "arr"))),
        Outcome::Rejected(_)
    ));
    assert_eq!(s.tags_of(&arn(&s, "arr")).unwrap().len(), 1);
    assert!(s.tags_of(&arn(&s, "arr:7")).is_none());
    assert!(
        s.job(&JobId::from("arr:7"))
            .unwrap()
            .reported_tags()
            .is_empty()
    );
}

#[test]
fn submits_batched_in_one_entry_are_applied_in_order_each_with_its_own_outcome() {
    let mut s = setup(1);
    let sub = |id: &str, queue: &str, token: Option<&str>| {
        let Command::SubmitJob(mut sub) = submission(id, vec![], None, None) else {
            unreachable!()
        };
        sub.queue = queue.into();
        if let Some(t) = token {
            sub.tags.insert("muster:client-token".into(), t.into());
        }
        sub
    };
    let Outcome::Each(outcomes) = s.apply(Command::SubmitJobs(vec![
        sub("a", "q", Some("t")),
        sub("b", "no-such-queue", None),
        sub("c", "q", Some("t")),
        sub("d", "q", None),
    ])) else {
        panic!("a batch answers per submit")
    };
    let ids: Vec<Option<&str>> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::JobSubmitted { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    // The retry of "a" (same client token) in the same batch gets "a" back.
    assert_eq!(ids, [Some("a"), None, Some("a"), Some("d")]);
    assert!(matches!(&outcomes[1], Outcome::Rejected(r) if r.message.contains("jobQueue")));
    assert!(s.job(&JobId::from("c")).is_none());
    let seqs: Vec<u64> = ["a", "d"]
        .iter()
        .map(|id| s.job(&JobId::from(*id)).unwrap().seq)
        .collect();
    assert!(seqs[0] < seqs[1], "submit order is batch order");
}
