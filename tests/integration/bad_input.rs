//! Bad input through a real cluster: 400 ClientException naming the field, and nothing
//! written to the Raft log.

use crate::harness::{TestCluster, create_basics};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_submits_are_refused_and_write_nothing() {
    let t = TestCluster::start(3).await;
    let client = t.follower_client();
    create_basics(&client, "ce", "q", "d").await;
    let leader = t.cluster.node(t.cluster.leader().unwrap()).unwrap();
    let log_index = || leader.raft.raft.metrics().borrow().last_log_index;
    let before = log_index();

    let cases = [
        (
            json!({"jobName": "j", "jobQueue": "no-such-queue", "jobDefinition": "d"}),
            "jobQueue",
        ),
        (
            json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "no-such-definition"}),
            "jobDefinition",
        ),
        (json!({"jobQueue": "q", "jobDefinition": "d"}), "jobName"),
        (
            json!({"jobName": "n".repeat(129), "jobQueue": "q", "jobDefinition": "d"}),
            "jobName",
        ),
        (
            json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "d", "containerOverrides": {"vcpus": 0}}),
            "vcpus",
        ),
    ];
    for (body, field) in cases {
        match client.call("SubmitJob", body.clone()).await {
            Err(muster_client::CallError::Api {
                status,
                code,
                message,
            }) => {
                assert_eq!((status, code.as_str()), (400, "ClientException"), "{body}");
                assert!(message.contains(field), "{message:?} does not name {field}");
            }
            other => panic!("{body} was not refused: {other:?}"),
        }
    }
    let zero_vcpus = json!({"jobDefinitionName": "z", "type": "container",
                            "containerProperties": {"image": "i", "vcpus": 0, "memory": 64}});
    let refused = client
        .call("RegisterJobDefinition", zero_vcpus)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("containerProperties.vcpus"),
        "{refused}"
    );

    assert_eq!(
        log_index(),
        before,
        "a refused request reached the Raft log"
    );
    let listed = client
        .call(
            "ListJobs",
            json!({"jobQueue": "q", "jobStatus": "RUNNABLE"}),
        )
        .await
        .unwrap();
    assert_eq!(listed["jobSummaryList"], json!([]));
    let defs = client
        .call("DescribeJobDefinitions", json!({"jobDefinitionName": "z"}))
        .await
        .unwrap();
    assert_eq!(defs["jobDefinitions"], json!([]));
    t.shutdown().await;
}
