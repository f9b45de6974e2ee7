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
    s.find_job(&JobId::from(id)).unwrap().status
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
            let attempt = s.find_job(&id).unwrap().active.as_ref().unwrap().number;
            // No job runs before every dependency succeeded.
            if let Some(dep) = s.find_job(&id).unwrap().waiting_on.first() {
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
    let job = s.find_job(&JobId::from("flaky")).unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(
        job.attempts.iter().map(|a| a.exit_code).collect::<Vec<_>>(),
        vec![Some(1), Some(1), Some(0)]
    );

    s.apply(submission("doomed", vec![], None, Some(strategy)));
    run_until_idle(&mut s, |_, _| 42);
    let job = s.find_job(&JobId::from("doomed")).unwrap();
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
        let job = s.find_job(&JobId::from(id)).unwrap();
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
        s.find_job(&JobId::from("y"))
            .unwrap()
            .status_reason
            .as_deref(),
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
            let job = s.find_job(&JobId::from(id.clone())).unwrap();
            prop_assert!(job.status.is_terminal(), "{} ended {:?}", id, job.status);
            prop_assert!(job.attempts.len() as u32 <= attempts[i]);
            if job.status == JobStatus::Succeeded {
                for d in &deps_of[&id] {
                    prop_assert_eq!(status(&s, d), JobStatus::Succeeded);
                }
            }
            // A snapshot carries what it remembers of ended jobs; the jobs are in the archive.
            let id = JobId::from(id.clone());
            let restored_status = restored.job(&id).map(|j| j.status).or_else(|| restored.ended_job(&id).map(|e| e.status()));
            prop_assert_eq!(restored_status, Some(job.status));
        }
        // Every job ended, by whichever path: all leave memory, the same ones on a replica
        // restored from a snapshot.
        let mut restored = restored;
        let moved = archive_all(&mut s);
        prop_assert_eq!(s.job_count(), 0);
        prop_assert_eq!(archive_all(&mut restored), moved);
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
    assert!(s.find_job(&JobId::from("second")).is_none());

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
    assert!(s.find_job(&JobId::from("arr:1")).is_none());
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
    let retried = s.find_job(&JobId::from("retried")).unwrap();
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
    let spec = |s: &State, id: &str| s.find_job(&JobId::from(id)).unwrap().spec.clone();
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
    let arn = |s: &State, id: &str| s.find_job(&JobId::from(id)).unwrap().arn(s.arn_scope()).0;
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
        s.find_job(&JobId::from("arr:7"))
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
    assert!(s.find_job(&JobId::from("c")).is_none());
    let seqs: Vec<u64> = ["a", "d"]
        .iter()
        .map(|id| s.find_job(&JobId::from(*id)).unwrap().seq)
        .collect();
    assert!(seqs[0] < seqs[1], "submit order is batch order");
}

/// Moves every ended family out of memory, as the leader's `ArchiveEnded` does once they are
/// old enough.
fn archive_all(s: &mut State) -> usize {
    match s.apply(Command::ArchiveEnded {
        before: Timestamp(u64::MAX),
        max_jobs: u32::MAX,
    }) {
        Outcome::Archived { jobs, more: false } => jobs,
        other => panic!("{other:?}"),
    }
}

/// An ended job stays in memory until `ArchiveEnded` names a cutoff after its end; then it
/// leaves (an array with its children, once all have ended). Later submits that name it are
/// decided from what the state remembers of it, the same on every replica and after a
/// snapshot; reads find it in the archive; retention forgets it there too.
#[test]
fn ended_jobs_leave_memory_and_what_names_them_later_still_sees_them() {
    let mut s = setup(4);
    s.apply(submission("good", vec![], None, None));
    s.apply(submission("bad", vec![], None, None));
    s.apply(submission("arr", vec![], Some(2), None));
    run_until_idle(&mut s, |id, _| i32::from(id.as_str() == "bad"));
    assert!(s.job(&JobId::from("good")).is_some(), "left memory unasked");
    let ended_at = s.job(&JobId::from("good")).unwrap().stopped_at.unwrap();
    assert!(!s.has_archivable_before(ended_at));
    assert!(matches!(
        s.apply(Command::ArchiveEnded {
            before: ended_at,
            max_jobs: 100
        }),
        Outcome::Archived {
            jobs: 0,
            more: false
        }
    ));
    assert!(s.has_archivable_before(Timestamp(u64::MAX)));
    // A limit of one job still moves a whole family, and says that more were due.
    assert!(matches!(
        s.apply(Command::ArchiveEnded {
            before: Timestamp(u64::MAX),
            max_jobs: 1
        }),
        Outcome::Archived { more: true, .. }
    ));
    archive_all(&mut s);
    assert!(!s.has_archivable_before(Timestamp(u64::MAX)));
    for id in ["good", "bad", "arr", "arr:0", "arr:1"] {
        let id = JobId::from(id);
        assert!(s.job(&id).is_none(), "{id} is still in memory");
        assert!(
            s.find_job(&id).is_some_and(|j| j.status.is_terminal()),
            "{id} is not archived"
        );
    }
    assert_eq!(s.ended_job_count(), 5);
    assert_eq!(s.job_count_in_queue("q"), 0);
    assert_eq!(
        s.family_of(&JobId::from("arr"))
            .iter()
            .map(|j| j.id.to_string())
            .collect::<Vec<_>>(),
        ["arr:0", "arr:1"]
    );

    // Dependencies on ended jobs: released, failed, and N_TO_N checked against the size.
    s.apply(submission("after-good", vec![after("good")], None, None));
    s.apply(submission("after-bad", vec![after("bad")], None, None));
    assert_eq!(status(&s, "after-good"), JobStatus::Runnable);
    assert_eq!(status(&s, "after-bad"), JobStatus::Failed);
    let n_to_n = |id: &str, size| {
        let Command::SubmitJob(mut sub) = submission(id, vec![], Some(size), None) else {
            unreachable!()
        };
        sub.depends_on = vec![Dependency {
            job: Some(JobId::from("arr")),
            kind: DependencyKind::NToN,
        }];
        Command::SubmitJob(sub)
    };
    assert!(matches!(
        s.apply(n_to_n("pairs", 2)),
        Outcome::JobSubmitted { .. }
    ));
    assert!(
        matches!(s.apply(n_to_n("misfit", 3)), Outcome::Rejected(r) if r.field == "dependsOn.type")
    );
    assert!(matches!(
        s.apply(submission("orphan", vec![after("nowhere")], None, None)),
        Outcome::Rejected(r) if r.field == "dependsOn.jobId"
    ));

    // A submit retried after its job ended makes no second job; a terminate changes nothing.
    let again = s.apply(submission("good", vec![], None, None));
    assert!(matches!(again, Outcome::JobSubmitted { id, .. } if id.as_str() == "good"));
    assert!(s.job(&JobId::from("good")).is_none());
    assert!(matches!(
        s.apply(Command::TerminateJob { job: JobId::from("good"), reason: "r".into(), at: Timestamp(5) }),
        Outcome::Ignored(m) if m.contains("already ended SUCCEEDED")
    ));

    // ListJobs merges jobs in memory and archived ones in submit order.
    let listed = |s: &State, status| -> Vec<String> {
        s.listed_jobs("q", status, None)
            .map(|j| j.id.to_string())
            .collect()
    };
    assert_eq!(listed(&s, Some(JobStatus::Succeeded)), ["good", "arr"]);
    assert_eq!(listed(&s, Some(JobStatus::Failed)), ["bad", "after-bad"]);
    assert_eq!(
        listed(&s, None),
        ["good", "bad", "arr", "after-good", "after-bad", "pairs"]
    );
    let after_bad = s
        .find_job(&JobId::from("bad"))
        .map(|j| (j.seq, j.id.clone()));
    assert_eq!(
        s.listed_jobs("q", None, after_bad)
            .map(|j| j.id.to_string())
            .collect::<Vec<_>>(),
        ["arr", "after-good", "after-bad", "pairs"]
    );

    // A snapshot carries what the state remembers of them.
    let mut restored: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
    restored.rebuild_indexes();
    assert_eq!(restored.ended_job_count(), s.ended_job_count());
    restored.apply(submission("later", vec![after("bad")], None, None));
    assert_eq!(status(&restored, "later"), JobStatus::Failed);

    // Moved out roots first (a job that failed as it was submitted too); forgotten by
    // retention with every child.
    assert_eq!(archive_all(&mut s), 1);
    let moved: Vec<String> = s
        .take_archive_changes()
        .moved
        .iter()
        .map(|j| j.id.to_string())
        .collect();
    let at = |id: &str| moved.iter().position(|m| m == id).unwrap();
    assert!(
        at("arr") < at("arr:0") && at("arr") < at("arr:1"),
        "{moved:?}"
    );
    assert_eq!(moved.len(), 6, "{moved:?}");
    let Outcome::Purged { jobs } = s.apply(Command::PurgeJobs {
        before: Timestamp(1_000_000),
    }) else {
        panic!()
    };
    assert_eq!(jobs, 6);
    assert_eq!(s.ended_job_count(), 0);
    let mut purged: Vec<String> = s
        .take_archive_changes()
        .purged
        .iter()
        .map(|j| j.to_string())
        .collect();
    purged.sort();
    assert_eq!(
        purged,
        ["after-bad", "arr", "arr:0", "arr:1", "bad", "good"]
    );
}

/// A state written by the release before (format 1) holds its ended jobs in the job table:
/// read unchanged, they stay there and answer as before until `ArchiveEnded` moves them (or
/// retention forgets them).
#[test]
fn ended_jobs_of_the_format_before_stay_in_memory_until_archived() {
    let mut s = setup(1);
    s.apply(submission("old", vec![], None, None));
    run_until_idle(&mut s, |_, _| 0);
    archive_all(&mut s);
    let moved = s.take_archive_changes().moved;
    let mut image = serde_json::to_value(&s).unwrap();
    image["ended"] = serde_json::json!([]);
    image["jobs"] = serde_json::json!([[&*moved[0].spec, &*moved[0]]]);
    let mut old: State = serde_json::from_value(image.clone()).unwrap();
    old.rebuild_indexes();
    let id = JobId::from("old");
    assert_eq!(old.job(&id).unwrap().status, JobStatus::Succeeded);
    old.apply(submission("next", vec![after("old")], None, None));
    assert_eq!(status(&old, "next"), JobStatus::Runnable);
    assert!(old.has_jobs_ended_before(Timestamp(1_000_000)));
    let Outcome::Purged { jobs } = old.apply(Command::PurgeJobs {
        before: Timestamp(1_000_000),
    }) else {
        panic!()
    };
    assert_eq!(jobs, 1);
    assert!(!old.job_exists(&id));

    let mut old: State = serde_json::from_value(image).unwrap();
    old.rebuild_indexes();
    assert_eq!(archive_all(&mut old), 1);
    assert!(old.job(&id).is_none());
    assert_eq!(
        old.ended_job(&id).map(|e| e.status()),
        Some(JobStatus::Succeeded)
    );
}

/// An array ended by a terminate while some children had succeeded counts each child by its
/// own end once it left memory; an ended job's tags no longer change.
#[test]
fn an_archived_array_counts_its_children_and_ended_jobs_keep_their_tags() {
    let mut s = setup(1);
    s.apply(submission("arr", vec![], Some(3), None));
    // One vCPU: one child runs and succeeds, the others wait.
    let runnable: Vec<JobId> = s.runnable_jobs("q").map(|j| j.id.clone()).take(1).collect();
    assert_eq!(runnable, [JobId::from("arr:0")]);
    s.apply(Command::Place {
        term: 1,
        at: Timestamp(2),
        placements: vec![Placement {
            job: runnable[0].clone(),
            node: NodeId("n".into()),
            gpus: vec![],
        }],
    });
    for event in [
        AttemptEvent::Running,
        AttemptEvent::Exited {
            exit_code: Some(0),
            reason: None,
        },
    ] {
        s.apply(Command::ReportAttempt {
            job: runnable[0].clone(),
            attempt: 1,
            node: NodeId("n".into()),
            event,
            at: Timestamp(3),
        });
    }
    s.apply(Command::TerminateJob {
        job: JobId::from("arr"),
        reason: "stop".into(),
        at: Timestamp(4),
    });
    archive_all(&mut s);
    let parent = s.find_job(&JobId::from("arr")).unwrap().into_owned();
    assert!(
        s.job(&parent.id).is_none(),
        "the array did not leave memory"
    );
    assert_eq!(
        s.array_status_counts(&parent),
        BTreeMap::from([(JobStatus::Succeeded, 1), (JobStatus::Failed, 2)])
    );
    let arn = s.arn_scope().arn("job", "arr").0;
    let tag = s.apply(Command::Admin(AdminCommand::TagResource {
        arn,
        tags: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
    }));
    assert!(
        matches!(tag, Outcome::Rejected(ref r) if r.field == "resourceArn" && r.message.contains("has ended")),
        "{tag:?}"
    );
}

/// A job cancelled while it waited on another leaves no trace of that wait: a replica restored
/// from a snapshot archives the same jobs as the one that applied the log.
#[test]
fn a_cancelled_dependent_does_not_keep_its_dependency_in_memory_after_a_restore() {
    let mut s = setup(1);
    s.apply(submission("first", vec![], None, None));
    s.apply(submission("second", vec![after("first")], None, None));
    s.apply(Command::Admin(AdminCommand::CancelJob {
        job: JobId::from("second"),
        reason: "no".into(),
        at: Timestamp(3),
    }));
    run_until_idle(&mut s, |_, _| 0);
    assert_eq!(status(&s, "first"), JobStatus::Succeeded);
    assert_eq!(status(&s, "second"), JobStatus::Failed);
    let mut restored: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
    restored.rebuild_indexes();
    assert_eq!(archive_all(&mut restored), 2);
    assert_eq!(archive_all(&mut s), 2);
    assert_eq!(restored.job_count(), 0);
}
