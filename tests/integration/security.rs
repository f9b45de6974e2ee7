//! Mutual TLS and roles on the internal ports: nothing without the cluster's keys can join,
//! vote, read assignments or report, and a certificate acts only as what it names.

use crate::harness::{TestCluster, eventually, outlive};
use muster_proto::pb;
use muster_tls::pki::{ClusterCa, Validity};
use muster_tls::{CONTROL_SERVER_NAME, Role};
use std::time::{Duration, SystemTime};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const HOUR: Duration = Duration::from_secs(3600);

/// A TLS channel to `addr` that trusts `ca_pem` and presents `client` (certificate, key).
async fn dial(
    addr: &str,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(CONTROL_SERVER_NAME);
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await
}

fn register(node: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        node_id: node.into(),
        compute_environment: "ce".into(),
        inventory: Some(pb::Inventory {
            capacity: Some(pb::Resources {
                millicpus: 1000,
                memory_mib: 1024,
                gpus: 0,
            }),
            hostname: node.into(),
            address: "127.0.0.1".into(),
            executor: "process".into(),
            ..Default::default()
        }),
    }
}

/// A three-node test cluster (mutual TLS) with compute environment `ce`: it, its CA's
/// certificate, its leader's id and that leader's agent address.
async fn cluster_with_ce() -> (TestCluster, String, u64, String) {
    let t = TestCluster::start(3).await;
    t.client(1)
        .call(
            "CreateComputeEnvironment",
            serde_json::json!({"computeEnvironmentName": "ce", "type": "UNMANAGED"}),
        )
        .await
        .expect("compute environment");
    let ca = t.cluster.ca().expect("the test cluster runs TLS");
    let ca_pem = ca.cert_pem().to_owned();
    let leader = t.cluster.leader().expect("a leader");
    let grpc = t.cluster.grpc_addrs()[(leader - 1) as usize].clone();
    (t, ca_pem, leader, grpc)
}

/// What a call over `channel` gets: the status code, or `Ok` as `Code::Ok`.
async fn register_code(channel: Channel, node: &str) -> Code {
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    match client.register(register(node)).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_holders_of_the_right_certificate_reach_the_internal_ports() {
    let (t, ca_pem, leader, grpc) = cluster_with_ce().await;
    let ca = t.cluster.ca().expect("the test cluster runs TLS");
    let raft = t.cluster.raft_addr(leader).to_string();
    let issue = |role: Role, validity: Validity| ca.issue(&role, &[], validity).unwrap();
    let agent_a = issue(Role::Agent("a".into()), Validity::from_now(HOUR));
    let control_9 = issue(Role::Control(9), Validity::from_now(HOUR));

    // The agent its certificate names registers, for itself only.
    let as_a = dial(&grpc, &ca_pem, Some((&agent_a.cert_pem, &agent_a.key_pem)))
        .await
        .expect("an agent of the cluster connects");
    assert_eq!(register_code(as_a.clone(), "a").await, Code::Ok);
    assert_eq!(
        register_code(as_a.clone(), "b").await,
        Code::PermissionDenied,
        "a stolen certificate used for another node"
    );
    // Nor may it report for another node's attempts, or watch its assignments.
    let mut client = pb::agent_service_client::AgentServiceClient::new(as_a.clone());
    let report = client
        .report_attempts(pb::AttemptReports {
            reports: vec![pb::AttemptReport {
                node_id: "b".into(),
                job_id: "job".into(),
                attempt: 1,
                event: Some(pb::attempt_report::Event::Running(pb::AttemptRunning {})),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(report.code(), Code::PermissionDenied, "{report:?}");
    let watch = client
        .watch_assignments(pb::WatchRequest {
            node_id: "b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::PermissionDenied, "{watch:?}");

    // An agent's certificate cannot take part in Raft.
    let to_raft = dial(&raft, &ca_pem, Some((&agent_a.cert_pem, &agent_a.key_pem)))
        .await
        .expect("the handshake itself succeeds: the CA is the cluster's");
    let mut raft_client = pb::raft_service_client::RaftServiceClient::new(to_raft);
    let vote = raft_client
        .vote(pb::RaftPayload::default())
        .await
        .unwrap_err();
    assert_eq!(vote.code(), Code::PermissionDenied, "{vote:?}");
    let propose = raft_client
        .propose(pb::RaftPayload::default())
        .await
        .unwrap_err();
    assert_eq!(propose.code(), Code::PermissionDenied, "{propose:?}");

    // A control node's certificate is no agent's.
    let as_control = dial(
        &grpc,
        &ca_pem,
        Some((&control_9.cert_pem, &control_9.key_pem)),
    )
    .await
    .unwrap();
    assert_eq!(register_code(as_control, "9").await, Code::PermissionDenied);

    // Without a client certificate the agent port lets the TLS through (an agent joins that
    // way) and refuses the call; the Raft port refuses the handshake.
    let anonymous = dial(&grpc, &ca_pem, None).await.unwrap();
    assert_eq!(
        register_code(anonymous.clone(), "a").await,
        Code::Unauthenticated
    );
    let empty = pb::agent_service_client::AgentServiceClient::new(anonymous)
        .report_attempts(pb::AttemptReports { reports: vec![] })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::Unauthenticated, "{empty:?}");
    let anonymous_raft = match dial(&raft, &ca_pem, None).await {
        Ok(channel) => pb::raft_service_client::RaftServiceClient::new(channel)
            .vote(pb::RaftPayload::default())
            .await
            .map(|_| ()),
        Err(_) => Err(tonic::Status::unavailable("refused at the handshake")),
    };
    assert!(anonymous_raft.is_err(), "an anonymous peer was heard");

    // A certificate of another CA, or an expired one, never gets a call through.
    let foreign_ca = ClusterCa::generate("intruder").unwrap();
    let forged = foreign_ca
        .issue(&Role::Agent("a".into()), &[], Validity::from_now(HOUR))
        .unwrap();
    let now = SystemTime::now();
    let expired = issue(
        Role::Agent("a".into()),
        Validity {
            not_before: now - 2 * HOUR,
            not_after: now - HOUR,
        },
    );
    for (what, cert) in [("forged", &forged), ("expired", &expired)] {
        let refused = match dial(&grpc, &ca_pem, Some((&cert.cert_pem, &cert.key_pem))).await {
            Ok(channel) => register_code(channel, "a").await != Code::Ok,
            Err(_) => true,
        };
        assert!(refused, "a {what} agent certificate was accepted");
    }

    // Plaintext gRPC to either port gets nowhere.
    for addr in [&grpc, &raft] {
        let plain = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await;
        let refused = match plain {
            Ok(channel) => register_code(channel, "a").await != Code::Ok,
            Err(_) => true,
        };
        assert!(refused, "plaintext was served on {addr}");
    }

    // The cluster itself still works: a node forwards, votes and replicates over TLS.
    t.client(1)
        .call(
            "CreateComputeEnvironment",
            serde_json::json!({
                "computeEnvironmentName": "after-intruders",
                "type": "UNMANAGED"
            }),
        )
        .await
        .expect("the cluster takes writes");
}

/// A joined agent renews its certificate before it expires, without a restart: once the
/// first certificate has expired, the agent still reports, and control nodes still read its
/// logs over new connections (which the expired certificate would fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joined_agent_renews_its_certificate_before_it_expires() {
    let t = TestCluster::start(3).await;
    let client = t.client(1);
    crate::harness::create_basics(&client, "ce", "q", "d").await;
    let ca = t.cluster.ca().expect("the test cluster runs TLS");
    // What a join left in work_dir/tls, with a certificate of 12 s.
    let work_dir = t.dir.path().join("agent-renewing");
    let tls_dir = work_dir.join("tls");
    let now = SystemTime::now();
    let short = Validity {
        not_before: now - Duration::from_secs(1),
        not_after: now + Duration::from_secs(12),
    };
    let first = ca
        .issue(&Role::Agent("renewing".into()), &[], short)
        .unwrap();
    muster_tls::pki::write_pem(&tls_dir.join("ca.pem"), ca.cert_pem(), false).unwrap();
    muster_tls::pki::write_pem(&tls_dir.join("agent.pem"), &first.cert_pem, false).unwrap();
    muster_tls::pki::write_pem(&tls_dir.join("agent.key"), &first.key_pem, true).unwrap();
    let config = joining_agent(
        &t,
        "renewing",
        "unused00.since-the-kept-certificate-is-valid",
        &work_dir,
    );
    let (stop, _task, runtime) = crate::harness::start_agent(config).await;

    // Renewed at two thirds of its life; then the first certificate expires.
    eventually("the agent renews its certificate", async || {
        std::fs::read_to_string(tls_dir.join("agent.pem")).unwrap() != first.cert_pem
    })
    .await;
    let renewed = muster_tls::Identity::load(
        "tls",
        &muster_tls::TlsFiles {
            ca_file: tls_dir.join("ca.pem"),
            cert_file: tls_dir.join("agent.pem"),
            key_file: tls_dir.join("agent.key"),
            ca_key_file: None,
        },
    )
    .expect("the renewed files are a valid identity");
    assert!(renewed.not_after() > now + Duration::from_secs(86_400));
    outlive(short.not_after + Duration::from_secs(1)).await;

    let job =
        crate::harness::submit(&client, "q", "d", "after-renewal", &["echo", "renewed"]).await;
    let done = crate::harness::wait_for_status(&client, &job, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    let stream = done["container"]["logStreamName"]
        .as_str()
        .unwrap()
        .to_owned();
    let page = client
        .call_logs(
            "GetLogEvents",
            serde_json::json!({"logGroupName": "/aws/batch/job", "logStreamName": stream,
                               "startFromHead": true}),
        )
        .await
        .expect("a control node reads the agent's logs over a new connection");
    assert_eq!(page["events"][0]["message"], "renewed", "{page}");
    let _ = stop.send(true);
    runtime.shutdown_background();
}

/// Control nodes renew their own certificates (they hold the CA's key) before they expire,
/// without a restart; a node restarted after the first certificates expired rejoins with the
/// renewed files, over new connections both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_nodes_renew_their_certificates_before_they_expire() {
    let mut t = TestCluster::start_tuned(
        3,
        muster_control::Tuning {
            node_cert_validity: Duration::from_secs(9),
            ..Default::default()
        },
    )
    .await;
    let started = SystemTime::now();
    let cert = |id: u64| t.dir.path().join("tls").join(format!("control-{id}.pem"));
    let first: Vec<String> = (1..=3)
        .map(|id| std::fs::read_to_string(cert(id)).unwrap())
        .collect();
    // Past the first certificates' end (renewed at two thirds of their life).
    outlive(started + Duration::from_secs(11)).await;
    for id in 1..=3u64 {
        assert_ne!(
            std::fs::read_to_string(cert(id)).unwrap(),
            first[(id - 1) as usize],
            "node {id} did not renew its certificate"
        );
    }
    // A restarted follower makes every connection anew.
    let leader = t
        .cluster
        .wait_for_leader(crate::harness::DEADLINE)
        .await
        .unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    t.cluster
        .restart_node(follower)
        .await
        .expect("the follower restarts");
    t.client(leader)
        .call(
            "CreateComputeEnvironment",
            serde_json::json!({"computeEnvironmentName": "after-renewal", "type": "UNMANAGED"}),
        )
        .await
        .expect("the cluster takes writes");
    let follower_client = t.client(follower);
    eventually("the restarted follower catches up over TLS", async || {
        follower_client
            .call(
                "DescribeComputeEnvironments",
                serde_json::json!({"computeEnvironments": ["after-renewal"]}),
            )
            .await
            .is_ok_and(|r| {
                r["computeEnvironments"]
                    .as_array()
                    .is_some_and(|a| a.len() == 1)
            })
    })
    .await;
}

/// An agent started beside a cluster that is being founded asks to join before the founder has
/// recorded the join token `muster cluster init` made: it waits, and joins once the token is
/// there, rather than exiting as if its token were wrong (the chaos harness, which starts
/// every process at once, saw agents exit so and be restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_that_asks_to_join_before_the_cluster_knows_a_token_waits_and_joins() {
    let t = TestCluster::start(3).await;
    crate::harness::create_basics(&t.client(1), "ce", "q", "d").await;
    let (id, secret) = ("early000", "a-secret-that-is-long-enough-0123");
    let work_dir = t.dir.path().join("agent-early");
    let config = joining_agent(&t, "early", &format!("{id}.{secret}"), &work_dir);
    let starting = tokio::spawn(crate::harness::start_agent(config));
    // The agent keeps asking (once a second); the cluster knows no token yet.
    crate::harness::never(
        "the agent gave up (or joined) with no token known",
        Duration::from_millis(2_500),
        async || starting.is_finished(),
    )
    .await;

    // The founder records the token, as it does a moment after its first start.
    let now = muster_control::now_millis();
    let recorded = t
        .cluster
        .node(1)
        .unwrap()
        .raft
        .propose(muster_core::Command::Access(
            muster_core::AccessCommand::CreateJoinToken(muster_core::JoinToken {
                id: id.into(),
                secret_sha256: muster_sigv4::sha256_hex(secret.as_bytes()),
                created_at: now,
                expires_at: muster_core::Timestamp(now.0 + 3_600_000),
                description: "made by the test".into(),
                revoked: false,
            }),
        ))
        .await;
    assert!(recorded.is_ok(), "{recorded:?}");
    let (stop, _task, runtime) = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("the agent joined once the token was known")
        .unwrap();
    assert!(work_dir.join("tls").join("agent.pem").exists());
    let _ = stop.send(true);
    runtime.shutdown_background();
}

/// A revoked agent's name can be reinstated, ten minutes after the revocation at the
/// earliest: it may then register with a certificate issued after the revocation (as a join
/// signs one), while every certificate it held before stays refused, so a stolen one does not
/// come back to life.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reinstated_agent_needs_a_certificate_newer_than_its_revocation() {
    let (t, ca_pem, leader, grpc) = cluster_with_ce().await;
    let client = t.client(1);
    let ca = t.cluster.ca().expect("the test cluster runs TLS");
    let minutes = |m: u64| Duration::from_secs(60 * m);
    // Issued half an hour ago (`Validity::from_now` then), and another issued now.
    let issued_ago = |ago: Duration| {
        let now = SystemTime::now();
        ca.issue(
            &Role::Agent("r".into()),
            &[],
            Validity {
                not_before: now - ago - muster_tls::pki::ISSUE_BACKDATE,
                not_after: now + HOUR,
            },
        )
        .unwrap()
    };
    let old = issued_ago(minutes(30));
    let as_old = dial(&grpc, &ca_pem, Some((&old.cert_pem, &old.key_pem)))
        .await
        .unwrap();
    assert_eq!(register_code(as_old.clone(), "r").await, Code::Ok);

    // Not revoked: nothing to reinstate.
    let refused = client
        .call_cluster("ReinstateAgent", serde_json::json!({"node": "r"}))
        .await
        .expect_err("reinstating an agent that is not revoked");
    assert!(refused.to_string().contains("is not revoked"), "{refused}");
    // Revoked just now: too soon to reinstate.
    client
        .call_cluster("RevokeAgent", serde_json::json!({"node": "r"}))
        .await
        .expect("revoked");
    assert_eq!(
        register_code(as_old.clone(), "r").await,
        Code::PermissionDenied
    );
    let refused = client
        .call_cluster("ReinstateAgent", serde_json::json!({"node": "r"}))
        .await
        .expect_err("reinstated a minute after the revocation");
    assert!(
        refused.to_string().contains("less than 10 minutes ago"),
        "{refused}"
    );

    // Revoked twenty minutes ago (as the leader's clock stamped it then), reinstated now.
    let revoked_at = muster_core::Timestamp(muster_control::now_millis().0 - 20 * 60_000);
    let revoke = muster_core::Command::Access(muster_core::AccessCommand::RevokeAgent {
        node: muster_core::NodeId("r".into()),
        at: revoked_at,
    });
    let recorded = t.cluster.node(leader).unwrap().raft.propose(revoke).await;
    assert!(recorded.is_ok(), "{recorded:?}");
    client
        .call_cluster("ReinstateAgent", serde_json::json!({"node": "r"}))
        .await
        .expect("reinstated twenty minutes after the revocation");
    let listed = client
        .call_cluster("ListJoinTokens", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(listed["revokedAgents"], serde_json::json!([]));
    assert_eq!(
        listed["reinstatedAgents"],
        serde_json::json!([{"node": "r", "revokedAt": revoked_at.as_millis()}])
    );

    // Certificates from before the revocation (half an hour ago, or two minutes before it,
    // within the signers' clock skew) stay refused; one issued since is taken.
    let just_before = issued_ago(minutes(22));
    let as_just_before = dial(
        &grpc,
        &ca_pem,
        Some((&just_before.cert_pem, &just_before.key_pem)),
    )
    .await
    .unwrap();
    for channel in [as_old, as_just_before] {
        assert_eq!(
            register_code(channel, "r").await,
            Code::PermissionDenied,
            "a certificate from before the revocation"
        );
    }
    let fresh = issued_ago(Duration::ZERO);
    let as_fresh = dial(&grpc, &ca_pem, Some((&fresh.cert_pem, &fresh.key_pem)))
        .await
        .unwrap();
    assert_eq!(register_code(as_fresh, "r").await, Code::Ok);
}

/// A process-executor agent of compute environment `ce` that joins the test cluster with
/// `token` (unless `work_dir/tls` already holds a valid certificate).
fn joining_agent(
    t: &TestCluster,
    name: &str,
    token: &str,
    work_dir: &std::path::Path,
) -> muster_agent::AgentConfig {
    let ca = t.cluster.ca().expect("the test cluster runs TLS");
    muster_agent::RawAgentConfig {
        join_token: Some(token.into()),
        ca_fingerprint: Some(muster_tls::pki::fingerprint(ca.cert_pem()).unwrap()),
        vcpus: Some(2.0),
        memory_mib: Some(2048),
        heartbeat_secs: 1,
        ..muster_agent::RawAgentConfig::new(
            name,
            "ce",
            t.cluster.grpc_addrs(),
            muster_agent::ExecutorKind::Process,
            work_dir.to_owned(),
        )
    }
    .validate()
    .unwrap()
}
