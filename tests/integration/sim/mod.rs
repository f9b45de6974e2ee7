//! A deterministic simulation of the control plane, on turmoil: three control nodes running
//! Muster's own Raft node, services and loops ([`control`]) over simulated TCP and a
//! simulated clock, with in-memory log stores that survive their crashes; three simulated
//! agents ([`agent`]); a client beside each control node ([`workload`]). Faults drawn from
//! the seed ([`faults`]): crashes and restarts, partitions one- and two-way, held and slow
//! links, agents crashed, cut off, or reaching only one control node. After the faults heal
//! and the cluster quiesces, [`check`] proves what the process-level chaos checker proves.
//!
//! Everything that varies comes from the seed: turmoil's network and host order, each
//! runtime's RNG (tokio's `select!` order, with `--cfg tokio_unstable`), the election jitter,
//! the workload, the faults, and the wall clock the control plane stamps on commands. A run is
//! summarised by a digest of everything it recorded; the same seed gives the same digest.
//!
//! `MUSTER_SIM_SEED=N` replays one seed; `MUSTER_SIM_SEEDS=N` (and `MUSTER_SIM_FIRST_SEED`)
//! sets how many the seed sweep runs (the long form: see chaos/README.md).

mod agent;
mod check;
mod control;
mod faults;
mod net;
mod records;
mod workload;

use faults::Fault;
use records::{CallResult, ControlDisk, Records, Rng};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How far simulated time moves per step.
const TICK: Duration = Duration::from_millis(5);
/// Most links' latency: 1 ms to this.
pub const LINK_LATENCY: Duration = Duration::from_millis(5);
const CONTROLS: [u64; 3] = [1, 2, 3];
const AGENTS: usize = 3;
/// How long faults are injected (and clients call).
const FAULT_PHASE: Duration = Duration::from_secs(60);
/// After the last fault heals, every job must have ended within this.
const QUIESCE_WITHIN: Duration = Duration::from_secs(150);

/// Seeds the sweep runs unless told otherwise (about 2.7 s each, spread over the cores).
const SEEDS_BY_DEFAULT: u64 = 200;

/// A bug planted on purpose, to show that the checker catches what it claims to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    None,
    /// Agents never stop their attempts when cut off from the leader.
    AgentIgnoresCutOff,
    /// A restarted agent forgets the attempts it started, and runs again those still assigned.
    AgentForgetsItsAttempts,
    /// Clients take an answer that says "may or may not have been applied" as applied.
    IndeterminateCountsAsOk,
}

/// Which faults and jobs a seed draws. Every fifth seed runs [`Mix::LongCutOffs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Every kind of fault, mostly short jobs.
    Everything,
    /// Agents cut off past the node-lost TTL while long jobs run on them: the race between an
    /// agent stopping its attempts and the leader placing them elsewhere.
    LongCutOffs,
}

impl Mix {
    fn of(seed: u64) -> Self {
        if seed.is_multiple_of(5) {
            Mix::LongCutOffs
        } else {
            Mix::Everything
        }
    }
}

/// How one seed went.
#[derive(Debug)]
pub struct Outcome {
    /// The faults and heals, in order.
    pub events: Vec<String>,
    pub digest: u64,
    pub violations: Vec<String>,
    pub summary: String,
}

/// Counts the messages turmoil drops on cut links and holds on stalled ones: proof that the
/// faults drawn really cut something.
#[derive(Clone, Default)]
struct MessageFaults {
    dropped: Arc<AtomicU64>,
    held: Arc<AtomicU64>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for MessageFaults {
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        metadata.target() == "turmoil" && metadata.is_event()
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(Option<String>);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut message = Message(None);
        event.record(&mut message);
        match message.0.as_deref() {
            Some("Drop") => self.dropped.fetch_add(1, Ordering::Relaxed),
            Some("Hold") => self.held.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}

fn simulated_wall_clock() -> Duration {
    turmoil::since_epoch().unwrap_or_default()
}

/// Runs one seed to the end and checks it.
pub fn simulate(seed: u64, bug: Bug) -> Outcome {
    use tracing_subscriber::layer::SubscriberExt;
    muster_control::simulate_wall_clock(simulated_wall_clock);
    let messages = MessageFaults::default();
    let _tracing =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(messages.clone()));

    let mix = Mix::of(seed);
    let records = Records::new(seed, bug, mix);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(3600))
        .tick_duration(TICK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(LINK_LATENCY)
        .enable_random_order()
        .epoch(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .build();
    let voters = CONTROLS.to_vec();
    for id in CONTROLS {
        let disk = ControlDisk::default();
        let boots = Arc::new(AtomicU64::new(0));
        let (voters, records) = (voters.clone(), records.clone());
        sim.host(control::host(id), move || {
            let boot = boots.fetch_add(1, Ordering::Relaxed);
            let jitter = seed ^ (id << 32) ^ (boot << 48);
            control::run(id, voters.clone(), disk.clone(), jitter, records.clone())
        });
    }
    let agents: Vec<String> = (1..=AGENTS).map(|i| format!("agent{i}")).collect();
    for name in &agents {
        let (name, records) = (name.clone(), records.clone());
        let controls = voters.clone();
        let host = name.clone();
        sim.host(host.as_str(), move || {
            agent::run(name.clone(), controls.clone(), records.clone())
        });
    }

    let mut failures = Vec::new();
    let step = |sim: &mut turmoil::Sim<'_>, failures: &mut Vec<String>| -> bool {
        match sim.step() {
            Ok(_) => true,
            Err(e) => {
                failures.push(format!("the simulation failed at {:?}: {e}", sim.elapsed()));
                false
            }
        }
    };

    // Set up before the faults: the compute environment, queue and definition exist.
    while !records.lock().set_up && sim.elapsed() < Duration::from_secs(30) {
        if !step(&mut sim, &mut failures) {
            break;
        }
    }
    if !records.lock().set_up {
        failures.push("the cluster was not set up within 30 s without faults".into());
    }

    let mut rng = Rng::new(seed ^ 0xFA17);
    let mut active: Vec<(Fault, Duration)> = Vec::new();
    let mut injected = 0usize;
    let fault_end = sim.elapsed() + FAULT_PHASE;
    let mut next_fault = sim.elapsed() + Duration::from_millis(rng.between(500, 3000));
    while failures.is_empty() && sim.elapsed() < fault_end {
        if !step(&mut sim, &mut failures) {
            break;
        }
        let now = sim.elapsed();
        let (due, kept): (Vec<_>, Vec<_>) = active.drain(..).partition(|(_, at)| *at <= now);
        active = kept;
        for (fault, _) in due {
            fault.heal(&mut sim, &CONTROLS);
            records
                .lock()
                .events
                .push(format!("{now:?} healed {fault:?}"));
        }
        if now >= next_fault {
            next_fault = now + Duration::from_millis(rng.between(500, 4000));
            let (fault, lasts) = Fault::draw(&mut rng, mix, &CONTROLS, &agents);
            // One control node away at a time, and one fault per agent.
            let clashes = active.iter().any(|(f, _)| {
                (fault.control_node().is_some() && f.control_node().is_some())
                    || (fault.agent().is_some() && f.agent() == fault.agent())
            });
            if !clashes {
                fault.apply(&mut sim, &CONTROLS, &records);
                records
                    .lock()
                    .events
                    .push(format!("{now:?} {fault:?} for {lasts:?}"));
                injected += 1;
                active.push((fault, now + lasts));
            }
        }
    }
    for (fault, _) in active.drain(..) {
        fault.heal(&mut sim, &CONTROLS);
    }
    let healed_at = sim.elapsed();
    records.lock().workload_over = true;
    records
        .lock()
        .events
        .push(format!("{healed_at:?} every fault healed"));

    // Quiesce: a leader, every node caught up, every job ended, nothing running.
    let mut quiet_since = None;
    while failures.is_empty() && sim.elapsed() < healed_at + QUIESCE_WITHIN {
        for _ in 0..100 {
            if !step(&mut sim, &mut failures) {
                break;
            }
        }
        if quiescent(&records) {
            let since = *quiet_since.get_or_insert(sim.elapsed());
            // Quiet for 3 s: late reports and stale streams have had their say.
            if sim.elapsed() >= since + Duration::from_secs(3) {
                break;
            }
        } else {
            quiet_since = None;
        }
    }

    let mut violations = failures;
    let leader = current_leader(&records);
    let mut entries = 0;
    match leader {
        None => violations.push("no leader after the faults healed".into()),
        Some(leader) => {
            // Replayed from the leader's log store (the disk the simulation kept for it).
            let mut log = records.lock().nodes[&leader].raft_log.clone();
            let replayed = check::replay(&mut log);
            entries = replayed.entries;
            violations.extend(check::violations(&records, leader, &replayed));
        }
    }
    let shared = records.lock();
    let count = |r: CallResult| {
        shared
            .calls
            .iter()
            .filter(|c| c.ended.map(|(_, x)| x) == Some(r))
            .count()
    };
    let unanswered = shared.calls.iter().filter(|c| c.ended.is_none()).count();
    let term = leader.map_or(0, |l| {
        shared.nodes[&l].node.raft.metrics().borrow().current_term
    });
    let summary = format!(
        "seed {seed} ({mix:?}): {injected} faults, {} messages dropped and {} held; {} calls ({} ok, {} failed, {} indeterminate, {} unanswered); {} runs; {entries} entries replayed; final term {term}; {:.0} s simulated",
        messages.dropped.load(Ordering::Relaxed),
        messages.held.load(Ordering::Relaxed),
        shared.calls.len(),
        count(CallResult::Ok),
        count(CallResult::Failed),
        count(CallResult::Indeterminate),
        unanswered,
        shared.runs.len(),
        sim.elapsed().as_secs_f64(),
    );
    let mut hasher = std::hash::DefaultHasher::new();
    shared.calls.hash(&mut hasher);
    shared.runs.hash(&mut hasher);
    shared.events.hash(&mut hasher);
    if let Some(leader) = leader {
        let applied = shared.nodes[&leader].node.state.read();
        serde_json::to_string(&applied.state)
            .unwrap_or_default()
            .hash(&mut hasher);
    }
    violations.hash(&mut hasher);
    Outcome {
        events: shared.events.clone(),
        digest: hasher.finish(),
        violations,
        summary,
    }
}

/// The node that leads, by every running node's own metrics.
fn current_leader(records: &Records) -> Option<u64> {
    let shared = records.lock();
    shared.nodes.values().find_map(|n| {
        let m = n.node.raft.metrics().borrow().clone();
        (m.state == openraft::ServerState::Leader && m.current_leader == Some(n.node.id))
            .then_some(n.node.id)
    })
}

fn quiescent(records: &Records) -> bool {
    let Some(leader) = current_leader(records) else {
        return false;
    };
    let shared = records.lock();
    if shared.runs.iter().any(|r| r.stopped.is_none()) {
        return false;
    }
    let applied = shared.nodes[&leader].node.state.read();
    let all_ended = applied.state.jobs().all(|j| {
        matches!(
            j.status,
            muster_core::JobStatus::Succeeded | muster_core::JobStatus::Failed
        )
    });
    all_ended
        && shared
            .nodes
            .values()
            .all(|n| n.node.state.read().last_applied == applied.last_applied)
}

fn seeds_from_env() -> (u64, u64) {
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    match number("MUSTER_SIM_SEED") {
        Some(seed) => (seed, 1),
        None => (
            number("MUSTER_SIM_FIRST_SEED").unwrap_or(1),
            number("MUSTER_SIM_SEEDS").unwrap_or(SEEDS_BY_DEFAULT),
        ),
    }
}

/// Runs this shard's seeds one after another; fails listing every seed that broke something,
/// each replayable alone with `MUSTER_SIM_SEED`.
fn sweep(shard: u64) {
    let (first, count) = seeds_from_env();
    let mut broken = Vec::new();
    let regressions = REGRESSIONS.iter().copied().filter(|_| shard == 0);
    let seeds = (first..first + count).filter(|s| (s - first) % SHARDS == shard);
    for seed in regressions.chain(seeds) {
        let outcome = simulate(seed, Bug::None);
        println!("{} (digest {:016x})", outcome.summary, outcome.digest);
        if !outcome.violations.is_empty() {
            println!(
                "  seed {seed} broke {} invariants:",
                outcome.violations.len()
            );
            for v in outcome.violations.iter().take(20) {
                println!("    {v}");
            }
            if std::env::var_os("MUSTER_SIM_EVENTS").is_some() {
                for e in &outcome.events {
                    println!("    | {e}");
                }
            }
            broken.push(seed);
        }
    }
    assert!(
        broken.is_empty(),
        "seeds {broken:?} broke invariants; replay one with MUSTER_SIM_SEED=<seed> cargo nextest run -p muster-tests sim::"
    );
}

/// Seeds that once broke an invariant (chaos/RESULTS.md), run by every sweep.
const REGRESSIONS: [u64; 2] = [222, 1442];

/// The sweep runs as this many tests, so that nextest spreads it over the cores.
const SHARDS: u64 = 4;

#[test]
fn every_seed_keeps_every_invariant_shard_0() {
    sweep(0)
}

#[test]
fn every_seed_keeps_every_invariant_shard_1() {
    sweep(1)
}

#[test]
fn every_seed_keeps_every_invariant_shard_2() {
    sweep(2)
}

#[test]
fn every_seed_keeps_every_invariant_shard_3() {
    sweep(3)
}

/// The same seed runs the same: every call, run, fault and the final state.
#[test]
fn the_same_seed_runs_the_same() {
    let seed = seeds_from_env().0;
    let first = simulate(seed, Bug::None);
    let second = simulate(seed, Bug::None);
    assert_eq!(
        first.digest, second.digest,
        "seed {seed} ran two different ways:\n{}\n{}",
        first.summary, second.summary
    );
    let other = simulate(seed + 1, Bug::None);
    assert_ne!(
        first.digest,
        other.digest,
        "seeds {seed} and {} ran the same way: the seed decides nothing",
        seed + 1
    );
}

/// Each bug planted on purpose is caught within a few seeds, by the invariant it breaks:
/// the checker can fail.
#[test]
fn the_checker_catches_planted_bugs() {
    for (bug, expected) in [
        (Bug::AgentIgnoresCutOff, "ran twice at once"),
        (Bug::AgentForgetsItsAttempts, "times"),
        (Bug::IndeterminateCountsAsOk, "was lost"),
    ] {
        let seeds: Vec<u64> = match bug {
            // Only a long cut-off shows it.
            Bug::AgentIgnoresCutOff => (1..=15).map(|s| s * 5).collect(),
            _ => (1..=10).collect(),
        };
        let caught = seeds.into_iter().find_map(|seed| {
            let outcome = simulate(seed, bug);
            outcome
                .violations
                .iter()
                .find(|v| v.contains(expected))
                .map(|v| format!("seed {seed}: {v}"))
        });
        match caught {
            Some(line) => println!("{bug:?} caught: {line}"),
            None => panic!("{bug:?} was planted and none of its seeds showed \"{expected}\""),
        }
    }
}
