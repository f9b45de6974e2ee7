//! Separate `muster server` and `muster agent` processes, as deployed: three control nodes
//! founded once, a job run by an agent process, and a restart of every process from its data
//! directory without a second initialisation.

use crate::harness::{DEADLINE, create_basics, ok, submit, wait_for_status};
use muster_client::BatchClient;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// The `muster` binary built beside this test binary (`cargo build -p muster`, which the
/// test command runs first).
pub(crate) fn muster_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MUSTER_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("muster");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p muster` first (tests/run.sh does)",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) struct Proc(pub(crate) Child);

impl Proc {
    pub(crate) fn spawn(args: &[&str], log: &Path) -> Proc {
        Proc::spawn_with_env(args, log, &[])
    }

    /// With `env` set too, and no core file if it aborts (as at a crash point).
    pub(crate) fn spawn_with_env(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Proc {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new("sh")
            .args(["-c", "ulimit -c 0; exec \"$0\" \"$@\""])
            .arg(muster_bin())
            .args(args)
            .env("MUSTER_LOG", "warn,muster=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("muster starts");
        Proc(child)
    }

    /// SIGTERM and wait: the clean shutdown path.
    pub(crate) fn stop(mut self) {
        // SAFETY: signalling a child process we own; no memory is involved.
        unsafe { libc_kill(self.0.id() as i32, 15) };
        let status = self.0.wait().unwrap();
        assert!(status.success(), "muster exited with {status}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub(crate) async fn wait_for_credentials(path: &Path) -> muster_client::Credentials {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if let Some(c) = muster_control::bootstrap::read_credentials(path) {
            return muster_client::Credentials {
                access_key_id: c.access_key_id,
                secret_access_key: c.secret_access_key,
                region: "us-east-1".into(),
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{} was never written", path.display());
}

/// `muster iam` as an administrator uses it: finds the cluster and its key the way the aws CLI
/// does.
fn muster_iam(aws_dir: &Path, api_port: u16, args: &[&str]) -> std::process::Output {
    Command::new(muster_bin())
        .arg("iam")
        .args(args)
        .env(
            "AWS_ENDPOINT_URL_BATCH",
            format!("http://127.0.0.1:{api_port}"),
        )
        .env("AWS_SHARED_CREDENTIALS_FILE", aws_dir.join("credentials"))
        .env("AWS_CONFIG_FILE", aws_dir.join("config"))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("muster iam runs")
}

async fn iam_cli_creates_a_user_whose_policy_is_enforced(aws_dir: &Path, api_port: u16) {
    // The root key may need a moment to be committed after the file appears.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = muster_iam(aws_dir, api_port, &["create-user", "--user-name", "alice"]);
        if out.status.success() {
            let user: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(user["User"]["UserName"], "alice");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "create-user kept failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let out = muster_iam(
        aws_dir,
        api_port,
        &["create-access-key", "--user-name", "alice"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(key["AccessKey"]["Status"], "Active");
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"batch:Describe*","Resource":"*"}]}"#;
    let out = muster_iam(
        aws_dir,
        api_port,
        &[
            "put-user-policy",
            "--user-name",
            "alice",
            "--policy-name",
            "read",
            "--policy-document",
            policy,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = muster_iam(
        aws_dir,
        api_port,
        &["list-access-keys", "--user-name", "alice"],
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(
        listed["AccessKeyMetadata"][0]
            .get("SecretAccessKey")
            .is_none(),
        "secrets are shown only once"
    );

    let alice = BatchClient::new(
        format!("http://127.0.0.1:{api_port}"),
        muster_client::Credentials {
            access_key_id: key["AccessKey"]["AccessKeyId"].as_str().unwrap().into(),
            secret_access_key: key["AccessKey"]["SecretAccessKey"].as_str().unwrap().into(),
            region: "us-east-1".into(),
        },
    );
    ok(alice.call("DescribeJobQueues", json!({})).await);
    let denied = alice
        .call(
            "CreateComputeEnvironment",
            json!({"computeEnvironmentName": "x", "type": "UNMANAGED"}),
        )
        .await;
    assert_eq!(denied.unwrap_err().code(), Some("AccessDeniedException"));
    // Errors read like the aws CLI's, with its exit code.
    let out = muster_iam(aws_dir, api_port, &["delete-user", "--user-name", "nobody"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("An error occurred (ClientException) when calling the DeleteUser operation")
    );
}

/// Polls `done` every 100 ms for up to 30 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub(crate) async fn wait_until_serving(client: &BatchClient) {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if client.call("DescribeJobQueues", json!({})).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{} never answered", client.endpoint());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_server_processes_and_an_agent_process() {
    let dir = tempfile::tempdir().unwrap();
    let grpc: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let raft: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let api: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers: String = (0..3)
        .map(|i| {
            format!(
                "[[peers]]\nid = {}\ngrpc_addr = \"127.0.0.1:{}\"\nraft_addr = \"127.0.0.1:{}\"\n",
                i + 1,
                grpc[i],
                raft[i]
            )
        })
        .collect();
    let mut configs = Vec::new();
    for i in 0..3 {
        let path = dir.path().join(format!("server-{}.toml", i + 1));
        let data = dir.path().join(format!("data-{}", i + 1));
        std::fs::write(
            &path,
            format!(
                "node_id = {}\ngrpc_addr = \"127.0.0.1:{}\"\nraft_addr = \"127.0.0.1:{}\"\napi_addr = \"127.0.0.1:{}\"\ndata_dir = {:?}\nplaintext = true\n{peers}",
                i + 1,
                grpc[i],
                raft[i],
                api[i],
                data
            ),
        )
        .unwrap();
        configs.push(path);
    }
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "node_id = \"proc-agent\"\ncompute_environment = \"ce\"\ncontrol_plane = [{}]\nexecutor = \"process\"\nwork_dir = {:?}\nvcpus = 2\nmemory_mib = 2048\nstop_after_secs = 4\nstop_grace_secs = 1\nplaintext = true\n",
            grpc.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect::<Vec<_>>().join(", "),
            dir.path().join("agent")
        ),
    )
    .unwrap();
    let start_servers = |round: u32| -> Vec<Proc> {
        configs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let log = dir.path().join(format!("server-{}-{round}.log", i + 1));
                Proc::spawn(&["server", "--config", c.to_str().unwrap()], &log)
            })
            .collect()
    };

    let servers = start_servers(1);
    // The founder (node 1) makes the root user and writes its key under its data dir.
    let aws_dir = dir.path().join("data-1").join("aws");
    let credentials = wait_for_credentials(&aws_dir.join("credentials")).await;
    let client = BatchClient::new(format!("http://127.0.0.1:{}", api[1]), credentials.clone());
    wait_until_serving(&client).await;
    iam_cli_creates_a_user_whose_policy_is_enforced(&aws_dir, api[0]).await;
    create_basics(&client, "ce", "q", "d").await;
    let agent = Proc::spawn(
        &["agent", "--config", agent_config.to_str().unwrap()],
        &dir.path().join("agent.log"),
    );
    let job = submit(&client, "q", "d", "in-a-process", &["sh", "-c", "exit 0"]).await;
    wait_for_status(&client, &job, &["SUCCEEDED"]).await;
    agent.stop();
    let work_dir = dir.path().join("agent");
    let warden_pid = muster_agent::warden::warden_pid_path(&work_dir);
    wait_until("the warden of a cleanly stopped agent exits", || {
        !warden_pid.exists()
    })
    .await;

    // An agent killed under a running attempt: the attempt must not outlive the agent's
    // lease (4 s), for the leader retries it elsewhere once it marks the agent lost.
    let agent = Proc::spawn(
        &["agent", "--config", agent_config.to_str().unwrap()],
        &dir.path().join("agent-2.log"),
    );
    let pid_file = dir.path().join("orphan.pid");
    let long = submit(
        &client,
        "q",
        "d",
        "outlives-its-agent",
        &[
            "sh",
            "-c",
            &format!("echo $$ > {}; exec sleep 120", pid_file.display()),
        ],
    )
    .await;
    wait_for_status(&client, &long, &["RUNNING"]).await;
    wait_until("the job wrote its pid", || pid_file.exists()).await;
    let job_pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(muster_agent::warden::warden_running(&work_dir));
    drop(agent); // SIGKILL: nothing of the agent stops the job
    let killed_at = std::time::Instant::now();
    wait_until("the warden stops the orphaned attempt", || {
        // SAFETY: signal 0 only checks that the process exists.
        (unsafe { libc_kill(job_pid, 0) }) != 0
    })
    .await;
    let lasted = killed_at.elapsed();
    assert!(
        lasted < std::time::Duration::from_secs(4 + 1 + 3),
        "the orphan ran {lasted:?} past its agent's death"
    );
    wait_until("the warden exits once nothing of its agent runs", || {
        !warden_pid.exists()
    })
    .await;
    for s in servers {
        s.stop();
    }

    // Restarted from their data directories: the same state, no second founding.
    let servers = start_servers(2);
    let other = BatchClient::new(format!("http://127.0.0.1:{}", api[2]), credentials);
    wait_until_serving(&other).await;
    let queues = ok(other.call("DescribeJobQueues", json!({})).await);
    // The test's queue and the founder's `default` (found_with_defaults is on unless turned
    // off), each once.
    let mut names: Vec<&str> = queues["jobQueues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["jobQueueName"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["default", "q"], "{queues}");
    let described = ok(other.call("DescribeJobs", json!({ "jobs": [job] })).await);
    assert_eq!(described["jobs"][0]["status"], "SUCCEEDED");
    for i in 1..=3 {
        let log = std::fs::read_to_string(dir.path().join(format!("server-{i}-2.log"))).unwrap();
        assert!(
            !log.contains("cluster initialisation refused"),
            "node {i} tried to found the cluster again: {log}"
        );
    }
    for s in servers {
        s.stop();
    }
}

/// SIGTERM that arrives while a server is still starting (its ports are bound, its storage and
/// Raft are not yet up) is kept and honoured once the start is done: a clean exit, not death by
/// the default disposition with half-opened storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_while_it_starts_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, raft, api) = (free_port(), free_port(), free_port());
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 1\ngrpc_addr = \"127.0.0.1:{grpc}\"\nraft_addr = \"127.0.0.1:{raft}\"\napi_addr = \"127.0.0.1:{api}\"\ndata_dir = {:?}\nplaintext = true\n[[peers]]\nid = 1\ngrpc_addr = \"127.0.0.1:{grpc}\"\nraft_addr = \"127.0.0.1:{raft}\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let server = Proc::spawn(
        &["server", "--config", config.to_str().unwrap()],
        &dir.path().join("server.log"),
    );
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", api)).is_err() {
        assert!(Instant::now() < deadline, "the API port was never bound");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    server.stop();
}

/// Runs `step` again and again until `server` exits, for at most [`DEADLINE`]; its exit
/// status. Passes are at least 20 ms apart, so that a refused call is no busy loop.
pub(crate) async fn until_exit(
    server: &mut Proc,
    what: &str,
    mut step: impl AsyncFnMut(),
) -> std::process::ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}");
        let pass = Instant::now();
        step().await;
        if let Some(left) = std::time::Duration::from_millis(20).checked_sub(pass.elapsed()) {
            tokio::time::sleep(left).await;
        }
    }
}

/// The config of a one-node plaintext cluster keeping its data in `data`, written into `dir`;
/// with the port its API listens on.
fn single_node_config(dir: &Path, data: &Path) -> (PathBuf, u16) {
    let (grpc, raft, api) = (free_port(), free_port(), free_port());
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 1\ngrpc_addr = \"127.0.0.1:{grpc}\"\nraft_addr = \"127.0.0.1:{raft}\"\napi_addr = \"127.0.0.1:{api}\"\ndata_dir = {data:?}\nplaintext = true\n[[peers]]\nid = 1\ngrpc_addr = \"127.0.0.1:{grpc}\"\nraft_addr = \"127.0.0.1:{raft}\"\n"
        ),
    )
    .unwrap();
    (config, api)
}

/// A control node whose disk fills up: its Raft stops on the failed write, and the process
/// exits non-zero (for its supervisor to restart it) rather than staying up without a Raft;
/// restarted once there is room again, it serves what it had committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_disk_fills_exits_and_restarts_whole() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        eprintln!("skipped: mounting a small filesystem for the data directory needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=128m", "tmpfs"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs at {}", data.display());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(data.clone());

    let (config, api) = single_node_config(dir.path(), &data);
    let start = |round: u32| {
        Proc::spawn(
            &["server", "--config", config.to_str().unwrap()],
            &dir.path().join(format!("server-{round}.log")),
        )
    };
    let mut server = start(1);
    let credentials = wait_for_credentials(&data.join("aws").join("credentials")).await;
    let client = BatchClient::new(format!("http://127.0.0.1:{api}"), credentials);
    wait_until_serving(&client).await;
    create_basics(&client, "ce", "q", "d").await;
    let kept = submit(&client, "q", "d", "before-the-disk-filled", &["true"]).await;

    // Fill the disk, then write until the node gives up.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while file.write_all(&chunk).and_then(|()| file.flush()).is_ok() {}
    }
    let status = until_exit(
        &mut server,
        "the server kept running on a full disk",
        async || {
            let _ = client
                .call(
                    "SubmitJob",
                    json!({"jobName": "x".repeat(100), "jobQueue": "q", "jobDefinition": "d",
                       "containerOverrides": {"command": ["echo", "y".repeat(20_000)]}}),
                )
                .await;
        },
    )
    .await;
    assert!(!status.success(), "exited with {status}");
    let log = std::fs::read_to_string(dir.path().join("server-1.log")).unwrap();
    assert!(log.contains("Raft stopped"), "{log}");

    // Room again: restarted, it has what it committed.
    std::fs::remove_file(&filler).unwrap();
    let server2 = start(2);
    wait_until_serving(&client).await;
    let described = ok(client.call("DescribeJobs", json!({ "jobs": [kept] })).await);
    assert_eq!(described["jobs"][0]["jobName"], "before-the-disk-filled");
    drop(server);
    server2.stop();
}

/// A control node that dies at each of its crash points in turn (FAULTS.md F9: between
/// writing its log and flushing it, between flushing and acknowledging, before and after
/// applying), each time under a stream of submits and restarted from what it left on disk,
/// keeps every job it acknowledged, and each restart finds a store it can open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_at_each_crash_point_keeps_what_it_acknowledged() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (config, api) = single_node_config(dir.path(), &data);
    let log_of = |round: &str| dir.path().join(format!("server-{round}.log"));
    let start = |round: &str, env: &[(&str, &str)]| {
        Proc::spawn_with_env(
            &["server", "--config", config.to_str().unwrap()],
            &log_of(round),
            env,
        )
    };
    let server = start("founding", &[]);
    let credentials = wait_for_credentials(&data.join("aws").join("credentials")).await;
    let client = BatchClient::new(format!("http://127.0.0.1:{api}"), credentials);
    wait_until_serving(&client).await;
    create_basics(&client, "ce", "q", "d").await;
    drop(server);

    let mut acknowledged = Vec::new();
    // A single node never receives a snapshot: those points are
    // `membership::a_follower_that_dies_installing_a_snapshot_installs_it_when_restarted`'s.
    let points = muster_crashpoint::POINTS
        .iter()
        .map(|(point, _)| *point)
        .filter(|point| !point.starts_with("agent_") && !point.starts_with("snapshot_install"));
    for point in points {
        // Well past the writes of the node's own start: it dies amid the submits.
        let armed = format!("{point}:12");
        let before = acknowledged.len();
        let mut server = start(point, &[("MUSTER_CRASH_AT", &armed)]);
        let never_crashed = format!("{armed}: the server never crashed");
        let status = until_exit(&mut server, &never_crashed, async || {
            let name = format!("before-{point}-{}", acknowledged.len());
            if let Ok(answer) = client
                .call(
                    "SubmitJob",
                    json!({"jobName": name, "jobQueue": "q", "jobDefinition": "d"}),
                )
                .await
            {
                acknowledged.push(answer["jobId"].as_str().unwrap().to_owned());
            }
        })
        .await;
        assert_eq!(status.signal(), Some(6), "{armed}: exited with {status}");
        assert!(
            acknowledged.len() >= before + 5,
            "{armed}: it died before it acknowledged a stream of submits"
        );
        let said = std::fs::read_to_string(log_of(point)).unwrap();
        assert!(said.contains(&format!("crashing at {point}")), "{said}");

        // Restarted unarmed from what it left: every acknowledged job is there.
        let restarted = start(&format!("{point}-restarted"), &[]);
        wait_until_serving(&client).await;
        for ids in acknowledged.chunks(100) {
            let found = ok(client.call("DescribeJobs", json!({ "jobs": ids })).await);
            assert_eq!(
                found["jobs"].as_array().unwrap().len(),
                ids.len(),
                "after {armed}: acknowledged jobs lost"
            );
        }
        drop(restarted);
    }
    assert!(!acknowledged.is_empty());
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// `muster` run as an administrator runs it against the cluster `muster cluster init` wrote
/// into `dir`: the endpoint and the root user's key from `dir/aws`.
pub(crate) fn muster_admin(dir: &Path, endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(muster_bin())
        .args(args)
        .env("AWS_ENDPOINT_URL_BATCH", endpoint)
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("aws").join("credentials"),
        )
        .env("AWS_CONFIG_FILE", dir.join("aws").join("config"))
        .env("RUST_BACKTRACE", "0")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("muster runs")
}

/// Runs `muster agent --config config`, which must exit non-zero; what it said.
fn agent_refused(config: &Path) -> String {
    let out = Command::new(muster_bin())
        .args(["agent", "--config", config.to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the agent started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An agent config from `agent.toml` as `muster cluster init` wrote it, with this agent's
/// name, work directory, log port and, where given, another token.
pub(crate) fn agent_config_from_init(dir: &Path, name: &str, token: Option<&str>) -> PathBuf {
    let mut text = std::fs::read_to_string(dir.join("agent.toml")).unwrap();
    if let Some(token) = token {
        let start = text.find("join_token = ").unwrap();
        let end = start + text[start..].find('\n').unwrap();
        text.replace_range(start..end, &format!("join_token = {token:?}"));
    }
    let work_dir = dir.join(format!("work-{name}"));
    let start = text.find("work_dir = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    text.replace_range(start..end, &format!("work_dir = {work_dir:?}"));
    // A port of its own for its logs: the default one is taken by whichever agent of the
    // tests running beside this one started first.
    text.push_str(&format!(
        "node_id = {name:?}\nvcpus = 2\nmemory_mib = 2048\nheartbeat_secs = 1\nlog_listen_addr = \"127.0.0.1:{}\"\n",
        free_port()
    ));
    let path = dir.join(format!("agent-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// What a newcomer does: `muster cluster init`, three `muster server` processes and an agent
/// from the files it wrote, a job through the API. Every internal port runs mutual TLS; the
/// agent joins with the token alone; a wrong or revoked token gets no certificate, and a
/// revoked agent is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_from_cluster_init_admits_only_what_holds_its_keys() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("cluster");
    let init = || {
        Command::new(muster_bin())
            .args(["cluster", "init", "--dir", dir.to_str().unwrap()])
            .args(["--servers", "3", "--executor", "process"])
            .output()
            .unwrap()
    };
    let first = init();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let again = init();
    assert!(!again.status.success(), "init overwrote a cluster's files");

    let _servers: Vec<Proc> = (1..=3)
        .map(|i| {
            let config = dir.join(format!("server-{i}.toml"));
            Proc::spawn(
                &["server", "--config", config.to_str().unwrap()],
                &temp.path().join(format!("server-{i}.log")),
            )
        })
        .collect();
    let aws_config = std::fs::read_to_string(dir.join("aws").join("config")).unwrap();
    let endpoint = aws_config
        .lines()
        .find_map(|l| l.strip_prefix("endpoint_url = "))
        .expect("the AWS config names the endpoint")
        .to_owned();
    let credentials = wait_for_credentials(&dir.join("aws").join("credentials")).await;
    let client = BatchClient::new(endpoint.clone(), credentials);
    wait_until_serving(&client).await;
    crate::harness::eventually("the founder creates the default queue", async || {
        client
            .call("DescribeJobQueues", json!({"jobQueues": ["default"]}))
            .await
            .is_ok_and(|r| r["jobQueues"].as_array().is_some_and(|q| q.len() == 1))
    })
    .await;

    // The agent joins with the token of agent.toml, keeps its certificate, and runs a job.
    let joined = agent_config_from_init(&dir, "joined", None);
    let agent = Proc::spawn(
        &["agent", "--config", joined.to_str().unwrap()],
        &temp.path().join("agent-joined.log"),
    );
    client
        .call(
            "RegisterJobDefinition",
            json!({"jobDefinitionName": "d", "type": "container", "containerProperties": {
                "image": "busybox", "command": ["sh", "-c", "exit 0"],
                "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "64"}]}}),
        )
        .await
        .unwrap();
    let job = submit(&client, "default", "d", "over-tls", &["sh", "-c", "exit 0"]).await;
    wait_for_status(&client, &job, &["SUCCEEDED"]).await;
    assert!(
        dir.join("work-joined")
            .join("tls")
            .join("agent.pem")
            .exists()
    );

    // A wrong token: the agent exits non-zero, saying so.
    let wrong = agent_config_from_init(&dir, "intruder", Some("abcdefgh.0123456789abcdef"));
    let stderr = agent_refused(&wrong);
    assert!(stderr.contains("join token is wrong"), "{stderr}");
    assert!(
        !dir.join("work-intruder")
            .join("tls")
            .join("agent.pem")
            .exists()
    );

    // The right token cannot take the name of an agent that is alive.
    let twin = agent_config_from_init(&dir, "joined-twin", None);
    let text = std::fs::read_to_string(&twin)
        .unwrap()
        .replace("node_id = \"joined-twin\"", "node_id = \"joined\"");
    std::fs::write(&twin, text).unwrap();
    let stderr = agent_refused(&twin);
    assert!(stderr.contains("registered and alive"), "{stderr}");

    // A token made, then revoked: refused, saying why.
    let made = muster_admin(
        &dir,
        &endpoint,
        &["cluster", "token", "create", "--ttl-hours", "1"],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made: Value = serde_json::from_slice(&made.stdout).unwrap();
    let token = made["token"].as_str().unwrap().to_owned();
    let id = made["joinToken"]["id"].as_str().unwrap().to_owned();
    let revoked = muster_admin(&dir, &endpoint, &["cluster", "token", "revoke", &id]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let late = agent_config_from_init(&dir, "late", Some(&token));
    let stderr = agent_refused(&late);
    assert!(stderr.contains("was revoked"), "{stderr}");
    let listed = muster_admin(&dir, &endpoint, &["cluster", "token", "list"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let entry = listed["joinTokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .cloned()
        .expect("the revoked token is listed");
    assert_eq!(entry["revoked"], true);
    assert!(
        !listed
            .to_string()
            .contains(token.split('.').nth(1).unwrap()),
        "a secret was listed"
    );

    // No token's secret reaches a log.
    let init_token = std::fs::read_to_string(dir.join("agent.toml")).unwrap();
    let init_secret = init_token
        .lines()
        .find_map(|l| l.strip_prefix("join_token = "))
        .and_then(|t| t.trim_matches('"').split('.').nth(1).map(str::to_owned))
        .unwrap();
    for entry in std::fs::read_dir(temp.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap();
            for secret in [init_secret.as_str(), token.split('.').nth(1).unwrap()] {
                assert!(
                    !text.contains(secret),
                    "{} holds a token's secret",
                    path.display()
                );
            }
        }
    }

    // The joined agent, revoked by name, is refused from then on.
    let cut = muster_admin(&dir, &endpoint, &["cluster", "node", "revoke", "joined"]);
    assert!(
        cut.status.success(),
        "{}",
        String::from_utf8_lossy(&cut.stderr)
    );
    let log = temp.path().join("agent-joined.log");
    wait_until("the revoked agent is refused", || {
        std::fs::read_to_string(&log)
            .is_ok_and(|text| text.contains("the control plane refuses this agent"))
    })
    .await;
    agent.stop();
}
