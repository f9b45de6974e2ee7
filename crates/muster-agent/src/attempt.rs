//! One attempt from start to reported end: its timeout, its stop signal, and its reports.

use crate::executor::Executor;
use crate::reporter::{Event, Reporter};
use muster_core::Assignment;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_attempt(
    executor: Arc<Executor>,
    reporter: Reporter,
    assignment: Assignment,
    log_path: PathBuf,
    stop: watch::Receiver<bool>,
    mut lease_expired: watch::Receiver<bool>,
    done: Arc<AtomicBool>,
    grace: Duration,
) {
    let job = assignment.job.to_string();
    let attempt = assignment.attempt;
    tracing::info!(job, attempt, "starting attempt");
    let (started_tx, started_rx) = oneshot::channel();
    // RUNNING is queued when the attempt starts and need not be delivered before it ends:
    // the reporter sends reports in the order they were made, so the exit never overtakes it,
    // and a job that ends at once reports both in one call.
    let running = async {
        if started_rx.await.is_ok() {
            muster_crashpoint::crash_point("agent_after_start");
            drop(reporter.report(&job, attempt, Event::Running));
        }
    };
    // The attempt's own stop signal: the leader's (TerminateJob, a superseded attempt), the
    // end of the agent's lease (the leader may soon retry it elsewhere), or the attempt's
    // timeout, whichever comes first.
    let (own_stop, own_stop_rx) = watch::channel(false);
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (own_stop, timed_out, mut stop) = (own_stop.clone(), timed_out.clone(), stop);
        let timeout = assignment.timeout_secs.map(Duration::from_secs);
        tokio::spawn(async move {
            let limit = async {
                match timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = crate::executor::stopped(&mut stop) => {}
                // (A lease that is gone, the agent ending, stops nothing by itself.)
                Ok(_) = lease_expired.wait_for(|ended| *ended) => {}
                _ = limit => timed_out.store(true, Ordering::SeqCst),
            }
            let _ = own_stop.send(true);
        })
    };
    let (mut exit, ()) = tokio::join!(
        executor.run(&assignment, &log_path, started_tx, own_stop_rx, grace),
        running
    );
    watchdog.abort();
    if timed_out.load(Ordering::SeqCst) {
        exit.reason = Some(muster_core::ATTEMPT_TIMED_OUT.to_owned());
    }
    tracing::info!(job, attempt, exit_code = ?exit.exit_code, reason = ?exit.reason, "attempt ended");
    let exited = Event::Exited {
        exit_code: exit.exit_code,
        reason: exit.reason,
    };
    reporter.report(&job, attempt, exited).await;
    done.store(true, Ordering::SeqCst);
}
