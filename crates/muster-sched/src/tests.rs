use super::*;
use crate::test_support::{
    JobSpec, compute_environment, definition, must, node_registration, queue, submission,
};
use muster_core::{Command, JobStatus, NodeStatus, Outcome, Timestamp};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp(1_000_000);

/// A state with one UNMANAGED compute environment `ce`, queues `(name, priority)` on it,
/// nodes with the given (millicpus, memory) and a definition `def` of 1 vCPU / 64 MiB.
fn cluster(queues: &[(&str, i64)], nodes: &[(u64, u64)]) -> State {
    let with_gpus: Vec<(u64, u64, u32)> = nodes.iter().map(|(c, m)| (*c, *m, 0)).collect();
    gpu_cluster(queues, &with_gpus)
}

fn gpu_cluster(queues: &[(&str, i64)], nodes: &[(u64, u64, u32)]) -> State {
    let mut s = State::default();
    must(&mut s, compute_environment(Default::default()));
    for (name, priority) in queues {
        must(&mut s, queue(name, *priority, None));
    }
    must(&mut s, definition());
    for (i, (millicpus, memory_mib, gpus)) in nodes.iter().enumerate() {
        let capacity = Resources::new(*millicpus, *memory_mib, *gpus);
        let register = node_registration(
            &format!("n{i}"),
            capacity,
            Vec::new(),
            Default::default(),
            Timestamp(0),
        );
        must(&mut s, register);
    }
    s
}

fn submit(s: &mut State, queue: &str, id: &str, at: u64, vcpus: i64, memory: i64) {
    submit_gpu(s, queue, id, at, vcpus, memory, 0);
}

fn submit_gpu(s: &mut State, queue: &str, id: &str, at: u64, vcpus: i64, memory: i64, gpus: u32) {
    let spec = JobSpec {
        queue: queue.into(),
        at,
        vcpus,
        memory,
        gpus,
        ..Default::default()
    };
    must(s, submission(id, spec));
}

fn assert_no_overcommit(s: &State) {
    for node in s.nodes() {
        assert!(
            node.allocated.fits_in(&node.inventory.capacity),
            "node {} over-committed: {:?}",
            node.id,
            node
        );
        let sum = node
            .placed_jobs
            .iter()
            .map(|id| s.find_job(id).unwrap().spec.container.resources())
            .fold(Resources::ZERO, |a, b| a + b);
        let mut held: Vec<u32> = node
            .placed_jobs
            .iter()
            .flat_map(|id| {
                s.find_job(id)
                    .unwrap()
                    .active
                    .as_ref()
                    .unwrap()
                    .gpus
                    .clone()
            })
            .collect();
        held.sort();
        let distinct: Vec<u32> = node.gpus_in_use.iter().copied().collect();
        assert_eq!(
            held, distinct,
            "GPUs of {} handed out twice or lost",
            node.id
        );
        assert!(held.iter().all(|g| *g < node.inventory.capacity.gpus));
        assert_eq!(
            sum, node.allocated,
            "allocation bookkeeping of {} drifted",
            node.id
        );
        let unbounded = node
            .placed_jobs
            .iter()
            .map(|id| s.find_job(id).unwrap())
            .filter(|j| j.spec.timeout_secs.is_none())
            .fold(Resources::ZERO, |a, j| a + j.spec.container.resources());
        assert_eq!(
            unbounded, node.allocated_unbounded,
            "bookkeeping of {}'s jobs without a timeout drifted",
            node.id
        );
    }
}

#[test]
fn a_pool_holds_only_the_environments_asked_for() {
    let s = cluster(&[("q", 1)], &[(2000, 1024), (4000, 2048)]);
    let everything = crate::pool::Pool::new(&s, &["ce"].into());
    assert_eq!(everything.rooms_in("ce").count(), 2);
    let nothing_waits = crate::pool::Pool::new(&s, &Default::default());
    assert_eq!(nothing_waits.rooms_in("ce").count(), 0);
    // And a round with nothing waiting in `q` plans nothing on `ce`.
    assert!(plan(&s, &PlanConfig::default(), NOW).placements.is_empty());
}

#[test]
fn fifo_within_a_queue_and_best_fit_across_nodes() {
    let mut s = cluster(&[("q", 1)], &[(4000, 4096), (2000, 4096)]);
    submit(&mut s, "q", "a", 1, 2, 64);
    submit(&mut s, "q", "b", 2, 4, 64);
    let p = plan(&s, &PlanConfig::default(), NOW);
    // `a` (2 vCPU) fits exactly on the 2-vCPU node; `b` (4 vCPU) then takes the big one.
    assert_eq!(
        p.placements,
        vec![
            Placement {
                job: JobId::from("a"),
                node: NodeId("n1".into()),
                gpus: vec![]
            },
            Placement {
                job: JobId::from("b"),
                node: NodeId("n0".into()),
                gpus: vec![]
            },
        ]
    );
}

#[test]
fn higher_priority_queue_is_served_first() {
    let mut s = cluster(&[("low", 1), ("high", 10)], &[(1000, 1024)]);
    submit(&mut s, "low", "l", 1, 1, 64);
    submit(&mut s, "high", "h", 2, 1, 64);
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert_eq!(
        p.placements,
        vec![Placement {
            job: JobId::from("h"),
            node: NodeId("n0".into()),
            gpus: vec![]
        }]
    );
    assert!(matches!(
        p.unplaced[0].reason,
        WaitReason::InsufficientCapacity { .. }
    ));
}

#[test]
fn waiting_jobs_say_what_is_short_where_and_how_many_are_ahead() {
    let mut s = cluster(&[("q", 1)], &[(2000, 4096)]);
    submit(&mut s, "q", "a", 1, 2, 64);
    submit(&mut s, "q", "b", 2, 2, 64);
    submit(&mut s, "q", "c", 3, 2, 64);
    submit(&mut s, "q", "huge", 4, 8, 64);
    let p = plan(&s, &PlanConfig::default(), NOW);
    let reasons: Vec<String> = p.unplaced.iter().map(|u| u.status_reason()).collect();
    assert_eq!(
        reasons,
        vec![
            "RUNNABLE: waiting for 2 vCPU, 64 MiB in ce; 1 jobs ahead; room reserved on n0"
                .to_owned(),
            "RUNNABLE: waiting for 2 vCPU, 64 MiB in ce; 2 jobs ahead".to_owned(),
            "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - the job needs 8 vCPU, 64 MiB; no node in ce can hold it".to_owned(),
        ]
    );
}

#[test]
fn jobs_without_nodes_say_so() {
    let mut s = cluster(&[("q", 1)], &[]);
    submit(&mut s, "q", "a", 1, 1, 64);
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert!(p.placements.is_empty());
    assert_eq!(
        p.unplaced[0].reason,
        WaitReason::NoNodes {
            compute_environments: vec!["ce".into()]
        }
    );
}

#[test]
fn verify_drops_placements_that_no_longer_fit() {
    let mut s = cluster(&[("q", 1)], &[(1000, 1024)]);
    submit(&mut s, "q", "a", 1, 1, 64);
    submit(&mut s, "q", "b", 2, 1, 64);
    let forged = Plan {
        placements: vec![
            Placement {
                job: JobId::from("a"),
                node: NodeId("n0".into()),
                gpus: vec![],
            },
            Placement {
                job: JobId::from("b"),
                node: NodeId("n0".into()),
                gpus: vec![],
            },
            Placement {
                job: JobId::from("a"),
                node: NodeId("n0".into()),
                gpus: vec![],
            },
        ],
        unplaced: vec![],
    };
    let checked = verify(&s, forged);
    assert_eq!(
        checked.placements,
        vec![Placement {
            job: JobId::from("a"),
            node: NodeId("n0".into()),
            gpus: vec![]
        }]
    );
}

#[test]
fn gpus_are_assigned_by_index_and_never_shared() {
    let mut s = gpu_cluster(&[("q", 1)], &[(8000, 8192, 2)]);
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        submit_gpu(&mut s, "q", id, i as u64, 1, 64, 1);
    }
    let p = verify(&s, plan(&s, &PlanConfig::default(), NOW));
    let given: Vec<(String, Vec<u32>)> = p
        .placements
        .iter()
        .map(|p| (p.job.to_string(), p.gpus.clone()))
        .collect();
    assert_eq!(given, vec![("a".into(), vec![0]), ("b".into(), vec![1])]);
    assert!(matches!(
        p.unplaced[0].reason,
        WaitReason::InsufficientCapacity { .. }
    ));
    s.apply(Command::Place {
        term: 1,
        at: Timestamp(10),
        placements: p.placements,
    });
    // `a` ends: its GPU 0 goes to `c`.
    let node = NodeId("n0".into());
    let exited = muster_core::AttemptEvent::Exited {
        exit_code: Some(0),
        reason: None,
    };
    s.apply(Command::ReportAttempt {
        job: JobId::from("a"),
        attempt: 1,
        node: node.clone(),
        event: exited,
        at: Timestamp(11),
    });
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert_eq!(
        p.placements,
        vec![Placement {
            job: JobId::from("c"),
            node,
            gpus: vec![0]
        }]
    );
    // A forged plan that hands out a GPU already in use is dropped by the applier's check.
    let forged = Plan {
        placements: vec![Placement {
            job: JobId::from("c"),
            node: NodeId("n0".into()),
            gpus: vec![1],
        }],
        unplaced: vec![],
    };
    assert!(verify(&s, forged).placements.is_empty());
}

#[test]
fn a_full_queue_is_not_scanned_to_its_end_but_oversized_jobs_do_not_block() {
    let mut s = cluster(&[("q", 1)], &[(2000, 4096)]);
    for i in 0..300 {
        submit(&mut s, "q", &format!("huge{i}"), i, 64, 64); // can never fit
    }
    submit(&mut s, "q", "small", 300, 1, 64);
    for i in 0..600 {
        submit(&mut s, "q", &format!("more{i}"), 301 + i, 2, 64);
    }
    let p = plan(&s, &PlanConfig::default(), NOW);
    // `small` is found behind 300 oversized jobs; then one 1-vCPU slot is left, so the
    // 2-vCPU jobs miss, and the scan stops after 256 of them rather than all 600.
    assert_eq!(
        p.placements
            .iter()
            .map(|p| p.job.as_str())
            .collect::<Vec<_>>(),
        vec!["small"]
    );
    assert_eq!(p.unplaced.len(), 300 + 256);
    assert!(
        p.unplaced[..300]
            .iter()
            .all(|u| u.reason.category() == "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT")
    );
}

proptest! {
    /// Plans applied round after round, with attempts finishing in between, never put more
    /// on a node than it has, and replaying a snapshot gives the same plan.
    #[test]
    fn plans_never_overcommit(
        nodes in prop::collection::vec((1u64..8, 64u64..4096, 0u32..4), 1..6),
        jobs in prop::collection::vec((0usize..3, 1i64..6, 4i64..2048, 0u32..3), 1..60),
        finish_every in 1usize..4,
    ) {
        let nodes: Vec<(u64, u64, u32)> = nodes.into_iter().map(|(c, m, g)| (c * 1000, m, g)).collect();
        let mut s = gpu_cluster(&[("q0", 1), ("q1", 5), ("q2", 5)], &nodes);
        for (i, (q, vcpus, memory, gpus)) in jobs.iter().enumerate() {
            submit_gpu(&mut s, &format!("q{q}"), &format!("j{i}"), i as u64, *vcpus, *memory, *gpus);
        }
        for round in 0..(jobs.len() as u64 + 2) {
            let p = plan(&s, &PlanConfig::default(), NOW);
            prop_assert_eq!(&p, &plan(&s.clone(), &PlanConfig::default(), NOW));
            let p = verify(&s, p);
            let n = p.placements.len();
            let outcome = s.apply(Command::Place { term: 1, at: Timestamp(1000 + round), placements: p.placements });
            prop_assert_eq!(outcome, Outcome::Placed { placed: n, refused: 0 });
            assert_no_overcommit(&s);
            // Finish some running attempts so that capacity frees up.
            let placed: Vec<_> = s.nodes().flat_map(|n| n.placed_jobs.iter().cloned().map(|j| (j, n.id.clone()))).collect();
            for (job, node) in placed.into_iter().step_by(finish_every) {
                let attempt = s.find_job(&job).unwrap().active.as_ref().unwrap().number;
                let at = Timestamp(2000 + round);
                s.apply(Command::ReportAttempt { job: job.clone(), attempt, node: node.clone(), event: muster_core::AttemptEvent::Running, at });
                s.apply(Command::ReportAttempt { job, attempt, node, event: muster_core::AttemptEvent::Exited { exit_code: Some(0), reason: None }, at });
            }
            assert_no_overcommit(&s);
        }
        // Every job that fits on some node eventually ran.
        let biggest = nodes.iter().copied().fold((0, 0), |a, b| (a.0.max(b.0), a.1.max(b.1)));
        for (i, (_, vcpus, memory, gpus)) in jobs.iter().enumerate() {
            let job = s.find_job(&JobId::from(format!("j{i}"))).unwrap();
            let fits_somewhere = nodes
                .iter()
                .any(|(c, m, g)| (*vcpus as u64) * 1000 <= *c && (*memory as u64) <= *m && gpus <= g);
            if fits_somewhere && finish_every == 1 {
                prop_assert_eq!(job.status, JobStatus::Succeeded, "job {} never ran (biggest node {:?})", i, biggest);
            }
        }
    }
}

/// One step of the interleaving property below.
#[derive(Debug, Clone)]
enum Step {
    /// Plan on the state as it is now and keep the plan (it may be applied much later).
    Plan,
    /// Re-check the oldest kept plan against the state as it is now and apply it.
    ApplyOldest,
    LoseNode(usize),
    Rejoin(usize),
    /// End one running attempt with this exit code.
    Finish(i32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Plan),
        3 => Just(Step::ApplyOldest),
        1 => (0usize..4).prop_map(Step::LoseNode),
        1 => (0usize..4).prop_map(Step::Rejoin),
        2 => prop_oneof![Just(0), Just(1)].prop_map(Step::Finish),
    ]
}

/// A lower-priority queue took nothing that an unplaced higher-priority job needed: for
/// every waiting job of `hi`, no node would fit it even with the `lo` placements undone.
fn assert_not_starved(s: &State, p: &Plan) {
    let mut free: BTreeMap<&NodeId, Resources> = s
        .nodes()
        .filter(|n| n.status == NodeStatus::Ready)
        .map(|n| (&n.id, n.free()))
        .collect();
    let mut taken_by_lo: BTreeMap<&NodeId, Resources> = BTreeMap::new();
    for placement in &p.placements {
        let job = s.find_job(&placement.job).unwrap();
        let need = job.spec.container.resources();
        let f = free.get_mut(&placement.node).unwrap();
        *f = f.saturating_sub(&need);
        if job.spec.queue == "lo" {
            let t = taken_by_lo.entry(&placement.node).or_default();
            *t = *t + need;
        }
    }
    // Room held for a reservation may go to jobs that cannot delay it, from any queue.
    let reserved: BTreeSet<&NodeId> = p
        .unplaced
        .iter()
        .filter_map(|u| u.reservation.as_ref().map(|r| &r.node))
        .collect();
    free.retain(|node, _| !reserved.contains(node));
    for u in &p.unplaced {
        let job = s.find_job(&u.job).unwrap();
        if job.spec.queue != "hi" || !matches!(u.reason, WaitReason::InsufficientCapacity { .. }) {
            continue;
        }
        for (node, f) in &free {
            let without_lo = *f + taken_by_lo.get(node).copied().unwrap_or_default();
            assert!(
                !job.spec.container.resources().fits_in(&without_lo),
                "{} of `hi` waits while `lo` jobs hold room it fits in on {node}",
                job.id
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    /// Plans applied late, in any interleaving with node loss, rejoins and attempts ending,
    /// never over-commit a node or hand out a GPU twice; no job is placed before its
    /// dependencies succeeded; a lower-priority queue never takes room a waiting
    /// higher-priority job fits in; and the same snapshot and time give the same plan.
    #[test]
    fn interleavings_with_node_loss_stay_safe(
        nodes in prop::collection::vec((1u64..8, 64u64..4096, 0u32..3), 1..5),
        jobs in prop::collection::vec(
            (any::<bool>(), 1i64..5, 4i64..1024, 0u32..2, prop::option::of(0usize..40)),
            1..40,
        ),
        steps in prop::collection::vec(step(), 1..80),
    ) {
        let nodes: Vec<(u64, u64, u32)> = nodes.into_iter().map(|(c, m, g)| (c * 1000, m, g)).collect();
        let mut s = gpu_cluster(&[("hi", 10), ("lo", 1)], &nodes);
        for (i, (high, vcpus, memory, gpus, dep)) in jobs.iter().enumerate() {
            let queue = if *high { "hi" } else { "lo" };
            let depends_on: Vec<muster_core::Dependency> = dep
                .filter(|d| *d < i)
                .map(|d| muster_core::Dependency {
                    job: Some(JobId::from(format!("j{d}"))),
                    kind: muster_core::DependencyKind::Plain,
                })
                .into_iter()
                .collect();
            let spec = JobSpec {
                queue: queue.into(),
                at: i as u64,
                vcpus: *vcpus,
                memory: *memory,
                gpus: *gpus,
                depends_on,
                ..Default::default()
            };
            must(&mut s, submission(&format!("j{i}"), spec));
        }
        let mut kept: std::collections::VecDeque<Plan> = Default::default();
        let mut clock = 10_000u64;
        for step in steps {
            clock += 1;
            let now = Timestamp(clock);
            match step {
                Step::Plan => {
                    let p = plan(&s, &PlanConfig::default(), now);
                    prop_assert_eq!(&p, &plan(&s.clone(), &PlanConfig::default(), now));
                    assert_not_starved(&s, &p);
                    kept.push_back(p);
                }
                Step::ApplyOldest => {
                    if let Some(p) = kept.pop_front() {
                        let checked = verify(&s, p);
                        let n = checked.placements.len();
                        let outcome = s.apply(Command::Place { term: 1, at: now, placements: checked.placements });
                        prop_assert_eq!(outcome, Outcome::Placed { placed: n, refused: 0 });
                    }
                }
                Step::LoseNode(i) => {
                    s.apply(Command::NodeLost { node: NodeId(format!("n{}", i % nodes.len())), at: now });
                }
                Step::Rejoin(i) => {
                    let i = i % nodes.len();
                    let (c, m, g) = nodes[i];
                    s.apply(node_registration(&format!("n{i}"), Resources::new(c, m, g), Vec::new(), Default::default(), now));
                }
                Step::Finish(code) => {
                    let placed = s.nodes().flat_map(|n| n.placed_jobs.iter().cloned().map(|j| (j, n.id.clone()))).next();
                    if let Some((job, node)) = placed {
                        let attempt = s.find_job(&job).unwrap().active.as_ref().unwrap().number;
                        s.apply(Command::ReportAttempt { job, attempt, node, event: muster_core::AttemptEvent::Exited { exit_code: Some(code), reason: None }, at: now });
                    }
                }
            }
            assert_no_overcommit(&s);
            for n in s.nodes() {
                for id in &n.placed_jobs {
                    let job = s.find_job(id).unwrap();
                    for dep in job.spec.depends_on.iter().filter_map(|d| d.job.as_ref()) {
                        prop_assert_eq!(s.find_job(dep).unwrap().status, JobStatus::Succeeded, "{} placed before {}", id, dep);
                    }
                }
            }
        }
    }
}
