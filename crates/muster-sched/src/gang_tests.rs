//! Multi-node jobs in the planner: whole gangs on distinct nodes, reservations that keep a
//! gang from starving, and (property-tested) no partial hold whatever the interleaving.

use super::*;
use crate::test_support::{
    JobSpec, compute_environment, definition, must, node_registration, queue, submission,
};
use muster_core::{
    AttemptEvent, Command, ContainerSpec, JobDefinitionSpec, JobStatus, JobSubmission,
    MultiNodeRole, NodeOverrides, NodeProperties, NodeRange, Outcome, RetryStrategy, Timestamp,
};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp(1_000_000);

/// One compute environment of `nodes` 2-vCPU nodes `n0`…, queue `q`, the single-node
/// definition `def` (1 vCPU) and the multi-node definition `mnp` (1 vCPU a node, one range,
/// retried once).
fn cluster(nodes: usize) -> State {
    let mut s = State::default();
    must(&mut s, compute_environment(Default::default()));
    must(&mut s, queue("q", 1, None));
    must(&mut s, definition());
    let container = ContainerSpec {
        image: "mpi".into(),
        vcpus: Some(1),
        memory: Some(64),
        ..Default::default()
    };
    must(
        &mut s,
        Command::RegisterJobDefinition(JobDefinitionSpec {
            name: "mnp".into(),
            container: container.clone(),
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
                num_nodes: 2,
                main_node: 0,
                ranges: vec![NodeRange {
                    target_nodes: ":".into(),
                    container,
                    options: Default::default(),
                }],
            }),
        }),
    );
    for i in 0..nodes {
        let register = node_registration(
            &format!("n{i}"),
            Resources::new(2000, 1024, 0),
            Vec::new(),
            Default::default(),
            Timestamp(0),
        );
        must(&mut s, register);
    }
    s
}

/// Submits gang `id` of `nodes` nodes of 1 vCPU, with an attempt timeout when given.
fn submit_gang(s: &mut State, id: &str, nodes: u32, at: u64, timeout_secs: Option<u64>) {
    submit_sized_gang(s, id, nodes, 1, at, timeout_secs);
}

/// Submits gang `id` of `nodes` nodes of `vcpus` each.
fn submit_sized_gang(
    s: &mut State,
    id: &str,
    nodes: u32,
    vcpus: i64,
    at: u64,
    timeout_secs: Option<u64>,
) {
    must(s, gang_submission(id, nodes, vcpus, at, timeout_secs, &[]));
}

/// The submit of gang `id`: `nodes` nodes of `vcpus` each, with these tags.
fn gang_submission(
    id: &str,
    nodes: u32,
    vcpus: i64,
    at: u64,
    timeout_secs: Option<u64>,
    tags: &[(&str, &str)],
) -> Command {
    Command::SubmitJob(JobSubmission {
        id: JobId::from(id),
        at: Timestamp(at),
        name: id.into(),
        queue: "q".into(),
        definition: "mnp".into(),
        overrides: Default::default(),
        parameters: Default::default(),
        tags: tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        retry: None,
        timeout_secs,
        depends_on: Vec::new(),
        array_size: None,
        share_identifier: None,
        scheduling_priority_override: None,
        extra: Default::default(),
        node_overrides: Some(NodeOverrides {
            num_nodes: Some(nodes),
            ranges: vec![muster_core::NodeOverride {
                target_nodes: ":".into(),
                container_overrides: muster_core::ContainerOverrides {
                    vcpus: Some(vcpus),
                    ..Default::default()
                },
            }],
        }),
    })
}

fn submit_single(s: &mut State, id: &str, at: u64, vcpus: i64, timeout_secs: Option<u64>) {
    let spec = JobSpec {
        queue: "q".into(),
        at,
        vcpus,
        memory: 64,
        timeout_secs,
        ..Default::default()
    };
    must(s, submission(id, spec));
}

fn apply(s: &mut State, p: Plan, at: u64) -> Outcome {
    let checked = verify(s, p);
    s.apply(Command::Place {
        term: 1,
        at: Timestamp(at),
        placements: checked.placements,
    })
}

/// Ends every attempt placed on the state with exit code 0 (main nodes first, so that each
/// gang ends as its main node does).
fn finish_all(s: &mut State, at: u64) {
    for _ in 0..3 {
        let mut placed: Vec<(JobId, NodeId, u32, bool)> = s
            .nodes()
            .flat_map(|n| n.placed_jobs.iter().map(move |j| (j.clone(), n.id.clone())))
            .filter_map(|(j, n)| {
                let job = s.find_job(&j)?;
                let main = job.gang_node().is_none_or(|(_, _, main)| main);
                Some((j, n, job.active.as_ref()?.number, main))
            })
            .collect();
        placed.sort_by_key(|(_, _, _, main)| !main);
        for (job, node, attempt, _) in placed {
            for event in [
                AttemptEvent::Running,
                AttemptEvent::Exited {
                    exit_code: Some(0),
                    reason: None,
                },
            ] {
                s.apply(Command::ReportAttempt {
                    job: job.clone(),
                    attempt,
                    node: node.clone(),
                    event,
                    at: Timestamp(at),
                });
            }
        }
    }
}

#[test]
fn a_gang_goes_whole_to_distinct_nodes_in_one_plan() {
    let mut s = cluster(4);
    submit_gang(&mut s, "g", 4, 1, None);
    let p = plan(&s, &PlanConfig::default(), NOW);
    let workers: BTreeSet<&NodeId> = p.placements.iter().map(|p| &p.node).collect();
    assert_eq!(p.placements.len(), 4);
    assert_eq!(workers.len(), 4, "each node on a worker of its own");
    assert_eq!(
        apply(&mut s, p, 2),
        Outcome::Placed {
            placed: 4,
            refused: 0
        }
    );
    assert_eq!(
        s.find_job(&JobId::from("g")).unwrap().status,
        JobStatus::Starting
    );
}

#[test]
fn a_gang_no_set_of_nodes_could_hold_fails_fast() {
    let mut s = cluster(3);
    submit_gang(&mut s, "g", 4, 1, None);
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert!(p.placements.is_empty());
    let reason = p.unplaced[0].status_reason();
    assert!(
        reason.starts_with("MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"),
        "{reason}"
    );
    assert!(reason.contains("4 nodes"), "{reason}");
}

#[test]
fn two_gangs_that_each_need_most_of_the_cluster_run_one_after_the_other() {
    // Each gang needs three of the four 2-vCPU nodes whole.
    let mut s = cluster(4);
    submit_sized_gang(&mut s, "a", 3, 2, 1, None);
    submit_sized_gang(&mut s, "b", 3, 2, 2, None);
    let p = plan(&s, &PlanConfig::default(), NOW);
    let gangs: BTreeSet<String> = p
        .placements
        .iter()
        .map(|p| p.job.to_string().split('#').next().unwrap().to_owned())
        .collect();
    assert_eq!(gangs, BTreeSet::from(["a".to_owned()]), "b waits whole");
    assert_eq!(p.placements.len(), 3);
    apply(&mut s, p, 3);
    finish_all(&mut s, 4);
    assert_eq!(
        s.find_job(&JobId::from("a")).unwrap().status,
        JobStatus::Succeeded
    );
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert_eq!(p.placements.len(), 3);
    apply(&mut s, p, 5);
    finish_all(&mut s, 6);
    assert_eq!(
        s.find_job(&JobId::from("b")).unwrap().status,
        JobStatus::Succeeded
    );
    assert!(s.resource_violations().is_empty());
}

#[test]
fn a_gang_at_the_head_holds_its_nodes_against_a_stream_of_small_jobs() {
    let mut s = cluster(4);
    // Every node half busy with a job that ends within a minute; one node full.
    for i in 0..5 {
        submit_single(&mut s, &format!("busy{i}"), 0, 1, Some(60));
    }
    let busy = plan(&s, &PlanConfig::default(), NOW);
    apply(&mut s, busy, NOW.as_millis());
    // The gang needs two vCPUs on each of the four nodes; small jobs keep coming behind it.
    must(&mut s, gang_submission("g", 4, 2, 1, None, &[]));
    for i in 0..20 {
        // Without a timeout: they could run past the gang's start, so they must not take
        // the gang's nodes.
        submit_single(&mut s, &format!("small{i}"), 2 + i, 1, None);
    }
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert!(
        p.placements.is_empty(),
        "small jobs took the gang's room: {:?}",
        p.placements
    );
    let gang = p
        .unplaced
        .iter()
        .find(|u| u.job.to_string() == "g")
        .unwrap();
    let reason = gang.status_reason();
    assert!(reason.contains("room reserved on 4 nodes"), "{reason}");
    assert!(reason.contains("planned start by"), "{reason}");

    // Jobs short enough to end before the gang starts may still use the room.
    submit_single(&mut s, "short", 30, 1, Some(10));
    let p = plan(&s, &PlanConfig::default(), NOW);
    let placed: Vec<String> = p.placements.iter().map(|p| p.job.to_string()).collect();
    assert_eq!(placed, ["short"]);
}

/// One step of the interleaving property below.
#[derive(Debug, Clone)]
enum Step {
    Plan,
    ApplyOldest,
    LoseNode(usize),
    Rejoin(usize),
    /// Report on the n-th placed attempt: running, or ended with this exit code.
    Run(usize),
    Exit(usize, i32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Plan),
        3 => Just(Step::ApplyOldest),
        1 => (0usize..5).prop_map(Step::LoseNode),
        1 => (0usize..5).prop_map(Step::Rejoin),
        2 => (0usize..8).prop_map(Step::Run),
        2 => ((0usize..8), prop_oneof![Just(0), Just(1)]).prop_map(|(n, c)| Step::Exit(n, c)),
    ]
}

/// No partial hold: a gang waiting in line holds nothing; a gang just placed holds a node
/// job on each of as many distinct workers as it has nodes; no two nodes of a gang are on
/// one worker; and the nodes' books add up.
fn assert_gangs_whole(s: &State, just_placed: &BTreeSet<JobId>) {
    for parent in s.jobs().filter(|j| j.gang_size().is_some()) {
        let nodes: Vec<&muster_core::Job> = s.gang_nodes(&parent.id).collect();
        let active: Vec<&NodeId> = nodes
            .iter()
            .filter_map(|n| n.active.as_ref().map(|a| &a.node))
            .collect();
        let distinct: BTreeSet<&NodeId> = active.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            active.len(),
            "{}: two nodes on one worker",
            parent.id
        );
        if matches!(
            parent.status,
            JobStatus::Pending | JobStatus::Runnable | JobStatus::Submitted
        ) || parent.status.is_terminal()
        {
            assert!(
                active.is_empty(),
                "{} holds {active:?} while {:?}",
                parent.id,
                parent.status
            );
        }
        if just_placed.contains(&parent.id) {
            assert_eq!(active.len(), nodes.len(), "{} placed in part", parent.id);
        }
        let decided = matches!(
            parent.multinode.as_deref(),
            Some(MultiNodeRole::Parent {
                ending: Some(_),
                ..
            })
        );
        if parent.status.is_placed() && !decided {
            // Until the attempt's end is decided, every node runs or has finished its part.
            let attempt = parent.attempts.len() + 1;
            for n in &nodes {
                let done = n.attempts.len() == attempt
                    && n.attempts.last().is_some_and(|a| a.exit_code == Some(0));
                assert!(
                    n.active.is_some() || done,
                    "{} runs in part: {} is idle",
                    parent.id,
                    n.id
                );
            }
        }
    }
    assert_eq!(s.resource_violations(), Vec::<String>::new());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    /// Random gangs and single jobs, plans applied late, nodes lost and back, attempts that
    /// run and end in any order: no gang is ever held in part, and no node over-committed.
    #[test]
    fn gangs_are_never_held_in_part(
        nodes in 2usize..6,
        jobs in prop::collection::vec((prop::option::of(2u32..5), 1i64..3), 1..12),
        steps in prop::collection::vec(step(), 1..80),
    ) {
        let mut s = cluster(nodes);
        for (i, (gang, vcpus)) in jobs.iter().enumerate() {
            match gang {
                Some(size) => submit_gang(&mut s, &format!("g{i}"), *size, i as u64, None),
                None => submit_single(&mut s, &format!("j{i}"), i as u64, *vcpus, None),
            }
        }
        let mut kept: std::collections::VecDeque<Plan> = Default::default();
        let mut clock = 10_000u64;
        for step in steps {
            clock += 1;
            let now = Timestamp(clock);
            let mut just_placed = BTreeSet::new();
            match step {
                Step::Plan => {
                    let p = plan(&s, &PlanConfig::default(), now);
                    prop_assert_eq!(&p, &plan(&s.clone(), &PlanConfig::default(), now));
                    kept.push_back(p);
                }
                Step::ApplyOldest => {
                    if let Some(p) = kept.pop_front() {
                        let checked = verify(&s, p);
                        let n = checked.placements.len();
                        for p in &checked.placements {
                            if let Some((parent, _, _)) = s.find_job(&p.job).and_then(|j| j.gang_node()) {
                                just_placed.insert(parent);
                            }
                        }
                        let outcome = s.apply(Command::Place { term: 1, at: now, placements: checked.placements });
                        prop_assert_eq!(outcome, Outcome::Placed { placed: n, refused: 0 });
                    }
                }
                Step::LoseNode(i) => {
                    s.apply(Command::NodeLost { node: NodeId(format!("n{}", i % nodes)), at: now });
                }
                Step::Rejoin(i) => {
                    s.apply(node_registration(&format!("n{}", i % nodes), Resources::new(2000, 1024, 0), Vec::new(), Default::default(), now));
                }
                Step::Run(k) | Step::Exit(k, _) => {
                    let placed: Vec<(JobId, NodeId)> = s.nodes().flat_map(|n| n.placed_jobs.iter().cloned().map(|j| (j, n.id.clone()))).collect();
                    if !placed.is_empty() {
                        let (job, node) = placed[k % placed.len()].clone();
                        let attempt = s.find_job(&job).unwrap().active.as_ref().unwrap().number;
                        let event = match step {
                            Step::Exit(_, code) => AttemptEvent::Exited { exit_code: Some(code), reason: None },
                            _ => AttemptEvent::Running,
                        };
                        s.apply(Command::ReportAttempt { job, attempt, node, event, at: now });
                    }
                }
            }
            assert_gangs_whole(&s, &just_placed);
        }
    }
}

/// `cluster(0)` plus 2-vCPU nodes `n0`… in the given racks (`block=b1/rack=<rack>`), each with
/// the extra labels given.
fn racked(racks: &[(&str, &[(&str, &str)])]) -> State {
    let mut s = cluster(0);
    for (i, (rack, extra)) in racks.iter().enumerate() {
        let mut labels: std::collections::BTreeMap<String, String> = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.insert("topology".into(), format!("block=b1/rack={rack}"));
        let register = node_registration(
            &format!("n{i}"),
            Resources::new(2000, 1024, 0),
            Vec::new(),
            labels,
            Timestamp(0),
        );
        must(&mut s, register);
    }
    s
}

fn racks_of(s: &State, p: &Plan) -> BTreeSet<String> {
    p.placements
        .iter()
        .map(|p| {
            let node = s.node(&p.node).unwrap();
            node.topology()[1].1.to_owned()
        })
        .collect()
}

fn tag(s: &mut State, id: &str, nodes: u32, tags: &[(&str, &str)], at: u64) {
    must(s, gang_submission(id, nodes, 1, at, None, tags));
}

/// Each placement of a plan as (job, worker).
fn placed_on(p: &Plan) -> Vec<(String, String)> {
    p.placements
        .iter()
        .map(|p| (p.job.to_string(), p.node.0.clone()))
        .collect()
}

/// `cluster(0)` with these workers (name, millicpus, memory MiB).
fn workers<N: AsRef<str>>(workers: impl IntoIterator<Item = (N, u64, u64)>) -> State {
    let mut s = cluster(0);
    for (name, millicpus, memory) in workers {
        let register = node_registration(
            name.as_ref(),
            Resources::new(millicpus, memory, 0),
            Vec::new(),
            Default::default(),
            Timestamp(0),
        );
        must(&mut s, register);
    }
    s
}

/// Submits gang `g` of `nodes` nodes whose ranges (targetNodes, vCPUs, memory MiB) ask for
/// different workers.
fn submit_ranged_gang(s: &mut State, nodes: u32, ranges: &[(&str, i64, i64)]) {
    let Command::SubmitJob(mut sub) = gang_submission("g", nodes, 1, 1, None, &[]) else {
        unreachable!()
    };
    sub.node_overrides = Some(NodeOverrides {
        num_nodes: Some(nodes),
        ranges: ranges
            .iter()
            .map(|(target, vcpus, memory)| muster_core::NodeOverride {
                target_nodes: (*target).into(),
                container_overrides: muster_core::ContainerOverrides {
                    vcpus: Some(*vcpus),
                    memory: Some(*memory),
                    ..Default::default()
                },
            })
            .collect(),
    });
    must(s, Command::SubmitJob(sub));
}

#[test]
fn a_gang_takes_the_tightest_rack_that_holds_it_and_says_where() {
    let mut s = racked(&[
        ("r1", &[]),
        ("r1", &[]),
        ("r2", &[]),
        ("r2", &[]),
        ("r2", &[]),
        ("r3", &[]),
        ("r3", &[]),
        ("r3", &[]),
        ("r3", &[]),
    ]);
    submit_gang(&mut s, "g", 3, 1, None);
    let p = plan(&s, &PlanConfig::default(), NOW);
    // r2 (three nodes) holds it exactly; r3 could too but is larger.
    assert_eq!(racks_of(&s, &p), BTreeSet::from(["r2".to_owned()]));
    apply(&mut s, p, 2);
    assert_eq!(
        s.find_job(&JobId::from("g"))
            .unwrap()
            .status_reason
            .as_deref(),
        Some("Nodes placed: 3 workers within block=b1/rack=r2")
    );
    // Five nodes fit in no rack: spread, within the block.
    submit_gang(&mut s, "wide", 5, 3, None);
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert_eq!(p.placements.len(), 5);
    apply(&mut s, p, 4);
    assert_eq!(
        s.find_job(&JobId::from("wide"))
            .unwrap()
            .status_reason
            .as_deref(),
        Some("Nodes placed: 5 workers within block=b1")
    );
}

#[test]
fn a_required_rack_waits_for_one_and_a_preferred_one_spreads_after_its_wait() {
    let racks: &[(&str, &[(&str, &str)])] = &[("r1", &[]), ("r1", &[]), ("r2", &[]), ("r2", &[])];
    let mut s = racked(racks);
    tag(
        &mut s,
        "strict",
        3,
        &[("muster:topology", "required:rack")],
        1,
    );
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert!(p.placements.is_empty());
    let reason = p.unplaced[0].status_reason();
    // No rack could ever hold three nodes: it fails fast rather than wait forever.
    assert!(reason.starts_with("MISCONFIGURATION"), "{reason}");

    let mut s = racked(&[
        ("r1", &[]),
        ("r1", &[]),
        ("r1", &[]),
        ("r2", &[]),
        ("r2", &[]),
    ]);
    submit_single(&mut s, "busy", 0, 2, None);
    let busy = plan(&s, &PlanConfig::default(), NOW);
    apply(&mut s, busy, 1);
    // Now r1 has two free nodes and r2 two: three in one rack must wait.
    tag(
        &mut s,
        "strict",
        3,
        &[("muster:topology", "required:rack")],
        2,
    );
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert!(p.placements.is_empty(), "{:?}", p.placements);
    let reason = p.unplaced[0].status_reason();
    assert!(reason.contains("in one rack"), "{reason}");

    let mut s = racked(&[
        ("r1", &[]),
        ("r1", &[]),
        ("r1", &[]),
        ("r2", &[]),
        ("r2", &[]),
    ]);
    submit_single(&mut s, "busy", 0, 2, None);
    let busy = plan(&s, &PlanConfig::default(), NOW);
    apply(&mut s, busy, 1);
    tag(
        &mut s,
        "patient",
        3,
        &[("muster:topology", "preferred:rack:60")],
        2,
    );
    let since = s
        .job(&JobId::from("patient"))
        .unwrap()
        .runnable_since
        .unwrap();
    let early = plan(
        &s,
        &PlanConfig::default(),
        Timestamp(since.as_millis() + 59_000),
    );
    assert!(early.placements.is_empty());
    let late = plan(
        &s,
        &PlanConfig::default(),
        Timestamp(since.as_millis() + 60_000),
    );
    assert_eq!(late.placements.len(), 3);
    assert_eq!(racks_of(&s, &late).len(), 2);
}

#[test]
fn a_gang_that_needs_a_fabric_gets_only_nodes_that_have_it() {
    let efa: &[(&str, &str)] = &[("rdma-devices", "rdmap0s6"), ("efa", "true")];
    let mut s = racked(&[
        ("r1", &[]),
        ("r1", efa),
        ("r2", efa),
        ("r2", &[]),
        ("r2", efa),
    ]);
    tag(&mut s, "mpi", 3, &[("muster:fabric", "efa")], 1);
    let p = plan(&s, &PlanConfig::default(), NOW);
    let nodes: BTreeSet<String> = p.placements.iter().map(|p| p.node.0.clone()).collect();
    assert_eq!(
        nodes,
        BTreeSet::from(["n1".to_owned(), "n2".to_owned(), "n4".to_owned()])
    );
    tag(&mut s, "too-big", 4, &[("muster:fabric", "efa")], 2);
    let p = plan(&s, &PlanConfig::default(), NOW);
    let big = p
        .unplaced
        .iter()
        .find(|u| u.job.to_string() == "too-big")
        .unwrap();
    assert!(
        big.status_reason().starts_with("MISCONFIGURATION"),
        "{}",
        big.status_reason()
    );
}

#[test]
fn ranges_that_compete_for_workers_are_matched_scarcest_first() {
    // Node 0 needs 4 vCPU and little memory, node 1 2 vCPU and much memory. w0 (4 vCPU,
    // 128 GiB) is the only worker that holds node 1; w1 (8 vCPU, 8 GiB) holds node 0 only.
    // Most demanding first would give w0 to node 0 and leave node 1 nowhere.
    let mut s = workers([("w0", 4000, 131_072), ("w1", 8000, 8192)]);
    submit_ranged_gang(&mut s, 2, &[("0", 4, 1024), ("1", 2, 65_536)]);
    let p = plan(&s, &PlanConfig::default(), NOW);
    let placed = placed_on(&p);
    assert_eq!(
        placed,
        [
            ("g#0".to_owned(), "w1".to_owned()),
            ("g#1".to_owned(), "w0".to_owned())
        ]
    );
    assert_eq!(
        apply(&mut s, p, 2),
        Outcome::Placed {
            placed: 2,
            refused: 0
        }
    );
}

#[test]
fn a_gang_kept_to_one_rack_reserves_the_rack_where_it_can_start_soonest() {
    // Four full workers, two racks; each frees when its job's timeout ends. The two that free
    // first are in different racks: a reservation on them could never start a gang that must
    // keep to one rack.
    let mut s = racked(&[("r1", &[]), ("r1", &[]), ("r2", &[]), ("r2", &[])]);
    let mut ends = std::collections::BTreeMap::new();
    for (i, timeout) in [10, 100, 20, 30].into_iter().enumerate() {
        submit_single(&mut s, &format!("busy{i}"), i as u64, 2, Some(timeout));
        let p = plan(&s, &PlanConfig::default(), NOW);
        let node = p.placements[0].node.clone();
        ends.insert(node, NOW.as_millis() + timeout * 1000);
        apply(&mut s, p, NOW.as_millis());
    }
    let rack = |s: &State, node: &NodeId| s.node(node).unwrap().topology()[1].1.to_owned();
    // The rack whose later worker frees first, and when.
    let mut last_free: std::collections::BTreeMap<String, u64> = Default::default();
    for (node, end) in &ends {
        let latest = last_free.entry(rack(&s, node)).or_default();
        *latest = (*latest).max(*end);
    }
    let (best_rack, planned) = last_free.iter().min_by_key(|(_, end)| **end).unwrap();
    assert_eq!(*planned, NOW.as_millis() + 30_000);
    let mut s2 = s.clone();

    must(
        &mut s,
        gang_submission(
            "strict",
            2,
            2,
            10,
            None,
            &[("muster:topology", "required:rack")],
        ),
    );
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert!(p.placements.is_empty());
    let held = p
        .unplaced
        .iter()
        .find(|u| u.job.to_string() == "strict")
        .and_then(|u| u.reservation.clone())
        .expect("the gang holds a reservation");
    assert_eq!(rack(&s, &held.node), *best_rack);
    assert_eq!(held.starts_at, Some(*planned));

    // Without a bound the gang takes the two that free first, wherever they are.
    must(&mut s2, gang_submission("loose", 2, 2, 11, None, &[]));
    let p = plan(&s2, &PlanConfig::default(), NOW);
    let held = p
        .unplaced
        .iter()
        .find(|u| u.job.to_string() == "loose")
        .and_then(|u| u.reservation.clone())
        .expect("the gang holds a reservation");
    assert_eq!(held.starts_at, Some(NOW.as_millis() + 20_000));
}

#[test]
fn ranges_whose_scarcest_first_order_leaves_one_without_a_worker_are_matched_in_full() {
    // Range 1 fits only w2, ranges 0 and 2 two workers each. Scarcest first gives w2 to
    // range 1, then range 0 the tighter of its two, w0, which is the only one left for range 2.
    // Range 0 on w1 gives every node a worker.
    let mut s = workers([("w0", 4000, 4096), ("w1", 8000, 1024), ("w2", 2000, 8192)]);
    submit_ranged_gang(&mut s, 3, &[("0", 4, 1024), ("1", 1, 8192), ("2", 2, 4096)]);
    let p = plan(&s, &PlanConfig::default(), NOW);
    let placed = placed_on(&p);
    assert_eq!(
        placed,
        [
            ("g#0".to_owned(), "w1".to_owned()),
            ("g#1".to_owned(), "w2".to_owned()),
            ("g#2".to_owned(), "w0".to_owned())
        ]
    );
}

#[test]
fn a_fair_share_queues_compute_reservation_counts_every_node_of_a_gang() {
    // Four 2-vCPU workers; the fair-share queue keeps 50 % for share identifiers not yet
    // running while one is: share `a`, running 1 vCPU, may hold 4 vCPUs in all.
    let mut s = cluster(4);
    must(
        &mut s,
        Command::Admin(muster_core::AdminCommand::CreateSchedulingPolicy(
            muster_core::SchedulingPolicy {
                name: "fair".into(),
                arn: muster_core::Arn(String::new()),
                fairshare: Some(muster_core::FairsharePolicy {
                    share_decay_seconds: 3600,
                    compute_reservation: 50,
                    share_distribution: Vec::new(),
                }),
                tags: Default::default(),
            },
        )),
    );
    let policy = s.scheduling_policies().next().unwrap().arn.0.clone();
    must(&mut s, crate::test_support::queue("fq", 1, Some(policy)));
    let in_share = |id: &str, at: u64| {
        submission(
            id,
            JobSpec {
                queue: "fq".into(),
                at,
                vcpus: 1,
                memory: 64,
                share_identifier: Some("a".into()),
                ..Default::default()
            },
        )
    };
    must(&mut s, in_share("a-running", 1));
    let p = plan(&s, &PlanConfig::default(), NOW);
    apply(&mut s, p, NOW.as_millis());
    // Two nodes of 2 vCPUs: 1 + 4 > 4.
    let Command::SubmitJob(mut sub) = gang_submission("a-gang", 2, 2, 2, None, &[]) else {
        unreachable!()
    };
    sub.queue = "fq".into();
    sub.share_identifier = Some("a".into());
    must(&mut s, Command::SubmitJob(sub));
    let p = plan(&s, &PlanConfig::default(), NOW);
    assert!(p.placements.is_empty(), "{:?}", p.placements);
    let reason = p.unplaced[0].status_reason();
    assert!(reason.contains("keeps 50% of capacity"), "{reason}");
    // Two nodes of 1 vCPU fit within the share's half: 1 + 2 <= 4.
    let Command::SubmitJob(mut small) = gang_submission("a-small", 2, 1, 3, None, &[]) else {
        unreachable!()
    };
    small.queue = "fq".into();
    small.share_identifier = Some("a".into());
    must(&mut s, Command::SubmitJob(small));
    let p = plan(&s, &PlanConfig::default(), NOW);
    let placed: BTreeSet<String> = p.placements.iter().map(|p| p.job.to_string()).collect();
    assert_eq!(
        placed,
        BTreeSet::from(["a-small#0".to_owned(), "a-small#1".to_owned()])
    );
}

#[test]
fn a_large_gang_whose_main_node_takes_the_others_worker_is_still_placed() {
    // The main node fits X and Y, and Y is the tighter; the 300 other nodes fit Y and 299
    // workers of their own. Scarcest first puts the main node on Y and leaves one node
    // without a worker; one augmenting path moves the main node to X.
    let mut all = vec![("x".to_owned(), 8000, 1024), ("y".to_owned(), 4000, 8192)];
    all.extend((0..299).map(|i| (format!("w{i:03}"), 2000, 8192)));
    let mut s = workers(all);
    submit_ranged_gang(&mut s, 301, &[("0", 4, 1024), ("1:", 1, 8192)]);
    let config = PlanConfig {
        max_placements: 1000,
        ..PlanConfig::default()
    };
    let p = plan(&s, &config, NOW);
    assert_eq!(p.placements.len(), 301, "{:?}", p.unplaced);
    let main = p
        .placements
        .iter()
        .find(|p| p.job.to_string() == "g#0")
        .unwrap();
    assert_eq!(main.node.0, "x");
}

#[test]
fn a_queue_that_names_its_compute_environment_twice_still_gives_each_node_its_own_worker() {
    let mut s = cluster(2);
    let Command::CreateJobQueue(mut twice) = crate::test_support::queue("twice", 1, None) else {
        unreachable!()
    };
    twice.compute_environment_order = vec![
        muster_core::CeOrder {
            order: 1,
            compute_environment: "ce".into(),
        },
        muster_core::CeOrder {
            order: 2,
            compute_environment: "ce".into(),
        },
    ];
    must(&mut s, Command::CreateJobQueue(twice));
    let Command::SubmitJob(mut sub) = gang_submission("g", 2, 2, 1, None, &[]) else {
        unreachable!()
    };
    sub.queue = "twice".into();
    must(&mut s, Command::SubmitJob(sub));
    let p = plan(&s, &PlanConfig::default(), NOW);
    let workers: BTreeSet<String> = p.placements.iter().map(|p| p.node.0.clone()).collect();
    assert_eq!(workers.len(), 2, "{:?}", p.placements);
    assert_eq!(
        apply(&mut s, p, 2),
        Outcome::Placed {
            placed: 2,
            refused: 0
        }
    );
}
