//! What a simulation must show once its faults have healed and the cluster has quiesced; the
//! same properties the process-level checker (`chaos/muster_chaos/check.py`) proves.

use super::records::{CallKind, CallResult, Records, Run};
use super::workload::ATTEMPTS;
use muster_core::{Job, JobId, JobStatus, State};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Every job: those in memory and the ended ones in the archive.
fn every_job(state: &State) -> Vec<Cow<'_, Job>> {
    let archived = state.ended_job_ids().filter_map(|id| state.find_job(&id));
    state.jobs().map(Cow::Borrowed).chain(archived).collect()
}

/// Every property, each violation as a line.
pub fn violations(records: &Records, leader: u64, replayed: &Replayed) -> Vec<String> {
    let shared = records.lock();
    let mut found = replayed.violations.clone();
    let node = &shared.nodes[&leader].node;
    let applied = node.state.read();
    let state = &applied.state;

    // Every node applied the same entries to the same state.
    let mine = serde_json::to_string(state).unwrap_or_default();
    for (id, other) in &shared.nodes {
        let theirs = other.node.state.read();
        if theirs.last_applied != applied.last_applied {
            found.push(format!(
                "node {id} applied up to {:?}, the leader {leader} up to {:?}",
                theirs.last_applied, applied.last_applied
            ));
        } else if serde_json::to_string(&theirs.state).unwrap_or_default() != mine {
            found.push(format!(
                "node {id} holds another state than the leader {leader}"
            ));
        }
        // Every ended job its index lists is in its archive.
        for job in theirs.state.ended_job_ids() {
            if theirs.state.find_job(&job).is_none() {
                found.push(format!("node {id} lost ended job {job} from its archive"));
            }
        }
    }
    let jobs = every_job(state);

    // No acknowledged submit lost, no refused one applied, no submit applied twice.
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for job in &jobs {
        *names.entry(job.spec.name.as_str()).or_default() += 1;
    }
    for (name, count) in &names {
        if *count > 1 {
            found.push(format!("{count} jobs are named {name}"));
        }
    }
    for call in &shared.calls {
        let CallKind::Submit { job, name } = &call.kind else {
            continue;
        };
        let exists = state.job_exists(&JobId::from(job.as_str()));
        match call.ended.map(|(_, r)| r) {
            Some(CallResult::Ok) if !exists => {
                found.push(format!("acknowledged submit of {name} ({job}) was lost"))
            }
            Some(CallResult::Failed) if exists => found.push(format!(
                "submit of {name} ({job}) was refused as not applied, yet {job} exists"
            )),
            _ => {}
        }
    }

    // Every job ended, within its attempts.
    for job in &jobs {
        if !matches!(job.status, JobStatus::Succeeded | JobStatus::Failed) {
            found.push(format!("job {} is still {:?}", job.id.0, job.status));
        }
        if job.attempts.len() > ATTEMPTS as usize {
            found.push(format!(
                "job {} made {} attempts; its strategy allows {ATTEMPTS}",
                job.id.0,
                job.attempts.len()
            ));
        }
    }

    found.extend(run_violations(state, &shared.runs));
    found
}

/// What the agents ran against what the state says they were given.
fn run_violations(state: &State, runs: &[Run]) -> Vec<String> {
    let mut found = Vec::new();
    let mut by_job: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for run in runs {
        by_job.entry(run.job.as_str()).or_default().push(run);
        let Some(stopped) = run.stopped else {
            found.push(format!(
                "{} still runs attempt {} of {} (started at {:?}) after the cluster quiesced",
                run.agent, run.attempt, run.job, run.started
            ));
            continue;
        };
        let Some(job) = state.find_job(&JobId::from(run.job.as_str())) else {
            found.push(format!(
                "{} ran {}, which does not exist",
                run.agent, run.job
            ));
            continue;
        };
        // The attempt it ran was placed on this agent.
        let placed_on = job
            .attempts
            .get(run.attempt as usize - 1)
            .map(|a| a.node.0.as_str())
            .or(job
                .active
                .as_ref()
                .filter(|a| a.number == run.attempt)
                .map(|a| a.node.0.as_str()));
        if placed_on != Some(run.agent.as_str()) {
            found.push(format!(
                "{} ran attempt {} of {}, which the state places on {placed_on:?}",
                run.agent, run.attempt, run.job
            ));
        }
        // A job that succeeded did so by an attempt that exited 0.
        if job.status == JobStatus::Succeeded
            && run.attempt as usize == job.attempts.len()
            && run.exit_code.is_some_and(|c| c != 0)
        {
            found.push(format!(
                "{} succeeded, but its attempt {} exited {:?} at {:?}",
                run.job, run.attempt, run.exit_code, stopped
            ));
        }
    }
    // No attempt ran twice, even one run after the other.
    let mut by_attempt: BTreeMap<(&str, u32), usize> = BTreeMap::new();
    for run in runs {
        *by_attempt
            .entry((run.job.as_str(), run.attempt))
            .or_default() += 1;
    }
    for ((job, attempt), count) in by_attempt {
        if count > 1 {
            found.push(format!("attempt {attempt} of {job} ran {count} times"));
        }
    }
    // No job ran twice at once: not two runs of one attempt, nor of two attempts.
    for (job, runs) in by_job {
        for (i, a) in runs.iter().enumerate() {
            for b in &runs[i + 1..] {
                let a_end = a.stopped.unwrap_or(std::time::Duration::MAX);
                let b_end = b.stopped.unwrap_or(std::time::Duration::MAX);
                if a.started < b_end && b.started < a_end {
                    found.push(format!(
                        "{job} ran twice at once: attempt {} on {} ({:?}..{:?}) and attempt {} on {} ({:?}..{:?})",
                        a.attempt, a.agent, a.started, a.stopped, b.attempt, b.agent, b.started, b.stopped
                    ));
                }
            }
        }
    }
    found
}

/// What replaying a node's committed log found.
#[derive(Default)]
pub struct Replayed {
    pub violations: Vec<String>,
    pub entries: u64,
}

/// Replays `log` entry by entry: no node over-committed at any index, and no job leaves a
/// terminal status, goes back to SUBMITTED, or has more attempts than its strategy allows.
pub fn replay(log: &mut muster_store::MemLogStore<muster_raft::TypeConfig>) -> Replayed {
    let mut last: BTreeMap<JobId, JobStatus> = BTreeMap::new();
    let mut found = Vec::new();
    let replay =
        // The simulation never snapshots (its runs stay far below the interval): whole logs.
        futures::executor::block_on(muster_control::replay::replay_store(log, None, |index, state| {
            for job in state.jobs() {
                let was = last.insert(job.id.clone(), job.status);
                let Some(was) = was else { continue };
                let terminal = matches!(was, JobStatus::Succeeded | JobStatus::Failed);
                if (terminal && job.status != was)
                    || (was != JobStatus::Submitted && job.status == JobStatus::Submitted)
                {
                    found.push(format!(
                        "entry {index}: job {} went from {was:?} to {:?}",
                        job.id.0, job.status
                    ));
                }
                let made = job.attempts.len() + usize::from(job.active.is_some());
                if made > ATTEMPTS as usize {
                    found.push(format!(
                        "entry {index}: job {} has {made} attempts",
                        job.id.0
                    ));
                }
            }
        }));
    match replay {
        Ok(replay) => {
            found.extend(
                replay
                    .violations
                    .iter()
                    .map(|(index, v)| format!("entry {index}: {v}")),
            );
            Replayed {
                violations: found,
                entries: replay.commands,
            }
        }
        Err(e) => Replayed {
            violations: vec![format!("the log cannot be replayed: {e}")],
            entries: 0,
        },
    }
}
