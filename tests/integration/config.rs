//! The commented example configs in `deploy/config` parse and validate.

#[test]
fn example_server_config_is_valid() {
    let text = include_str!("../../deploy/config/server.example.toml");
    let config = muster_control::RawServerConfig::from_toml(text)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(config.node_id, 1);
    assert_eq!(config.peers.len(), 3);
    assert_eq!(config.limits.max_depends_on, 1000);
    assert_eq!(config.node_lost_after, std::time::Duration::from_secs(30));
}

#[test]
fn example_agent_config_is_valid() {
    let text = include_str!("../../deploy/config/agent.example.toml");
    let config = muster_agent::RawAgentConfig::from_toml(text)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(config.compute_environment, "cpu");
    assert_eq!(config.reserved_millicpus, 500);
}

#[test]
fn unknown_config_fields_are_refused() {
    let text = "node_id = 1\ngrpc_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:3\"\napi_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\nnode_idd = 2\n";
    let err = muster_control::RawServerConfig::from_toml(text).unwrap_err();
    assert!(err.to_string().contains("node_idd"), "{err}");
}

fn server_config(listeners: &str, peers: &str) -> Result<muster_control::ServerConfig, String> {
    let text = format!("node_id = 1\n{listeners}data_dir = \"d\"\n{peers}");
    muster_control::RawServerConfig::from_toml(&text)
        .map_err(|e| e.to_string())?
        .validate()
        .map_err(|e| e.to_string())
}

#[test]
fn raft_has_a_listener_of_its_own() {
    let apart =
        "grpc_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:3\"\napi_addr = \"127.0.0.1:2\"\n";
    let config = server_config(apart, "").unwrap();
    let this_node = &config.peers[&1];
    assert_eq!(
        (this_node.raft.as_str(), this_node.agents.as_str()),
        ("127.0.0.1:3", "127.0.0.1:1")
    );

    let shared =
        "grpc_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:1\"\napi_addr = \"127.0.0.1:2\"\n";
    let err = server_config(shared, "").unwrap_err();
    assert!(err.starts_with("raft_addr: must differ"), "{err}");

    let missing = "grpc_addr = \"127.0.0.1:1\"\napi_addr = \"127.0.0.1:2\"\n";
    let err = server_config(missing, "").unwrap_err();
    assert!(err.contains("raft_addr"), "{err}");

    let other_raft_addr =
        "[[peers]]\nid = 1\ngrpc_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:4\"\n";
    let err = server_config(apart, other_raft_addr).unwrap_err();
    assert!(
        err.starts_with("peers: this node (1) is listed with other addresses"),
        "{err}"
    );
}

#[test]
fn the_region_and_account_are_checked_and_named_in_errors() {
    let listeners =
        "grpc_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:3\"\napi_addr = \"127.0.0.1:2\"\n";
    let config = server_config(listeners, "").unwrap();
    assert_eq!(
        (config.scope.region.as_str(), config.scope.account.as_str()),
        ("us-east-1", "000000000000")
    );
    let set = |extra: &str| server_config(&format!("{listeners}{extra}"), "");
    let config = set("region = \"eu-central-2\"\naccount_id = \"123456789012\"\n").unwrap();
    assert_eq!(config.scope.region, "eu-central-2");
    assert_eq!(config.scope.account, "123456789012");
    let err = set("region = \"Frankfurt\"\n").unwrap_err();
    assert!(err.starts_with("region: "), "{err}");
    let err = set("account_id = \"42\"\n").unwrap_err();
    assert!(err.starts_with("account_id: "), "{err}");
}
