//! The faults a simulation injects: drawn from the seed, applied between simulation steps,
//! each healed after a drawn duration. At most one control node is down or cut off at a time,
//! so that a quorum always exists somewhere: the point is to prove that what a minority loses
//! is never lost, not that a cluster without a quorum stops.

use super::control;
use super::records::{Records, Rng};
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Fault {
    /// SIGKILL of a control node, restarted on the same disk when healed.
    CrashControl(u64),
    /// A control node cut off from the other control nodes (its agents still reach it).
    IsolateControl(u64),
    /// A control node that hears the others but whose messages to them are lost.
    OneWayFrom(u64),
    /// Messages between two control nodes held (a stalled link), delivered when healed.
    Hold(u64, u64),
    /// A slow link between two control nodes.
    Slow(u64, u64, Duration),
    /// An agent crashed, restarted when healed.
    CrashAgent(String),
    /// An agent cut off from every control node.
    CutOffAgent(String),
    /// An agent that reaches only one control node (the others refuse its packets).
    AgentReachesOnly(String, u64),
}

impl Fault {
    pub fn draw(
        rng: &mut Rng,
        mix: super::Mix,
        controls: &[u64],
        agents: &[String],
    ) -> (Fault, Duration) {
        let control = controls[rng.between(0, controls.len() as u64) as usize];
        let other = {
            let rest: Vec<u64> = controls.iter().copied().filter(|c| *c != control).collect();
            rest[rng.between(0, rest.len() as u64) as usize]
        };
        let agent = agents[rng.between(0, agents.len() as u64) as usize].clone();
        let secs = |rng: &mut Rng, low: u64, high: u64| {
            Duration::from_millis(rng.between(low * 1000, high * 1000))
        };
        if mix == super::Mix::LongCutOffs {
            // Past the node-lost TTL (30 s), so that the leader places the attempts elsewhere.
            let lasts = secs(rng, 32, 45);
            return if rng.percent(50) {
                (Fault::CutOffAgent(agent), lasts)
            } else {
                (Fault::AgentReachesOnly(agent, control), lasts)
            };
        }
        match rng.between(0, 8) {
            0 => (Fault::CrashControl(control), secs(rng, 1, 8)),
            1 => (Fault::IsolateControl(control), secs(rng, 1, 12)),
            2 => (Fault::OneWayFrom(control), secs(rng, 1, 10)),
            3 => (Fault::Hold(control, other), secs(rng, 1, 5)),
            4 => {
                let latency = Duration::from_millis(rng.between(50, 400));
                (Fault::Slow(control, other, latency), secs(rng, 2, 10))
            }
            5 => (Fault::CrashAgent(agent), secs(rng, 1, 10)),
            // Some shorter than the agent's stop_after (20 s), some past the node-lost TTL (30 s).
            6 => (Fault::CutOffAgent(agent), secs(rng, 5, 40)),
            _ => (Fault::AgentReachesOnly(agent, control), secs(rng, 5, 40)),
        }
    }

    /// The control node this fault takes away from the others, if any.
    pub fn control_node(&self) -> Option<u64> {
        match self {
            Fault::CrashControl(c) | Fault::IsolateControl(c) | Fault::OneWayFrom(c) => Some(*c),
            _ => None,
        }
    }

    pub fn agent(&self) -> Option<&str> {
        match self {
            Fault::CrashAgent(a) | Fault::CutOffAgent(a) | Fault::AgentReachesOnly(a, _) => Some(a),
            _ => None,
        }
    }

    pub fn apply(&self, sim: &mut turmoil::Sim<'_>, controls: &[u64], records: &Records) {
        let others = |me: u64| controls.iter().copied().filter(move |c| *c != me);
        match self {
            Fault::CrashControl(c) => sim.crash(control::host(*c)),
            Fault::IsolateControl(c) => {
                for o in others(*c) {
                    sim.partition(control::host(*c), control::host(o));
                }
            }
            Fault::OneWayFrom(c) => {
                for o in others(*c) {
                    sim.partition_oneway(control::host(*c), control::host(o));
                }
            }
            Fault::Hold(a, b) => sim.hold(control::host(*a), control::host(*b)),
            Fault::Slow(a, b, latency) => {
                sim.set_link_latency(control::host(*a), control::host(*b), *latency)
            }
            Fault::CrashAgent(a) => {
                sim.crash(a.as_str());
                // Its jobs' processes die with it.
                let at = sim.elapsed();
                let mut shared = records.lock();
                for run in shared
                    .runs
                    .iter_mut()
                    .filter(|r| r.agent == *a && r.stopped.is_none())
                {
                    run.stopped = Some(at);
                }
            }
            Fault::CutOffAgent(a) => {
                for c in controls {
                    sim.partition(a.as_str(), control::host(*c));
                }
            }
            Fault::AgentReachesOnly(a, reached) => {
                for c in others(*reached) {
                    sim.partition(a.as_str(), control::host(c));
                }
            }
        }
    }

    pub fn heal(&self, sim: &mut turmoil::Sim<'_>, controls: &[u64]) {
        let others = |me: u64| controls.iter().copied().filter(move |c| *c != me);
        match self {
            Fault::CrashControl(c) => sim.bounce(control::host(*c)),
            Fault::IsolateControl(c) | Fault::OneWayFrom(c) => {
                for o in others(*c) {
                    sim.repair(control::host(*c), control::host(o));
                }
            }
            Fault::Hold(a, b) => sim.release(control::host(*a), control::host(*b)),
            Fault::Slow(a, b, _) => {
                sim.set_link_latency(control::host(*a), control::host(*b), super::LINK_LATENCY)
            }
            Fault::CrashAgent(a) => sim.bounce(a.as_str()),
            Fault::CutOffAgent(a) | Fault::AgentReachesOnly(a, _) => {
                for c in controls {
                    sim.repair(a.as_str(), control::host(*c));
                }
            }
        }
    }
}
