//! What this machine offers: logical CPUs and memory from the OS, less what is reserved.

use crate::AgentConfig;
use muster_core::{NodeInventory, Resources};

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Logical CPUs the process may use, in thousandths.
fn machine_millicpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000
}

/// `MemTotal` from /proc/meminfo, in MiB.
fn machine_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib / 1024)
}

pub fn collect(config: &AgentConfig, address: String) -> NodeInventory {
    let millicpus = config.vcpus_override.unwrap_or_else(machine_millicpus);
    let memory = config
        .memory_override_mib
        .unwrap_or_else(machine_memory_mib);
    NodeInventory {
        capacity: Resources::new(
            millicpus.saturating_sub(config.reserved_millicpus),
            memory.saturating_sub(config.reserved_memory_mib),
            0,
        ),
        hostname: hostname(),
        address,
        executor: config.executor.as_str().to_owned(),
    }
}
