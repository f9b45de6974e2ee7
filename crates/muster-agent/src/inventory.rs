//! What this machine offers: logical CPUs and memory from the OS and GPUs through NVML, less
//! what is reserved for the system.

use crate::AgentConfig;
use muster_core::{GpuDevice, NodeInventory, Resources};
use std::collections::BTreeMap;
use std::path::Path;

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Logical CPUs the process may use, in thousandths.
pub fn machine_millicpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000
}

/// `MemTotal` from /proc/meminfo, in MiB.
pub fn machine_memory_mib() -> u64 {
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

/// The GPUs NVML reports. No NVIDIA driver (no `libnvidia-ml.so.1`) or no GPU is not an
/// error: the node simply offers none, and says so once in the log.
pub fn gpus() -> Vec<GpuDevice> {
    use nvml_wrapper::Nvml;
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(e) => {
            tracing::info!(reason = %e, "no GPUs: NVML is not available");
            return Vec::new();
        }
    };
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "NVML could not count GPUs; offering none");
            return Vec::new();
        }
    };
    let devices: Vec<(u32, nvml_wrapper::Device)> = (0..count)
        .filter_map(|index| {
            let device = nvml
                .device_by_index(index)
                .map_err(|e| tracing::warn!(index, error = %e, "skipping GPU"))
                .ok()?;
            Some((index, device))
        })
        .collect();
    let indices: Vec<u32> = devices.iter().map(|(index, _)| *index).collect();
    let peers = nvlink_peers(&indices, |a, b| {
        use nvml_wrapper::enum_wrappers::device::{P2pCapabilitiesIndex, P2pStatus};
        let (Some((_, a)), Some((_, b))) = (
            devices.iter().find(|(i, _)| *i == a),
            devices.iter().find(|(i, _)| *i == b),
        ) else {
            return false;
        };
        matches!(
            a.p2p_status(b, P2pCapabilitiesIndex::NvLink),
            Ok(P2pStatus::Ok)
        )
    });
    devices
        .iter()
        .zip(peers)
        .map(|((index, device), nvlink_peers)| GpuDevice {
            index: *index,
            uuid: device.uuid().unwrap_or_default(),
            model: device.name().unwrap_or_default(),
            memory_mib: device.memory_info().map_or(0, |m| m.total / (1024 * 1024)),
            nvlink_peers,
        })
        .collect()
}

/// For each GPU of `indices`, the others it reaches over NVLink, as `linked(from, to)` (NVML's
/// peer-to-peer status over NVLink, which also covers GPUs joined through an NVSwitch) says.
fn nvlink_peers(indices: &[u32], linked: impl Fn(u32, u32) -> bool) -> Vec<Vec<u32>> {
    indices
        .iter()
        .map(|&from| {
            indices
                .iter()
                .copied()
                .filter(|&to| to != from && linked(from, to))
                .collect()
        })
        .collect()
}

pub fn collect(config: &AgentConfig, address: String, gpus: Vec<GpuDevice>) -> NodeInventory {
    let millicpus = config.vcpus_override.unwrap_or_else(machine_millicpus);
    let memory = config
        .memory_override_mib
        .unwrap_or_else(machine_memory_mib);
    NodeInventory {
        capacity: Resources::new(
            millicpus.saturating_sub(config.reserved_millicpus),
            memory.saturating_sub(config.reserved_memory_mib),
            gpus.len() as u32,
        ),
        hostname: hostname(),
        address,
        executor: config.executor.as_str().to_owned(),
        gpus,
        labels: labels(config, &rdma_devices(Path::new(RDMA_CLASS_DIR))),
        // Filled in by the agent once its log service is listening.
        log_address: String::new(),
    }
}

/// The address of the interface the host's default route leaves by (found by connecting a
/// UDP socket, which sends nothing), else the loopback address: what the other nodes of a
/// multi-node job reach this machine at unless the config names one.
pub fn default_private_address() -> std::net::IpAddr {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|socket| {
            socket.connect("192.0.2.1:9")?;
            socket.local_addr()
        })
        .map(|local| local.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
}

/// Where the kernel lists RDMA devices: InfiniBand HCAs and AWS EFA adapters alike.
const RDMA_CLASS_DIR: &str = "/sys/class/infiniband";

/// Names of the RDMA devices under `dir`, sorted; none when it does not exist.
pub fn rdma_devices(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The node's labels: `rdma-devices` and `efa` when the machine has such devices, then the
/// config's labels (which win).
pub fn labels(config: &AgentConfig, rdma: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if !rdma.is_empty() {
        out.insert("rdma-devices".to_owned(), rdma.join(","));
        let efa = rdma
            .iter()
            .any(|d| d.starts_with("efa") || d.starts_with("rdmap"));
        out.insert("efa".to_owned(), efa.to_string());
    }
    out.extend(config.labels.clone());
    out
}

#[cfg(test)]
mod tests {
    use super::nvlink_peers;

    #[test]
    fn each_gpu_lists_the_others_it_reaches_over_nvlink() {
        // Two NVLink pairs, (0, 1) and (2, 3), as on a PCIe host with bridged pairs; GPU 4
        // has no NVLink at all.
        let pairs = [(0, 1), (2, 3)];
        let linked = |a: u32, b: u32| pairs.contains(&(a, b)) || pairs.contains(&(b, a));
        assert_eq!(
            nvlink_peers(&[0, 1, 2, 3, 4], linked),
            vec![vec![1], vec![0], vec![3], vec![2], vec![]]
        );
        // Behind an NVSwitch every GPU reaches every other; a GPU is never its own peer.
        assert_eq!(
            nvlink_peers(&[0, 1, 2], |_, _| true),
            vec![vec![1, 2], vec![0, 2], vec![0, 1]]
        );
    }
}
