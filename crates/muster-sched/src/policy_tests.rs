//! Backfill, spread, labels and GPU models, and fair share.

use super::*;
use crate::test_support::{
    JobSpec, compute_environment, definition, must, node_registration, queue, submission,
};
use muster_core::{Arn, AttemptEvent, Command, GpuDevice, Job, SchedulingPolicy, Tags};

const NOW: Timestamp = Timestamp(1_000_000);

/// One UNMANAGED environment `ce` (with `ce_tags`), queue `q` on it (fair share when
/// `fairshare` is given), definition `def`.
fn cluster(ce_tags: &[(&str, &str)], fairshare: Option<muster_core::FairsharePolicy>) -> State {
    let mut s = State::default();
    let tags: Tags = ce_tags
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    must(&mut s, compute_environment(tags));
    let policy_arn = fairshare.map(|f| {
        must(
            &mut s,
            Command::Admin(muster_core::AdminCommand::CreateSchedulingPolicy(
                SchedulingPolicy {
                    name: "fair".into(),
                    arn: Arn(String::new()),
                    fairshare: Some(f),
                    tags: Default::default(),
                },
            )),
        );
        // The state names the policy in its own ARN scope.
        s.scheduling_policies().next().unwrap().arn.0.clone()
    });
    must(&mut s, queue("q", 1, policy_arn));
    must(&mut s, definition());
    s
}

fn node(s: &mut State, id: &str, vcpus: u64, gpus: &[&str], labels: &[(&str, &str)]) {
    let devices = gpus
        .iter()
        .enumerate()
        .map(|(i, model)| GpuDevice {
            index: i as u32,
            uuid: format!("GPU-{id}-{i}"),
            model: (*model).into(),
            memory_mib: 81920,
            nvlink_peers: Vec::new(),
        })
        .collect();
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let capacity = Resources::new(vcpus * 1000, 65536, gpus.len() as u32);
    must(
        s,
        node_registration(id, capacity, devices, labels, Timestamp(0)),
    );
}

#[derive(Default, Clone)]
struct Spec {
    vcpus: i64,
    gpus: u32,
    timeout_secs: Option<u64>,
    tags: Vec<(&'static str, &'static str)>,
    share: Option<&'static str>,
    priority: Option<i64>,
}

fn submit(s: &mut State, id: &str, spec: Spec) {
    let job = JobSpec {
        queue: "q".into(),
        at: NOW.0,
        vcpus: spec.vcpus,
        memory: 64,
        gpus: spec.gpus,
        timeout_secs: spec.timeout_secs,
        tags: spec
            .tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        share_identifier: spec.share.map(str::to_owned),
        scheduling_priority_override: spec.priority,
        ..Default::default()
    };
    must(s, submission(id, job));
}

fn vcpus(n: i64) -> Spec {
    Spec {
        vcpus: n,
        ..Default::default()
    }
}

/// Plans, applies, and marks what was placed RUNNING at `NOW`.
fn round(s: &mut State) -> Vec<(String, String)> {
    let p = verify(s, plan(s, &PlanConfig::default(), NOW));
    let placed: Vec<(String, String)> = p
        .placements
        .iter()
        .map(|p| (p.job.to_string(), p.node.0.clone()))
        .collect();
    must(
        s,
        Command::Place {
            term: 1,
            at: NOW,
            placements: p.placements.clone(),
        },
    );
    for p in p.placements {
        must(
            s,
            Command::ReportAttempt {
                job: p.job,
                attempt: 1,
                node: p.node,
                event: AttemptEvent::Running,
                at: NOW,
            },
        );
    }
    placed
}

fn names(placed: &[(String, String)]) -> Vec<&str> {
    placed.iter().map(|(j, _)| j.as_str()).collect()
}

fn finish(s: &mut State, job: &str) {
    let j: &Job = s.job(&JobId::from(job)).unwrap();
    let a = j.active.clone().unwrap();
    must(
        s,
        Command::ReportAttempt {
            job: JobId::from(job),
            attempt: a.number,
            node: a.node,
            event: AttemptEvent::Exited {
                exit_code: Some(0),
                reason: None,
            },
            at: NOW,
        },
    );
}

#[test]
fn small_jobs_backfill_only_where_their_timeout_proves_they_cannot_delay_the_head() {
    let mut s = cluster(&[], None);
    node(&mut s, "n0", 4, &[], &[]);
    submit(
        &mut s,
        "running",
        Spec {
            vcpus: 2,
            timeout_secs: Some(100),
            ..Default::default()
        },
    );
    assert_eq!(names(&round(&mut s)), vec!["running"]);
    // The head needs the whole node: it can start when `running` times out, at NOW + 100 s.
    submit(&mut s, "head", vcpus(4));
    let bounded = |t| Spec {
        vcpus: 2,
        timeout_secs: Some(t),
        ..Default::default()
    };
    submit(&mut s, "ends-in-time", bounded(60));
    submit(&mut s, "no-timeout", vcpus(2));
    submit(&mut s, "ends-too-late", bounded(200));
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert_eq!(
        p.placements
            .iter()
            .map(|p| p.job.as_str())
            .collect::<Vec<_>>(),
        vec!["ends-in-time"]
    );
    let head = &p.unplaced[0];
    assert_eq!(head.job.as_str(), "head");
    let r = head
        .reservation
        .as_ref()
        .expect("the head holds a reservation");
    assert_eq!(
        (r.node.0.as_str(), r.starts_at),
        ("n0", Some(NOW.0 + 100_000))
    );
    assert!(head.status_reason().ends_with("room reserved on n0"));
}

#[test]
fn a_big_job_is_not_starved_by_a_stream_of_small_ones() {
    let mut s = cluster(&[], None);
    node(&mut s, "n0", 4, &[], &[]);
    for i in 0..4 {
        submit(&mut s, &format!("early{i}"), vcpus(1));
    }
    assert_eq!(round(&mut s).len(), 4);
    submit(&mut s, "big", vcpus(4));
    for i in 0..20 {
        submit(&mut s, &format!("late{i}"), vcpus(1));
    }
    // As the early jobs end one by one, their room is held for `big`, not handed to the
    // later small jobs (which have no timeout and so cannot prove they would end in time).
    for i in 0..4 {
        finish(&mut s, &format!("early{i}"));
        let placed = round(&mut s);
        if i < 3 {
            assert!(placed.is_empty(), "{placed:?}");
        } else {
            assert_eq!(names(&placed), vec!["big"]);
        }
    }
}

#[test]
fn best_fit_packs_and_spread_spreads() {
    for (tags, expected_nodes) in [
        (vec![], vec!["n0", "n0"]),
        (vec![(ALLOCATION_STRATEGY_TAG, "SPREAD")], vec!["n0", "n1"]),
    ] {
        let mut s = cluster(&tags, None);
        node(&mut s, "n0", 4, &[], &[]);
        node(&mut s, "n1", 4, &[], &[]);
        submit(&mut s, "a", vcpus(1));
        submit(&mut s, "b", vcpus(1));
        let placed = round(&mut s);
        let mut nodes: Vec<&str> = placed.iter().map(|(_, n)| n.as_str()).collect();
        nodes.sort();
        assert_eq!(nodes, expected_nodes, "{tags:?}");
    }
}

#[test]
fn labels_and_gpu_models_decide_where_a_job_may_run() {
    let mut s = cluster(&[], None);
    node(&mut s, "plain", 8, &["NVIDIA A10G"], &[("rack", "r1")]);
    node(
        &mut s,
        "fast",
        8,
        &["NVIDIA A10G", "NVIDIA H100"],
        &[("rack", "r2")],
    );
    let spec = |tags| Spec {
        vcpus: 1,
        gpus: 1,
        tags,
        ..Default::default()
    };
    submit(&mut s, "h100", spec(vec![(GPU_MODEL, "NVIDIA H100")]));
    submit(&mut s, "r1", spec(vec![("muster:node.rack", "r1")]));
    submit(&mut s, "r9", spec(vec![("muster:node.rack", "r9")]));
    submit(&mut s, "b200", spec(vec![(GPU_MODEL, "NVIDIA B200")]));
    let p = plan(&s, &PlanConfig::default(), NOW);
    let placed = placed_with_gpus(&p);
    // The H100 is index 1 on `fast`; the A10G at index 0 is not handed to that job.
    assert_eq!(
        placed,
        vec![("h100", "fast", vec![1]), ("r1", "plain", vec![0])]
    );
    let reasons: Vec<String> = p.unplaced.iter().map(|u| u.status_reason()).collect();
    assert_eq!(
        reasons,
        vec![
            "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - the job needs 1 vCPU, 64 MiB, 1 GPU with rack=r9; no node in ce can hold it",
            "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - the job needs 1 vCPU, 64 MiB, 1 GPU with GPU model NVIDIA B200; no node in ce can hold it",
        ]
    );
    // The plan applier refuses a placement that ignores the requirement.
    let forged = Plan {
        placements: vec![Placement {
            job: JobId::from("h100"),
            node: NodeId("fast".into()),
            gpus: vec![0],
        }],
        unplaced: vec![],
    };
    assert!(verify(&s, forged).placements.is_empty());
}

/// A job asking for several GPUs gets ones joined by NVLink when the node has such a set, and
/// the lowest free indices when it has none.
#[test]
fn multi_gpu_jobs_get_gpus_joined_by_nvlink() {
    let mut s = cluster(&[], None);
    // On `pairs`, NVLink joins 0 with 2 and 1 with 3 (not neighbours by index); `plain` has
    // no NVLink.
    let peers = [vec![2], vec![3], vec![0], vec![1]];
    let devices = peers
        .into_iter()
        .enumerate()
        .map(|(i, nvlink_peers)| GpuDevice {
            index: i as u32,
            uuid: format!("GPU-pairs-{i}"),
            model: "NVIDIA H100".into(),
            memory_mib: 81920,
            nvlink_peers,
        })
        .collect();
    let capacity = Resources::new(8000, 65536, 4);
    must(
        &mut s,
        node_registration("pairs", capacity, devices, Default::default(), Timestamp(0)),
    );
    node(&mut s, "plain", 8, &["NVIDIA H100"; 4], &[]);
    let two = Spec {
        vcpus: 1,
        gpus: 2,
        ..Default::default()
    };
    for id in ["a", "b", "c"] {
        submit(&mut s, id, two.clone());
    }
    let p = plan(&s, &PlanConfig::default(), NOW);
    let placed = placed_with_gpus(&p);
    assert_eq!(
        placed,
        vec![
            ("a", "pairs", vec![0, 2]),
            ("b", "pairs", vec![1, 3]),
            ("c", "plain", vec![0, 1]),
        ]
    );
    assert_eq!(
        verify(&s, p.clone()),
        p,
        "the plan applier keeps what NVLink chose"
    );
}

const GPU_MODEL: &str = muster_core::GPU_MODEL_TAG;

/// A plan's placements as (job, node, GPU indices).
fn placed_with_gpus(p: &Plan) -> Vec<(&str, &str, Vec<u32>)> {
    p.placements
        .iter()
        .map(|p| (p.job.as_str(), p.node.0.as_str(), p.gpus.clone()))
        .collect()
}

fn fair(weights: &[(&str, f64)], reservation: u64) -> muster_core::FairsharePolicy {
    muster_core::FairsharePolicy {
        share_decay_seconds: 3600,
        compute_reservation: reservation,
        share_distribution: weights
            .iter()
            .map(|(id, w)| muster_core::ShareWeight {
                share_identifier: (*id).to_owned(),
                weight_factor: *w,
            })
            .collect(),
    }
}

fn shared(share: &'static str, priority: Option<i64>) -> Spec {
    Spec {
        vcpus: 1,
        share: Some(share),
        priority,
        ..Default::default()
    }
}

#[test]
fn fair_share_divides_capacity_by_weight_not_by_arrival() {
    // A lower weight factor buys a larger share: `gold` (0.5) gets twice what `lead` (1) gets.
    let mut s = cluster(&[], Some(fair(&[("gold", 0.5), ("lead", 1.0)], 0)));
    node(&mut s, "n0", 6, &[], &[]);
    for i in 0..10 {
        submit(&mut s, &format!("lead{i}"), shared("lead", None));
    }
    for i in 0..10 {
        submit(&mut s, &format!("gold{i}"), shared("gold", None));
    }
    let placed = round(&mut s);
    let gold = placed.iter().filter(|(j, _)| j.starts_with("gold")).count();
    assert_eq!((gold, placed.len() - gold), (4, 2), "{placed:?}");
}

#[test]
fn within_a_share_higher_scheduling_priority_runs_first() {
    let mut s = cluster(&[], Some(fair(&[], 0)));
    node(&mut s, "n0", 2, &[], &[]);
    submit(&mut s, "low", shared("a", Some(1)));
    submit(&mut s, "high", shared("a", Some(50)));
    submit(&mut s, "mid", shared("a", Some(10)));
    assert_eq!(names(&round(&mut s)), vec!["high", "mid"]);
}

#[test]
fn past_usage_counts_until_it_decays() {
    let mut s = cluster(&[], Some(fair(&[], 0)));
    node(&mut s, "n0", 1, &[], &[]);
    submit(&mut s, "a-first", shared("a", None));
    assert_eq!(names(&round(&mut s)), vec!["a-first"]);
    // `a-first` ran for an hour; `a` has used more than `b` since, so `b` goes first.
    let j = s.job(&JobId::from("a-first")).unwrap();
    let node = j.active.as_ref().unwrap().node.clone();
    must(
        &mut s,
        Command::ReportAttempt {
            job: JobId::from("a-first"),
            attempt: 1,
            node,
            event: AttemptEvent::Exited {
                exit_code: Some(0),
                reason: None,
            },
            at: Timestamp(NOW.0 + 3_600_000),
        },
    );
    submit(&mut s, "a-second", shared("a", None));
    submit(&mut s, "b-first", shared("b", None));
    let later = Timestamp(NOW.0 + 3_600_000);
    let p = plan(&s, &PlanConfig::default(), later);
    assert_eq!(p.placements[0].job.as_str(), "b-first");
    // Forty half-lives later that hour counts for nothing, and submit order decides again.
    let much_later = Timestamp(later.0 + 40 * 3_600_000);
    let p = plan(&s, &PlanConfig::default(), much_later);
    assert_eq!(p.placements[0].job.as_str(), "a-second");
}

#[test]
fn compute_reservation_keeps_room_for_share_identifiers_not_yet_running() {
    // 50 % reserved with one active share: `a` may fill half of the 4 vCPUs, not more.
    let mut s = cluster(&[], Some(fair(&[], 50)));
    node(&mut s, "n0", 4, &[], &[]);
    for i in 0..4 {
        submit(&mut s, &format!("a{i}"), shared("a", None));
    }
    let placed = round(&mut s);
    assert_eq!(placed.len(), 2, "{placed:?}");
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert!(
        p.unplaced[0]
            .status_reason()
            .contains("keeps 50% of capacity")
    );
    // A newcomer share still gets in.
    submit(&mut s, "b0", shared("b", None));
    assert_eq!(names(&round(&mut s)), vec!["b0"]);
}
