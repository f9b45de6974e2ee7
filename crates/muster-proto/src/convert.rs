//! Conversions between wire messages and core types.

use crate::pb;
use muster_core::{
    Assignment, ContainerOptions, Device, GpuDevice, JobId, MountPoint, NodeInventory, Resources,
    Ulimit, Volume,
};

fn gpu_to_pb(g: &GpuDevice) -> pb::Gpu {
    pb::Gpu {
        index: g.index,
        uuid: g.uuid.clone(),
        model: g.model.clone(),
        memory_mib: g.memory_mib,
        nvlink_peers: g.nvlink_peers.clone(),
    }
}

fn gpu_from_pb(g: &pb::Gpu) -> GpuDevice {
    GpuDevice {
        index: g.index,
        uuid: g.uuid.clone(),
        model: g.model.clone(),
        memory_mib: g.memory_mib,
        nvlink_peers: g.nvlink_peers.clone(),
    }
}

fn resources_to_pb(r: &Resources) -> pb::Resources {
    pb::Resources {
        millicpus: r.millicpus,
        memory_mib: r.memory_mib,
        gpus: r.gpus,
    }
}

fn resources_from_pb(r: Option<&pb::Resources>) -> Resources {
    r.map_or(Resources::ZERO, |r| {
        Resources::new(r.millicpus, r.memory_mib, r.gpus)
    })
}

pub fn inventory_to_pb(inv: &NodeInventory) -> pb::Inventory {
    pb::Inventory {
        capacity: Some(resources_to_pb(&inv.capacity)),
        hostname: inv.hostname.clone(),
        address: inv.address.clone(),
        executor: inv.executor.clone(),
        gpus: inv.gpus.iter().map(gpu_to_pb).collect(),
        labels: inv.labels.clone().into_iter().collect(),
        log_address: inv.log_address.clone(),
    }
}

pub fn inventory_from_pb(inv: &pb::Inventory) -> NodeInventory {
    NodeInventory {
        capacity: resources_from_pb(inv.capacity.as_ref()),
        hostname: inv.hostname.clone(),
        address: inv.address.clone(),
        executor: inv.executor.clone(),
        gpus: inv.gpus.iter().map(gpu_from_pb).collect(),
        labels: inv.labels.clone().into_iter().collect(),
        log_address: inv.log_address.clone(),
    }
}

pub fn assignment_to_pb(a: &Assignment) -> pb::Assignment {
    pb::Assignment {
        job_id: a.job.to_string(),
        attempt: a.attempt,
        term: a.term,
        image: a.image.clone(),
        command: a.command.clone(),
        environment: a
            .environment
            .iter()
            .map(|(name, value)| pb::EnvVar {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        resources: Some(resources_to_pb(&a.resources)),
        log_stream_name: a.log_stream_name.clone(),
        gpus: a.gpus.iter().map(gpu_to_pb).collect(),
        timeout_seconds: a.timeout_secs,
        volumes: a
            .options
            .volumes
            .iter()
            .map(|v| pb::Volume {
                name: v.name.clone(),
                host_path: v.host_path.clone(),
            })
            .collect(),
        mount_points: a
            .options
            .mount_points
            .iter()
            .map(|m| pb::MountPoint {
                source_volume: m.source_volume.clone(),
                container_path: m.container_path.clone(),
                read_only: m.read_only,
            })
            .collect(),
        user: a.options.user.clone(),
        readonly_root_filesystem: a.options.readonly_root_filesystem,
        ulimits: a
            .options
            .ulimits
            .iter()
            .map(|u| pb::Ulimit {
                name: u.name.clone(),
                soft: u.soft,
                hard: u.hard,
            })
            .collect(),
        privileged: a.options.privileged,
        capabilities_add: a.options.capabilities_add.clone(),
        devices: a
            .options
            .devices
            .iter()
            .map(|d| pb::Device {
                host_path: d.host_path.clone(),
                container_path: d.container_path.clone(),
                permissions: d.permissions.clone(),
            })
            .collect(),
        host_network: a.options.host_network,
    }
}

pub fn assignment_from_pb(a: &pb::Assignment) -> Assignment {
    Assignment {
        job: JobId::from(a.job_id.clone()),
        attempt: a.attempt,
        term: a.term,
        image: a.image.clone(),
        command: a.command.clone(),
        environment: a
            .environment
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect(),
        resources: resources_from_pb(a.resources.as_ref()),
        log_stream_name: a.log_stream_name.clone(),
        gpus: a.gpus.iter().map(gpu_from_pb).collect(),
        timeout_secs: a.timeout_seconds,
        options: ContainerOptions {
            volumes: a
                .volumes
                .iter()
                .map(|v| Volume {
                    name: v.name.clone(),
                    host_path: v.host_path.clone(),
                })
                .collect(),
            mount_points: a
                .mount_points
                .iter()
                .map(|m| MountPoint {
                    source_volume: m.source_volume.clone(),
                    container_path: m.container_path.clone(),
                    read_only: m.read_only,
                })
                .collect(),
            user: a.user.clone(),
            readonly_root_filesystem: a.readonly_root_filesystem,
            ulimits: a
                .ulimits
                .iter()
                .map(|u| Ulimit {
                    name: u.name.clone(),
                    soft: u.soft,
                    hard: u.hard,
                })
                .collect(),
            privileged: a.privileged,
            capabilities_add: a.capabilities_add.clone(),
            devices: a
                .devices
                .iter()
                .map(|d| Device {
                    host_path: d.host_path.clone(),
                    container_path: d.container_path.clone(),
                    permissions: d.permissions.clone(),
                })
                .collect(),
            host_network: a.host_network,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_round_trips() {
        let a = Assignment {
            job: JobId::from("j-1"),
            attempt: 2,
            term: 7,
            image: "busybox".into(),
            command: vec!["echo".into(), "hi".into()],
            environment: vec![("A".into(), "1".into())],
            resources: Resources::new(1500, 256, 1),
            log_stream_name: "x/default/j-1-2".into(),
            timeout_secs: Some(60),
            options: ContainerOptions {
                volumes: vec![Volume {
                    name: "data".into(),
                    host_path: Some("/srv/data".into()),
                }],
                mount_points: vec![MountPoint {
                    source_volume: "data".into(),
                    container_path: "/data".into(),
                    read_only: true,
                }],
                user: Some("1000".into()),
                readonly_root_filesystem: true,
                ulimits: vec![Ulimit {
                    name: "nofile".into(),
                    soft: 256,
                    hard: 512,
                }],
                privileged: true,
                capabilities_add: vec!["SYS_ADMIN".into()],
                devices: vec![Device {
                    host_path: "/dev/fuse".into(),
                    container_path: None,
                    permissions: vec!["READ".into()],
                }],
                host_network: false,
            },
            gpus: vec![GpuDevice {
                index: 1,
                uuid: "GPU-1".into(),
                model: "H100".into(),
                memory_mib: 81559,
                nvlink_peers: vec![0, 2, 3],
            }],
        };
        assert_eq!(assignment_from_pb(&assignment_to_pb(&a)), a);
    }
}
