//! Rolling upgrades: the cluster's command level keeps what a newer release brought from being
//! proposed while a control node of an earlier release could meet it.

use crate::harness::{
    TestCluster, archive_at_once, create_basics, eventually, ok, wait_for_status,
};
use serde_json::json;
use std::collections::BTreeMap;

/// What a multi-node definition registration needs.
fn multinode_definition(name: &str) -> serde_json::Value {
    json!({"jobDefinitionName": name, "type": "multinode", "nodeProperties": {
        "numNodes": 2, "mainNode": 0, "nodeRangeProperties": [{"targetNodes": "0:", "container": {
            "image": "busybox", "command": ["true"],
            "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "32"}]}}]}})
}

/// Node 1 stands for a control node of an earlier release (it reports command level 1), so
/// the cluster stays at level 1: multi-node definitions are refused with a reason that names
/// the level, and ended jobs stay in memory (no `ArchiveEnded`, which that node would stop
/// at). Upgraded (restarted reporting this release's level), it lets the leader raise the
/// level within seconds, and both go ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_of_an_earlier_release_holds_the_cluster_at_its_level_until_it_is_upgraded() {
    let mut t = TestCluster::start_tuned(
        3,
        muster_control::Tuning {
            history: archive_at_once(),
            command_levels: BTreeMap::from([(1, 1)]),
            ..Default::default()
        },
    )
    .await;
    let client = t.client(2);
    create_basics(&client, "ce", "q", "d").await;
    let refused = client
        .call("RegisterJobDefinition", multinode_definition("mpi"))
        .await
        .expect_err("a multinode definition at level 1");
    let message = refused.to_string();
    assert!(
        message.contains("command level 2") && message.contains("at level 1"),
        "{message}"
    );

    // A job that ends (cancelled while it waits for an agent) stays in memory.
    let job = crate::harness::submit(&client, "q", "d", "ends", &["true"]).await;
    ok(client
        .call("CancelJob", json!({"jobId": job, "reason": "test"}))
        .await);
    wait_for_status(&client, &job, &["FAILED"]).await;
    // A leader of this release, which asks every node for its level (node 1, standing for an
    // earlier release, would not).
    if t.cluster.leader() == Some(1) {
        t.cluster
            .node(1)
            .unwrap()
            .raft
            .transfer_leader(Some(2))
            .await
            .expect("leadership moves to node 2");
    }
    eventually("a leader of this release", async || {
        matches!(t.cluster.leader(), Some(2 | 3))
    })
    .await;
    let status = t.cluster.node(2).unwrap().raft.cluster_status().await;
    assert_eq!(status.cluster_level, 1);
    let levels: Vec<Option<u32>> = status.members.iter().map(|m| m.command_level).collect();
    assert_eq!(
        levels,
        [
            Some(1),
            Some(muster_core::COMMAND_LEVEL),
            Some(muster_core::COMMAND_LEVEL)
        ]
    );
    // Through the leader's archive checks (every second) and a level check (every 5 s).
    crate::harness::never(
        "ended jobs archived, or the level raised, at level 1",
        std::time::Duration::from_secs(6),
        async || {
            t.cluster.running().any(|n| {
                let state = &n.raft.state.read().state;
                state.ended_job_count() > 0 || state.cluster_level() != 1
            })
        },
    )
    .await;

    // Upgraded: the level rises, the job leaves memory, multinode definitions are taken.
    t.cluster.set_command_level(1, muster_core::COMMAND_LEVEL);
    t.cluster.restart_node(1).await.unwrap();
    eventually("the leader raises the cluster's level", async || {
        t.cluster.running().count() == 3
            && t.cluster
                .running()
                .all(|n| n.raft.state.read().state.cluster_level() == muster_core::COMMAND_LEVEL)
    })
    .await;
    eventually("the ended job moves to the archive", async || {
        t.cluster
            .running()
            .all(|n| n.raft.state.read().state.ended_job_count() == 1)
    })
    .await;
    ok(client
        .call("RegisterJobDefinition", multinode_definition("mpi"))
        .await);
}
