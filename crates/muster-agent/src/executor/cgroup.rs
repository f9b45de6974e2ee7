//! Limits for the process executor's attempts through Linux control groups, as Docker sets
//! them for containers: a hard memory limit (past it the kernel kills the job, reported as
//! `OutOfMemoryError`) and a CPU quota of the job's vCPUs per 100 ms period. Both the unified
//! hierarchy (cgroup v2) and the split one (v1, memory and cpu controllers apart) are handled.
//!
//! Each attempt gets `muster/<job>-<attempt>` under every controller it uses; the child moves
//! itself there before it executes the job's program, so nothing it does escapes the limit.

use muster_core::Resources;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The CFS period the CPU quota is expressed in, in microseconds (Docker's).
const CPU_PERIOD_MICROS: u64 = 100_000;

/// Where attempt cgroups are made on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: one tree, `memory` and `cpu` enabled for `base`'s children.
    Unified { base: PathBuf },
    /// cgroup v1: a tree per controller; the cpu one may be missing.
    Split {
        memory: PathBuf,
        cpu: Option<PathBuf>,
    },
}

impl Hierarchy {
    /// Finds a hierarchy under `root` (normally `/sys/fs/cgroup`) that this process may write
    /// to, and makes Muster's base group in it. `Err` says why limits cannot be set here.
    pub fn detect(root: &Path) -> Result<Hierarchy, String> {
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"));
        if let Ok(controllers) = controllers
            && controllers.split_whitespace().any(|c| c == "memory")
        {
            let base = root.join("muster");
            mkdir(&base)?;
            // Children of `root` and of `base` may be given memory and cpu limits.
            for dir in [root, base.as_path()] {
                write(&dir.join("cgroup.subtree_control"), "+memory +cpu")?;
            }
            return Ok(Hierarchy::Unified { base });
        }
        if root.join("memory/memory.limit_in_bytes").exists() {
            let memory = root.join("memory/muster");
            mkdir(&memory)?;
            let cpu = root
                .join("cpu/cpu.cfs_quota_us")
                .exists()
                .then(|| root.join("cpu/muster"));
            if let Some(cpu) = &cpu {
                mkdir(cpu)?;
            }
            return Ok(Hierarchy::Split { memory, cpu });
        }
        Err(format!(
            "no cgroup hierarchy with a memory controller under {}",
            root.display()
        ))
    }

    /// Makes the group of one attempt and sets its limits.
    pub fn create(&self, name: &str, resources: &Resources) -> Result<AttemptCgroup, String> {
        let memory_bytes = resources.memory_mib.saturating_mul(1024 * 1024).to_string();
        let quota = (resources.millicpus * CPU_PERIOD_MICROS / 1000).max(1000);
        let mut dirs = Vec::new();
        match self {
            Hierarchy::Unified { base } => {
                let dir = base.join(name);
                mkdir(&dir)?;
                write(&dir.join("memory.max"), &memory_bytes)?;
                // No swap, as with Docker's `--memory` and `--memory-swap` equal.
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(
                    &dir.join("cpu.max"),
                    &format!("{quota} {CPU_PERIOD_MICROS}"),
                )?;
                dirs.push(dir);
            }
            Hierarchy::Split { memory, cpu } => {
                let dir = memory.join(name);
                mkdir(&dir)?;
                write(&dir.join("memory.limit_in_bytes"), &memory_bytes)?;
                let _ = write(&dir.join("memory.memsw.limit_in_bytes"), &memory_bytes);
                dirs.push(dir);
                if let Some(cpu) = cpu {
                    let dir = cpu.join(name);
                    mkdir(&dir)?;
                    write(
                        &dir.join("cpu.cfs_period_us"),
                        &CPU_PERIOD_MICROS.to_string(),
                    )?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    dirs.push(dir);
                }
            }
        }
        let procs = dirs
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        Ok(AttemptCgroup {
            dirs,
            procs,
            unified: matches!(self, Hierarchy::Unified { .. }),
        })
    }
}

impl Hierarchy {
    /// The group `name` if it exists (an earlier run of the agent made it), to be emptied and
    /// removed.
    pub fn existing(&self, name: &str) -> Option<AttemptCgroup> {
        let dirs: Vec<PathBuf> = match self {
            Hierarchy::Unified { base } => vec![base.join(name)],
            Hierarchy::Split { memory, cpu } => std::iter::once(memory.join(name))
                .chain(cpu.as_ref().map(|c| c.join(name)))
                .collect(),
        };
        let dirs: Vec<PathBuf> = dirs.into_iter().filter(|d| d.is_dir()).collect();
        (!dirs.is_empty()).then(|| AttemptCgroup {
            procs: Vec::new(),
            unified: matches!(self, Hierarchy::Unified { .. }),
            dirs,
        })
    }
}

/// One attempt's group (one directory per controller tree).
#[derive(Debug)]
pub struct AttemptCgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each directory, ready for the child to write to before it execs.
    procs: Vec<CString>,
    unified: bool,
}

impl AttemptCgroup {
    /// Moves the calling process into the group. Runs in the forked child before exec, so it
    /// only opens and writes (async-signal-safe); writing `0` moves the writer itself.
    pub fn enter_from_child(&self) -> std::io::Result<()> {
        for path in &self.procs {
            // SAFETY: plain syscalls on a NUL-terminated path and a static buffer.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// The memory group's directory (what `/proc/<pid>/cgroup` names, under its mount).
    pub fn memory_dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// Whether the kernel killed a process of the group for going over its memory limit.
    pub fn oom_killed(&self) -> bool {
        let dir = self.memory_dir();
        let (file, key) = if self.unified {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        let counted = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            });
        match counted {
            Some(n) => n > 0,
            // Kernels before 4.13 have no oom_kill count in v1: the limit was hit at least.
            None => std::fs::read_to_string(dir.join("memory.failcnt"))
                .ok()
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0),
        }
    }

    /// Kills whatever is left in the group once the job's own process has ended, as a
    /// container's processes end with it, and waits (briefly) for them to be gone.
    pub fn kill_all(&self) {
        let procs = self.memory_dir().join("cgroup.procs");
        for _ in 0..100 {
            let pids: Vec<i32> = std::fs::read_to_string(&procs)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill(2) has no memory-safety preconditions; the pids are this
                // attempt's processes, read from its own group.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Removes the group once its processes are gone.
    pub fn remove(&self) {
        for dir in &self.dirs {
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove an attempt's cgroup");
            }
        }
    }
}

fn mkdir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{}: {e}", path.display()))
}
