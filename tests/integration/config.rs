//! The commented example configs in `deploy/config` parse and validate.

/// The example configs name `/etc/muster/tls`: a CA and certificates made here stand in.
fn with_certificates(text: &str, dir: &std::path::Path) -> String {
    use muster_tls::Role;
    use muster_tls::pki::{ClusterCa, Validity, write_identity};
    let ca = ClusterCa::generate("examples").unwrap();
    let validity = Validity::from_now(std::time::Duration::from_secs(3600));
    write_identity(&ca, dir, "control-1", &Role::Control(1), &[], validity).unwrap();
    write_identity(
        &ca,
        dir,
        "agent-worker-01",
        &Role::Agent("worker-01".into()),
        &[],
        validity,
    )
    .unwrap();
    text.replace("/etc/muster/tls", &dir.display().to_string())
}

#[test]
fn example_server_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let text = with_certificates(
        include_str!("../../deploy/config/server.example.toml"),
        dir.path(),
    );
    let config = muster_control::RawServerConfig::from_toml(&text)
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
    let dir = tempfile::tempdir().unwrap();
    let text = with_certificates(
        include_str!("../../deploy/config/agent.example.toml"),
        dir.path(),
    );
    let config = muster_agent::RawAgentConfig::from_toml(&text)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(config.compute_environment, "cpu");
    assert_eq!(config.reserved_millicpus, 500);
    assert_eq!(
        config.labels.get("topology").map(String::as_str),
        Some("block=b1/rack=rack-12/switch=s3")
    );
    assert_eq!(
        config.labels.get("topology.rack").map(String::as_str),
        Some("rack-12")
    );
}

/// A topology path is `level=name` entries, each level once; anything else names the setting.
#[test]
fn a_topology_path_is_checked_level_by_level() {
    let base = "compute_environment = \"ce\"\nexecutor = \"process\"\ncontrol_plane = [\"127.0.0.1:7101\"]\nwork_dir = \"/tmp/w\"\nplaintext = true\n";
    let parse = |extra: &str| {
        muster_agent::RawAgentConfig::from_toml(&format!("{base}{extra}"))
            .unwrap()
            .validate()
    };
    for bad in [
        "topology = [\"rack\"]\n",
        "topology = [\"rack=r1\", \"rack=r2\"]\n",
        "topology = [\"rack=r/1\"]\n",
    ] {
        let err = parse(bad).unwrap_err();
        assert!(err.to_string().starts_with("topology"), "{bad}: {err}");
    }
    let ok = parse("topology = [\"rack=r1\", \"switch=s2\"]\n").unwrap();
    assert_eq!(ok.labels["topology"], "rack=r1/switch=s2");
    assert_eq!(ok.labels["topology.switch"], "s2");
}

/// `vcpus` and `memory_mib` offer less than the machine has: more is refused, naming the
/// setting; the defaults of an agent and a control node on one host do not collide.
#[test]
fn an_agent_offers_no_more_than_its_machine_and_its_defaults_collide_with_nothing() {
    let base = "compute_environment = \"ce\"\nexecutor = \"process\"\ncontrol_plane = [\"127.0.0.1:7101\"]\nwork_dir = \"/tmp/w\"\nplaintext = true\n";
    let parse = |extra: &str| {
        muster_agent::RawAgentConfig::from_toml(&format!("{base}{extra}"))
            .unwrap()
            .validate()
    };
    let cpus = std::thread::available_parallelism().unwrap().get();
    let err = parse(&format!("vcpus = {}\n", cpus + 1)).unwrap_err();
    assert!(err.to_string().starts_with("vcpus"), "{err}");
    let err = parse("memory_mib = 1000000000\n").unwrap_err();
    assert!(err.to_string().starts_with("memory_mib"), "{err}");
    assert!(parse("vcpus = 0.5\nmemory_mib = 256\n").is_ok());
    let agent = parse("").unwrap();
    let server = muster_control::RawServerConfig::from_toml(include_str!(
        "../../deploy/config/server.example.toml"
    ))
    .unwrap();
    let taken: Vec<u16> = [&server.grpc_addr, &server.raft_addr, &server.api_addr]
        .iter()
        .map(|a| a.rsplit_once(':').unwrap().1.parse().unwrap())
        .collect();
    assert!(
        !taken.contains(&agent.log_listen_addr.port()),
        "the agent's log port {} is a control node's ({taken:?})",
        agent.log_listen_addr.port()
    );
}

#[test]
fn unknown_config_fields_are_refused() {
    let text = "node_id = 1\ngrpc_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:3\"\napi_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\nnode_idd = 2\n";
    let err = muster_control::RawServerConfig::from_toml(text).unwrap_err();
    assert!(err.to_string().contains("node_idd"), "{err}");
}

fn server_config(listeners: &str, peers: &str) -> Result<muster_control::ServerConfig, String> {
    let text = format!("node_id = 1\n{listeners}data_dir = \"d\"\nplaintext = true\n{peers}");
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
        err.starts_with("peers: this node (1) is listed at 127.0.0.1:4 (Raft)"),
        "{err}"
    );

    // Listening on every interface, it is listed under the name the others reach it by (as
    // `muster cluster init --servers host1,host2,host3` writes it).
    let everywhere =
        "grpc_addr = \"0.0.0.0:7101\"\nraft_addr = \"0.0.0.0:7102\"\napi_addr = \"0.0.0.0:7070\"\n";
    let by_name =
        "[[peers]]\nid = 1\ngrpc_addr = \"control1:7101\"\nraft_addr = \"control1:7102\"\n";
    let config = server_config(everywhere, by_name).unwrap();
    assert_eq!(config.peers[&1].raft, "control1:7102");
    let wrong_port =
        "[[peers]]\nid = 1\ngrpc_addr = \"control1:7101\"\nraft_addr = \"control1:7109\"\n";
    assert!(server_config(everywhere, wrong_port).is_err());
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

/// A `[tls]` section that cannot be used stops the node at startup with the setting and the
/// file at fault; so does leaving TLS out without saying `plaintext = true`.
#[test]
fn bad_tls_settings_name_the_setting_and_the_file() {
    use muster_tls::Role;
    use muster_tls::pki::{ClusterCa, Validity, write_identity};
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("t").unwrap();
    let hour = Validity::from_now(std::time::Duration::from_secs(3600));
    let good = write_identity(&ca, dir.path(), "control-1", &Role::Control(1), &[], hour).unwrap();
    let agent = write_identity(
        &ca,
        dir.path(),
        "agent-a",
        &Role::Agent("a".into()),
        &[],
        hour,
    )
    .unwrap();
    let now = std::time::SystemTime::now();
    let expired = Validity {
        not_before: now - std::time::Duration::from_secs(7200),
        not_after: now - std::time::Duration::from_secs(3600),
    };
    let old = write_identity(
        &ca,
        dir.path(),
        "control-old",
        &Role::Control(1),
        &[],
        expired,
    )
    .unwrap();
    let foreign_dir = tempfile::tempdir().unwrap();
    let other_ca = ClusterCa::generate("other").unwrap();
    let foreign = write_identity(
        &other_ca,
        foreign_dir.path(),
        "control-1",
        &Role::Control(1),
        &[],
        hour,
    )
    .unwrap();

    let config = |tls: &str| {
        let text = format!(
            "node_id = 1\ngrpc_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:3\"\napi_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\n{tls}"
        );
        muster_control::RawServerConfig::from_toml(&text)
            .unwrap()
            .validate()
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let section = |files: &muster_tls::TlsFiles| {
        format!(
            "[tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            files.ca_file, files.cert_file, files.key_file
        )
    };
    assert_eq!(config(&section(&good)), Ok(()));

    let err = config("").unwrap_err();
    assert!(
        err.contains("tls") && err.contains("plaintext = true"),
        "{err}"
    );

    let missing = muster_tls::TlsFiles {
        cert_file: dir.path().join("nope.pem"),
        ..good.clone()
    };
    let err = config(&section(&missing)).unwrap_err();
    assert!(
        err.contains("tls.cert_file") && err.contains("nope.pem"),
        "{err}"
    );

    let err = config(&section(&agent)).unwrap_err();
    assert!(
        err.contains("agent a") && err.contains("control node 1"),
        "{err}"
    );

    let err = config(&section(&old)).unwrap_err();
    assert!(
        err.contains("tls.cert_file") && err.to_lowercase().contains("expired"),
        "{err}"
    );

    // A certificate of another cluster's CA.
    let err = config(&section(&muster_tls::TlsFiles {
        ca_file: good.ca_file.clone(),
        ..foreign.clone()
    }))
    .unwrap_err();
    assert!(
        err.contains("tls.cert_file") && err.contains("control-1.pem"),
        "{err}"
    );

    // The right certificate with another holder's key.
    let err = config(&section(&muster_tls::TlsFiles {
        key_file: agent.key_file.clone(),
        ..good.clone()
    }))
    .unwrap_err();
    assert!(
        err.contains("tls.key_file") && err.contains("agent-a.key"),
        "{err}"
    );

    let err = config(&format!("plaintext = true\n{}", section(&good))).unwrap_err();
    assert!(err.contains("plaintext"), "{err}");
}
