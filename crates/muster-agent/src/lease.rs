//! The agent's lease on its attempts: how long they may run on without this agent hearing
//! from a leader that holds a quorum.
//!
//! The leader marks an agent lost `node_lost_after` past its last heartbeat's arrival and
//! retries its attempts elsewhere. So that no attempt ever runs in two places at once, every
//! attempt here must be dead by then: stopping starts at the lease's end, and the lease is
//! short enough that the grace period between SIGTERM and SIGKILL, and the checks' own
//! cadence, fit before the leader may act. Contact counts from when a heartbeat left (see
//! `heartbeat_loop`), which is before it arrived, so the two clocks nest.
//!
//! The lease is also written to `work_dir/lease` as a deadline on the host's boot clock, for
//! the warden (`crate::warden`): a process that outlives the agent and stops what the
//! agent's attempts left running should the agent die or hang past its lease.

use crate::AgentConfig;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often the lease is checked and its file rewritten.
pub(crate) const LEASE_CHECK: Duration = Duration::from_secs(1);

/// What the lease leaves between its end plus the grace period and the leader's node-lost
/// time: the agent's check cadence (1 s; the warden's, a second after the lease's end, as it
/// waits for the agent first) and half a second of slack.
pub(crate) const LEASE_SLACK: Duration = Duration::from_millis(2_500);

/// The file beside the agent's work that holds its lease.
pub fn lease_path(work_dir: &std::path::Path) -> PathBuf {
    work_dir.join("lease")
}

pub(crate) struct Lease {
    state: Mutex<LeaseState>,
    /// The longest lease the agent's config allows (`stop_after_secs`).
    configured: Duration,
    grace: Duration,
    file: PathBuf,
    expired: watch::Sender<bool>,
}

struct LeaseState {
    /// When a heartbeat that a quorum-holding leader answered was sent.
    contact: Instant,
    /// What the leader said it waits before marking this agent lost.
    node_lost_after: Option<Duration>,
    /// Whether a lease too short to be useful was reported.
    warned: bool,
}

impl Lease {
    /// A lease that runs from now, or from where an earlier run of this agent left it (in
    /// its file): an agent restarted after being down a while must not grant the attempts
    /// it finds still running a lease it never had.
    pub(crate) fn new(config: &AgentConfig) -> Self {
        let file = lease_path(&config.work_dir);
        let now = Instant::now();
        let contact = match LeaseFile::read(&file) {
            Some(earlier) => {
                let left = Duration::from_millis(earlier.deadline_ms.saturating_sub(boot_millis()));
                // The earlier lease ends `left` from now: count contact so that this one ends
                // no later.
                now.checked_sub(config.stop_after.saturating_sub(left))
                    .unwrap_or(now)
            }
            None => now,
        };
        let lease = Self {
            state: Mutex::new(LeaseState {
                contact,
                node_lost_after: None,
                warned: false,
            }),
            configured: config.stop_after,
            grace: config.stop_grace,
            file,
            expired: watch::channel(false).0,
        };
        lease.expired.send_replace(lease.is_expired());
        lease
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A leader holding a quorum answered a heartbeat sent at `sent_at` (never moves back:
    /// heartbeats to several nodes may answer out of order).
    pub(crate) fn renew(&self, sent_at: Instant, node_lost_after: Option<Duration>) {
        let mut state = self.lock();
        state.contact = state.contact.max(sent_at);
        if node_lost_after.is_some() {
            state.node_lost_after = node_lost_after;
        }
    }

    /// How long after contact the lease ends: `stop_after`, shortened where the leader's
    /// node-lost time leaves less room for the grace period.
    pub(crate) fn term(&self) -> Duration {
        let mut state = self.lock();
        let Some(lost) = state.node_lost_after else {
            return self.configured;
        };
        let room = lost.saturating_sub(self.grace + LEASE_SLACK);
        if room < self.configured && room < Duration::from_secs(2) && !state.warned {
            state.warned = true;
            tracing::error!(
                node_lost_after = ?lost,
                stop_grace = ?self.grace,
                "the cluster's node_lost_after_secs leaves almost no lease once stop_grace_secs is \
                 taken: attempts stop at any short silence; shorten stop_grace_secs"
            );
        }
        self.configured.min(room)
    }

    fn silent(&self) -> Duration {
        self.lock().contact.elapsed()
    }

    pub(crate) fn is_expired(&self) -> bool {
        self.silent() > self.term()
    }

    /// Flips to `true` when the lease ends, and back when contact renews it.
    pub(crate) fn expired(&self) -> watch::Receiver<bool> {
        self.expired.subscribe()
    }

    /// Publishes the lease's state every [`LEASE_CHECK`] and keeps its file current, until
    /// `shutdown`; then removes the file, for the agent stops its attempts itself.
    pub(crate) async fn keep(&self, mut shutdown: watch::Receiver<bool>) {
        let mut check = tokio::time::interval(LEASE_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = check.tick() => {}
            }
            let left = self.term().saturating_sub(self.silent());
            let expired = left.is_zero();
            self.expired.send_if_modified(|was| {
                let changed = *was != expired;
                if changed && expired {
                    tracing::warn!(silent = ?self.silent(), "cut off from the control plane: the lease ended, stopping every attempt");
                } else if changed {
                    tracing::info!("in contact again: the lease is renewed");
                }
                *was = expired;
                changed
            });
            let file = LeaseFile {
                deadline_ms: boot_millis() + left.as_millis() as u64,
                grace_ms: self.grace.as_millis() as u64,
                agent_pid: std::process::id(),
            };
            if let Err(e) = file.write(&self.file) {
                tracing::warn!(path = %self.file.display(), error = %e, "cannot write the lease file");
            }
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// The lease as the warden reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseFile {
    /// When the lease ends, in milliseconds of the host's boot clock.
    pub deadline_ms: u64,
    /// Between SIGTERM and SIGKILL.
    pub grace_ms: u64,
    /// The agent that holds it.
    pub agent_pid: u32,
}

impl LeaseFile {
    pub fn read(path: &std::path::Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        Some(Self {
            deadline_ms: fields.next()?.ok()?,
            grace_ms: fields.next()?.ok()?,
            agent_pid: u32::try_from(fields.next()?.ok()?).ok()?,
        })
    }

    fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        // Whole or not at all: the warden never reads half a deadline.
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            format!(
                "{} {} {}\n",
                self.deadline_ms, self.grace_ms, self.agent_pid
            ),
        )?;
        std::fs::rename(&tmp, path)
    }
}

/// Milliseconds of the host's boot clock: monotonic, the same for every process, and running
/// while the machine is suspended (when the leader's clock runs too).
pub fn boot_millis() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe {
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now);
    }
    now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, stop_after: u64, grace: u64) -> AgentConfig {
        let mut raw = crate::RawAgentConfig::new(
            "n1",
            "ce",
            vec!["127.0.0.1:1".into()],
            crate::ExecutorKind::Process,
            dir.to_owned(),
        );
        raw.stop_after_secs = stop_after;
        raw.stop_grace_secs = grace;
        raw.plaintext = true;
        raw.validate().unwrap()
    }

    #[tokio::test]
    async fn the_lease_leaves_room_for_the_grace_period_before_the_leader_retries() {
        let dir = tempfile::tempdir().unwrap();
        let lease = Lease::new(&config(dir.path(), 20, 10));
        assert_eq!(lease.term(), Duration::from_secs(20));
        // The leader marks the agent lost 30 s after its last heartbeat: stopping must begin
        // early enough that SIGKILL, 10 s after SIGTERM, lands before then.
        lease.renew(Instant::now(), Some(Duration::from_secs(30)));
        assert_eq!(
            lease.term(),
            Duration::from_secs(30) - Duration::from_secs(10) - LEASE_SLACK
        );
        assert!(lease.term() + Duration::from_secs(10) + LEASE_CHECK < Duration::from_secs(30));
        // A generous node-lost time leaves the configured lease as it is.
        lease.renew(Instant::now(), Some(Duration::from_secs(120)));
        assert_eq!(lease.term(), Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_ends_after_its_term_without_contact_and_renews_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let lease = std::sync::Arc::new(Lease::new(&config(dir.path(), 6, 1)));
        let (stop, shutdown) = watch::channel(false);
        let keeper = tokio::spawn({
            let lease = lease.clone();
            async move { lease.keep(shutdown).await }
        });
        let mut expired = lease.expired();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!*expired.borrow_and_update());
        let written = LeaseFile::read(&lease_path(dir.path())).expect("the lease file");
        assert_eq!(written.agent_pid, std::process::id());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(*expired.borrow_and_update(), "6 s without contact");
        lease.renew(Instant::now(), None);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!*expired.borrow_and_update(), "renewed");
        let _ = stop.send(true);
        keeper.await.unwrap();
        assert!(
            LeaseFile::read(&lease_path(dir.path())).is_none(),
            "removed at shutdown"
        );
    }

    #[test]
    fn a_restarted_agent_inherits_what_was_left_of_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), 20, 5);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            // The earlier run's lease ended a while ago: the new one starts ended.
            LeaseFile {
                deadline_ms: boot_millis().saturating_sub(1_000),
                grace_ms: 5_000,
                agent_pid: 1,
            }
            .write(&lease_path(dir.path()))
            .unwrap();
            assert!(Lease::new(&config).is_expired());
            // It had 4 s left: the new one ends within them, not 20 s from now.
            LeaseFile {
                deadline_ms: boot_millis() + 4_000,
                grace_ms: 5_000,
                agent_pid: 1,
            }
            .write(&lease_path(dir.path()))
            .unwrap();
            let lease = Lease::new(&config);
            assert!(!lease.is_expired());
            assert!(
                lease.silent() >= Duration::from_secs(15),
                "{:?}",
                lease.silent()
            );
        });
    }
}
