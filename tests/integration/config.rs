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
    let text = "node_id = 1\ngrpc_addr = \"127.0.0.1:1\"\napi_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\nnode_idd = 2\n";
    let err = muster_control::RawServerConfig::from_toml(text).unwrap_err();
    assert!(err.to_string().contains("node_idd"), "{err}");
}
