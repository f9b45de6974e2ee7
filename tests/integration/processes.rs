//! Separate `muster server` and `muster agent` processes, as deployed: three control nodes
//! founded once, a job run by an agent process, and a restart of every process from its data
//! directory without a second initialisation.

use crate::harness::{DEADLINE, create_basics, ok, submit, wait_for_status};
use muster_client::BatchClient;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// The `muster` binary built beside this test binary (`cargo build -p muster`, which the
/// test command runs first).
fn muster_bin() -> PathBuf {
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

struct Proc(Child);

impl Proc {
    fn spawn(args: &[&str], log: &Path) -> Proc {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(muster_bin())
            .args(args)
            .env("MUSTER_LOG", "warn,muster=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("muster starts");
        Proc(child)
    }

    /// SIGTERM and wait: the clean shutdown path.
    fn stop(mut self) {
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

async fn wait_until_serving(client: &BatchClient) {
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
    let api: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers: String = (0..3)
        .map(|i| {
            format!(
                "[[peers]]\nid = {}\ngrpc_addr = \"127.0.0.1:{}\"\n",
                i + 1,
                grpc[i]
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
                "node_id = {}\ngrpc_addr = \"127.0.0.1:{}\"\napi_addr = \"127.0.0.1:{}\"\ndata_dir = {:?}\n{peers}",
                i + 1,
                grpc[i],
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
            "node_id = \"proc-agent\"\ncompute_environment = \"ce\"\ncontrol_plane = [{}]\nexecutor = \"process\"\nwork_dir = {:?}\nvcpus = 2\nmemory_mib = 2048\n",
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
    let client = BatchClient::new(format!("http://127.0.0.1:{}", api[1]));
    wait_until_serving(&client).await;
    create_basics(&client, "ce", "q", "d").await;
    let agent = Proc::spawn(
        &["agent", "--config", agent_config.to_str().unwrap()],
        &dir.path().join("agent.log"),
    );
    let job = submit(&client, "q", "d", "in-a-process", &["sh", "-c", "exit 0"]).await;
    wait_for_status(&client, &job, &["SUCCEEDED"]).await;
    agent.stop();
    for s in servers {
        s.stop();
    }

    // Restarted from their data directories: the same state, no second founding.
    let servers = start_servers(2);
    let other = BatchClient::new(format!("http://127.0.0.1:{}", api[2]));
    wait_until_serving(&other).await;
    let queues = ok(other.call("DescribeJobQueues", json!({})).await);
    assert_eq!(queues["jobQueues"].as_array().unwrap().len(), 1, "{queues}");
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
