//! Changing the control nodes of a running cluster, with real `muster server` processes made
//! by `muster cluster init` and `muster cluster new-node`: growing from three to five and
//! back under a load of submits, removing the leader, and replacing a node whose disk is gone.

use crate::harness::{eventually, ok, submit, wait_for_status};
use crate::processes::{
    Proc, agent_config_from_init, muster_admin, muster_bin, wait_for_credentials,
    wait_until_serving,
};
use muster_client::BatchClient;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// A cluster written by `muster cluster init` into `dir`, its servers running as processes.
struct InitCluster {
    temp: tempfile::TempDir,
    dir: PathBuf,
    servers: BTreeMap<u64, Proc>,
    credentials: muster_client::Credentials,
}

impl InitCluster {
    async fn start() -> Self {
        let mut cluster = Self::init();
        for id in 1..=3 {
            cluster.start_server(id);
        }
        cluster.wait_for_root().await;
        cluster
    }

    /// Its files written, nothing started.
    fn init() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("cluster");
        let init = Command::new(muster_bin())
            .args(["cluster", "init", "--dir", dir.to_str().unwrap()])
            .args(["--servers", "3", "--executor", "process"])
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        Self {
            temp,
            dir,
            servers: BTreeMap::new(),
            credentials: muster_client::Credentials {
                access_key_id: String::new(),
                secret_access_key: String::new(),
                region: String::new(),
            },
        }
    }

    /// Until the root user's key is written and every node answers with a quorum behind it.
    async fn wait_for_root(&mut self) {
        self.credentials = wait_for_credentials(&self.dir.join("aws").join("credentials")).await;
        wait_until_serving(&self.client(1)).await;
        eventually("every node answers", async || {
            let out = self.admin(1, &["cluster", "status", "--output", "json"]);
            serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|s| {
                s["quorum"] == true
                    && s["members"]
                        .as_array()
                        .is_some_and(|m| m.iter().all(|m| m["reachable"] == true))
            })
        })
        .await;
    }

    fn start_server(&mut self, id: u64) {
        self.start_server_with_env(id, "", &[]);
    }

    /// Node `id`'s server with `env` set too, logging to `server-{id}{log_suffix}.log`.
    fn start_server_with_env(&mut self, id: u64, log_suffix: &str, env: &[(&str, &str)]) {
        let config = self.dir.join(format!("server-{id}.toml"));
        let log = self.log_path(id, log_suffix);
        let proc =
            Proc::spawn_with_env(&["server", "--config", config.to_str().unwrap()], &log, env);
        self.servers.insert(id, proc);
    }

    fn log_path(&self, id: u64, suffix: &str) -> PathBuf {
        self.temp.path().join(format!("server-{id}{suffix}.log"))
    }

    /// `setting` added to every server's config, before the first table.
    fn configure_servers(&self, setting: &str) {
        for id in 1..=3 {
            let config = self.dir.join(format!("server-{id}.toml"));
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(&config, format!("{setting}\n{text}")).unwrap();
        }
    }

    /// Node `id`'s API, from its config.
    fn endpoint(&self, id: u64) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("server-{id}.toml"))).unwrap();
        let addr = text
            .lines()
            .find_map(|l| l.strip_prefix("api_addr = "))
            .expect("api_addr")
            .trim_matches('"');
        format!("http://{addr}")
    }

    fn client(&self, id: u64) -> BatchClient {
        BatchClient::new(self.endpoint(id), self.credentials.clone())
    }

    /// `muster …` as the administrator, against node `via`'s API.
    fn admin(&self, via: u64, args: &[&str]) -> std::process::Output {
        muster_admin(&self.dir, &self.endpoint(via), args)
    }

    /// `muster cluster status --output json` through node `via`, which must succeed.
    fn status(&self, via: u64) -> Value {
        let out = self.admin(via, &["cluster", "status", "--output", "json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// [`InitCluster::status`] once a leader confirms its quorum: right after leadership moved,
    /// the new leader has not yet heard from a majority and status says there is no quorum.
    async fn settled_status(&self, via: u64) -> Value {
        let mut status = Value::Null;
        eventually("a leader holds a quorum", async || {
            let out = self.admin(via, &["cluster", "status", "--output", "json"]);
            if out.status.success() {
                status = serde_json::from_slice(&out.stdout).unwrap();
            }
            out.status.success()
        })
        .await;
        status
    }

    /// `muster cluster new-node`, the new server started, then `muster cluster add-node`.
    fn add_node(&mut self, id: u64, via: u64) -> Value {
        let made = Command::new(muster_bin())
            .args(["cluster", "new-node", "--dir", self.dir.to_str().unwrap()])
            .args(["--id", &id.to_string()])
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        // It prints the add-node command to run.
        let said = String::from_utf8_lossy(&made.stdout).into_owned();
        let add = said
            .lines()
            .find_map(|l| l.trim().strip_prefix("muster cluster add-node"))
            .map(|rest| format!("cluster add-node{rest}"))
            .unwrap_or_else(|| panic!("new-node said: {said}"))
            .to_owned();
        self.start_server(id);
        let args: Vec<&str> = add.split_whitespace().collect();
        let out = self.admin(via, &args);
        assert!(
            out.status.success(),
            "add-node {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn remove_node(&self, id: u64, via: u64) -> Value {
        let out = self.admin(via, &["cluster", "remove-node", &id.to_string()]);
        assert!(
            out.status.success(),
            "remove-node {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Waits for the founder's `default` queue, then registers the definition `d` (`true`).
async fn default_queue_and_definition(client: &BatchClient) {
    eventually("the founder creates the default queue", async || {
        client
            .call("DescribeJobQueues", json!({"jobQueues": ["default"]}))
            .await
            .is_ok_and(|r| r["jobQueues"].as_array().is_some_and(|q| q.len() == 1))
    })
    .await;
    ok(client
        .call(
            "RegisterJobDefinition",
            json!({"jobDefinitionName": "d", "type": "container", "containerProperties": {
                "image": "busybox", "command": ["true"],
                "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "32"}]}}),
        )
        .await);
}

/// Until the node `client` calls holds every one of `jobs`.
async fn holds_every_job(client: &BatchClient, jobs: &[String]) {
    eventually("the node holds every job", async || {
        let mut held = 0;
        for ids in jobs.chunks(100) {
            if let Ok(found) = client.call("DescribeJobs", json!({ "jobs": ids })).await {
                held += found["jobs"].as_array().map_or(0, Vec::len);
            }
        }
        held == jobs.len()
    })
    .await
}

/// The value of gauge `name` on the node whose API is at `endpoint` (`/metrics`).
async fn metric(endpoint: &str, name: &str) -> Option<f64> {
    let addr = endpoint.trim_start_matches("http://").to_owned();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).ok()?;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .ok()?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
    })
    .await
    .unwrap()
}

fn voters(status: &Value) -> Vec<u64> {
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["voter"] == true)
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

/// The status code of `GET /ready` at `endpoint` (`http://host:port`).
async fn ready(endpoint: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = endpoint.strip_prefix("http://")?;
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// Three nodes become five and then three again, the founder and the leader among those
/// removed, while a client submits all along through a node that stays: every submit the
/// cluster acknowledged is there afterwards and runs to SUCCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_grows_to_five_and_shrinks_to_three_under_load_losing_nothing() {
    let mut cluster = InitCluster::start().await;
    let agent_config = agent_config_from_init(&cluster.dir, "worker", None);
    let _agent = Proc::spawn(
        &["agent", "--config", agent_config.to_str().unwrap()],
        &cluster.temp.path().join("agent.log"),
    );
    let client = cluster.client(2);
    default_queue_and_definition(&client).await;

    // The load: submits one after another through node 2, each acknowledged one recorded.
    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let load = {
        let (client, acknowledged) = (cluster.client(2), acknowledged.clone());
        tokio::spawn(async move {
            // Ten submits a second, steady, whatever each takes.
            let mut pace = tokio::time::interval(std::time::Duration::from_millis(100));
            let mut n = 0;
            while !*stopped.borrow_and_update() {
                n += 1;
                let sent = client
                    .call(
                        "SubmitJob",
                        json!({"jobName": format!("load-{n}"), "jobQueue": "default", "jobDefinition": "d"}),
                    )
                    .await;
                if let Ok(answer) = sent {
                    let id = answer["jobId"].as_str().unwrap().to_owned();
                    acknowledged.lock().unwrap().push(id);
                }
                tokio::select! {
                    _ = stopped.changed() => {}
                    _ = pace.tick() => {}
                }
            }
        })
    };

    // 3 → 5: each new node catches up as a learner, then votes.
    cluster.add_node(4, 1);
    let grown = cluster.add_node(5, 3);
    assert_eq!(grown["voters"], json!([1, 2, 3, 4, 5]), "{grown}");
    let status = cluster.status(4);
    assert_eq!(voters(&status), vec![1, 2, 3, 4, 5], "{status}");
    assert_eq!(status["quorum"], true);
    for member in status["members"].as_array().unwrap() {
        assert_eq!(member["reachable"], true, "{status}");
    }

    // The founder leads, and is removed: it hands leadership over first.
    let moved = cluster.admin(2, &["cluster", "transfer-leader", "--to", "1"]);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert_eq!(cluster.settled_status(5).await["leader"], 1);
    let shrunk = cluster.remove_node(1, 2);
    assert_eq!(shrunk["voters"], json!([2, 3, 4, 5]), "{shrunk}");
    let status = cluster.settled_status(2).await;
    let leader = status["leader"].as_u64().unwrap();
    assert_ne!(leader, 1, "{status}");
    let shrunk = cluster.remove_node(5, 3);
    assert_eq!(shrunk["voters"], json!([2, 3, 4]), "{shrunk}");

    // The load runs on a while against the three, then stops.
    let before = acknowledged.lock().unwrap().len();
    eventually("submits go on after the changes", async || {
        acknowledged.lock().unwrap().len() >= before + 5
    })
    .await;
    stop.send(true).unwrap();
    load.await.unwrap();

    let status = cluster.status(4);
    assert_eq!(voters(&status), vec![2, 3, 4], "{status}");
    assert_eq!(status["quorum"], true, "{status}");
    // The removed nodes no longer count themselves ready.
    for removed in [1, 5] {
        assert_eq!(ready(&cluster.endpoint(removed)).await, Some(503));
    }
    assert_eq!(ready(&cluster.endpoint(4)).await, Some(200));

    let reader = cluster.client(4);
    // Node 4 leads, which the agent's config never named: it follows the membership the
    // leaders told it, and runs what is placed from there.
    let moved = cluster.admin(3, &["cluster", "transfer-leader", "--to", "4"]);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert_eq!(cluster.status(2)["leader"], 4);
    let after = submit(&reader, "default", "d", "after", &["true"]).await;
    wait_for_status(&reader, &after, &["SUCCEEDED"]).await;
    let kept = std::fs::read_to_string(cluster.dir.join("work-worker").join("control_plane.json"))
        .expect("the agent keeps the control plane's addresses");
    let node_4_agents = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 4)
        .map(|m| m["grpc_addr"].as_str().unwrap().to_owned())
        .unwrap();
    assert!(kept.contains(&node_4_agents), "{kept}");

    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 10, "{} submits", acknowledged.len());
    for id in &acknowledged {
        let job = wait_for_status(&reader, id, &["SUCCEEDED"]).await;
        // Placed once, run once: no change of members or leader ran it again.
        assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job}");
    }
}

/// A node whose disk is gone: the operator removes its id and adds a fresh node under a new
/// id. The cluster keeps serving throughout; the new node holds the same jobs, and with it
/// and one other the cluster still has a quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_disk_is_gone_is_replaced_under_a_new_id() {
    let mut cluster = InitCluster::start().await;
    let client = cluster.client(1);
    default_queue_and_definition(&client).await;
    let job = submit(&client, "default", "d", "kept", &["true"]).await;

    // Node 3's machine dies and its disk with it.
    drop(cluster.servers.remove(&3));
    std::fs::remove_dir_all(cluster.dir.join("node-3")).unwrap();
    let status = cluster.status(1);
    let dead = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 3)
        .cloned()
        .unwrap();
    assert_eq!(dead["reachable"], false, "{status}");
    assert_eq!(dead["role"], "unreachable", "{status}");
    assert_eq!(status["quorum"], true, "two of three still make a quorum");

    cluster.remove_node(3, 2);
    let replaced = cluster.add_node(4, 1);
    assert_eq!(replaced["voters"], json!([1, 2, 4]), "{replaced}");

    // With node 1 gone too, 2 and 4 are a quorum, and 4 serves the job submitted before it
    // existed.
    drop(cluster.servers.remove(&1));
    let reader = cluster.client(4);
    let described = wait_for_status(&reader, &job, &["RUNNABLE"]).await;
    assert_eq!(described["jobName"], "kept");
    let status = cluster.status(4);
    assert_eq!(voters(&status), vec![1, 2, 4], "{status}");

    // And with only one of three left, status says there is no quorum, and exits non-zero.
    drop(cluster.servers.remove(&2));
    let mut exit = None;
    eventually("status sees the quorum gone", async || {
        let out = cluster.admin(4, &["cluster", "status"]);
        exit = out.status.code();
        exit == Some(2)
    })
    .await;
    assert_eq!(ready(&cluster.endpoint(4)).await, Some(503));
}

/// `muster cluster snapshot save` from a running cluster, and `restore` founding a new one
/// (new files, new CA, new root key) from it: the same jobs, queues, definitions and users,
/// served by every node of the new cluster. A damaged file, or a data directory in use, is
/// refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_founds_a_new_cluster_holding_the_same_state() {
    let mut old = InitCluster::init();
    // Ended jobs leave memory for the archive at once: the file must carry them too.
    old.configure_servers("ended_jobs_in_memory_secs = 0");
    for id in 1..=3 {
        old.start_server(id);
    }
    old.wait_for_root().await;
    let client = old.client(2);
    default_queue_and_definition(&client).await;
    let agent_config = agent_config_from_init(&old.dir, "worker", None);
    let agent = Proc::spawn(
        &["agent", "--config", agent_config.to_str().unwrap()],
        &old.temp.path().join("agent.log"),
    );
    let ended = submit(&client, "default", "d", "ended", &["true"]).await;
    let array = ok(client
        .call(
            "SubmitJob",
            json!({"jobName": "ended-array", "jobQueue": "default", "jobDefinition": "d",
                   "arrayProperties": {"size": 2}}),
        )
        .await)["jobId"]
        .as_str()
        .unwrap()
        .to_owned();
    for job in [&ended, &array] {
        wait_for_status(&client, job, &["SUCCEEDED"]).await;
    }
    eventually("the four ended jobs are archived on node 3", async || {
        metric(&old.endpoint(3), "muster_jobs_archived").await == Some(4.0)
    })
    .await;
    // Jobs the new cluster holds in memory, waiting: the worker takes no more.
    let drained = old.admin(2, &["node", "drain", "worker"]);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    let mut jobs = Vec::new();
    for n in 0..3 {
        jobs.push(submit(&client, "default", "d", &format!("kept-{n}"), &["true"]).await);
    }
    ok(client
        .call_iam("CreateUser", json!({"UserName": "alice"}))
        .await);

    let file = old.temp.path().join("state.snapshot");
    let saved = old.admin(3, &["cluster", "snapshot", "save", file.to_str().unwrap()]);
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    let header: Value = serde_json::from_slice(&saved.stdout).unwrap();
    assert_eq!(header["jobs"], 3 + 4, "{header}");
    let bytes = std::fs::read(&file).unwrap();
    drop((agent, old));

    let mut new = InitCluster::init();
    let file = new.temp.path().join("state.snapshot");
    std::fs::write(&file, &bytes).unwrap();
    let restore = |file: &std::path::Path| {
        Command::new(muster_bin())
            .args(["cluster", "snapshot", "restore", file.to_str().unwrap()])
            .args(["--config", new.dir.join("server-1.toml").to_str().unwrap()])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    // Cut short: refused, saying so, with nothing written.
    let cut = new.temp.path().join("cut.snapshot");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let refused = restore(&cut);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cut short"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!new.dir.join("node-1").join("raft").exists());

    // Only on the founding node: elsewhere the founder would found an empty cluster beside it.
    let elsewhere = Command::new(muster_bin())
        .args(["cluster", "snapshot", "restore", file.to_str().unwrap()])
        .args(["--config", new.dir.join("server-2.toml").to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!elsewhere.status.success());
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains("restore on that node"),
        "{}",
        String::from_utf8_lossy(&elsewhere.stderr)
    );

    let restored = restore(&file);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let again = restore(&file);
    assert!(!again.status.success(), "a restore overwrote a node's data");

    for id in 1..=3 {
        new.start_server(id);
    }
    new.wait_for_root().await;
    for id in 1..=3 {
        let reader = new.client(id);
        for (n, job) in jobs.iter().enumerate() {
            let described = wait_for_status(&reader, job, &["RUNNABLE"]).await;
            assert_eq!(described["jobName"], format!("kept-{n}"));
        }
    }
    let users = ok(new.client(1).call_iam("ListUsers", json!({})).await);
    assert!(users.to_string().contains("alice"), "{users}");
    // The archived jobs came with the file, and every node holds their records.
    for id in 1..=3 {
        let described = ok(new
            .client(id)
            .call(
                "DescribeJobs",
                json!({"jobs": [&ended, &array, format!("{array}:1")]}),
            )
            .await);
        let jobs = described["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 3, "node {id}: {described}");
        assert!(
            jobs.iter().all(|j| j["status"] == "SUCCEEDED"),
            "node {id}: {described}"
        );
        assert_eq!(
            jobs[1]["arrayProperties"]["statusSummary"]["SUCCEEDED"], 2,
            "node {id}: {described}"
        );
        // The gauge is refreshed on its own cadence, after the install that filled the archive.
        eventually("every node counts the four archived jobs", async || {
            metric(&new.endpoint(id), "muster_jobs_archived").await == Some(4.0)
        })
        .await;
    }
    let status = new.status(2);
    assert_eq!(voters(&status), vec![1, 2, 3], "{status}");
    assert_eq!(status["quorum"], true, "{status}");
}

/// A follower that was down while the leader folded its log into a snapshot (every 10
/// entries here) is sent the snapshot when it returns. Killed at the crash points in its
/// install (FAULTS.md F9: the snapshot received, not yet installed; installed and stored, not
/// yet reported to Raft) and restarted each time from what it left on disk, it ends with
/// every job; sent one again and installing it whole, it restarts after appending more.
/// Each node's log then replays (`muster debug replay-log`) from its snapshot, the log before
/// it being gone, with nothing over-committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_that_dies_installing_a_snapshot_installs_it_when_restarted() {
    use std::os::unix::process::ExitStatusExt;
    let mut cluster = InitCluster::init();
    cluster.configure_servers("snapshot_every_entries = 10");
    for id in 1..=3 {
        cluster.start_server(id);
    }
    cluster.wait_for_root().await;
    let client = cluster.client(1);
    default_queue_and_definition(&client).await;
    let leader = cluster.settled_status(1).await["leader"].as_u64().unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let reader = (1..=3).find(|id| *id != follower).unwrap();
    let client = cluster.client(reader);
    let mut jobs = Vec::new();
    for n in 0..20 {
        jobs.push(submit(&client, "default", "d", &format!("early{n}"), &["true"]).await);
    }
    // The follower holds a snapshot of its own and a log purged up to it: the snapshot the
    // leader sends later covers more of the log than that one.
    let mut own_snapshot = 0;
    eventually("the follower takes a snapshot", async || {
        let out = cluster.admin(reader, &["cluster", "status", "--output", "json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        own_snapshot = status["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["id"] == follower))
            .and_then(|m| m["snapshot_index"].as_u64())
            .unwrap_or(0);
        own_snapshot > 0
    })
    .await;
    drop(cluster.servers.remove(&follower));

    for n in 0..60 {
        jobs.push(submit(&client, "default", "d", &format!("j{n}"), &["true"]).await);
    }

    for point in ["snapshot_install_before", "snapshot_install_after"] {
        let suffix = format!("-{point}");
        cluster.start_server_with_env(
            follower,
            &suffix,
            &[("MUSTER_CRASH_AT", &format!("{point}:1"))],
        );
        let mut server = cluster.servers.remove(&follower).unwrap();
        let status = crate::processes::until_exit(
            &mut server,
            &format!("{point}: node {follower} never crashed there"),
            async || {},
        )
        .await;
        assert_eq!(status.signal(), Some(6), "{point}: exited with {status}");
        let said = std::fs::read_to_string(cluster.log_path(follower, &suffix)).unwrap();
        assert!(said.contains(&format!("crashing at {point}")), "{said}");
    }

    cluster.start_server_with_env(follower, "-restarted", &[]);
    holds_every_job(&cluster.client(follower), &jobs).await;

    // Down once more, long enough to be sent a snapshot again, which it now installs without
    // a crash; it appends what follows, and is then restarted: its log must hold no gap
    // before those entries (a purge the snapshot covered, left undone while it installed,
    // is done before the first append).
    drop(cluster.servers.remove(&follower));
    for n in 0..40 {
        jobs.push(submit(&client, "default", "d", &format!("k{n}"), &["true"]).await);
    }
    cluster.start_server_with_env(follower, "-installs", &[]);
    holds_every_job(&cluster.client(follower), &jobs).await;
    for n in 0..5 {
        jobs.push(submit(&client, "default", "d", &format!("after{n}"), &["true"]).await);
    }
    holds_every_job(&cluster.client(follower), &jobs).await;
    drop(cluster.servers.remove(&follower));
    cluster.start_server_with_env(follower, "-restarted-again", &[]);
    holds_every_job(&cluster.client(follower), &jobs).await;

    // A node added now starts from the leader's snapshot with no log of its own; after it
    // appends what follows, it restarts.
    cluster.add_node(4, reader);
    holds_every_job(&cluster.client(4), &jobs).await;
    for n in 0..5 {
        jobs.push(submit(&client, "default", "d", &format!("new{n}"), &["true"]).await);
    }
    holds_every_job(&cluster.client(4), &jobs).await;
    drop(cluster.servers.remove(&4));
    cluster.start_server_with_env(4, "-restarted", &[]);
    holds_every_job(&cluster.client(4), &jobs).await;
    let installed = cluster.settled_status(follower).await["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == follower))
        .and_then(|m| m["snapshot_index"].as_u64())
        .unwrap();
    assert!(
        installed > own_snapshot + 40,
        "the follower caught up from its log, not from the leader's snapshot ({own_snapshot} then {installed})"
    );

    for (_, server) in std::mem::take(&mut cluster.servers) {
        server.stop();
    }
    let mut from_snapshots = 0;
    for id in 1..=4 {
        let out = Command::new(muster_bin())
            .args(["debug", "replay-log", "--data-dir"])
            .arg(cluster.dir.join(format!("node-{id}")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "node {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let replay: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(replay["violations"], json!([]), "node {id}: {replay}");
        assert!(
            replay["jobs"].as_u64().unwrap() >= 60,
            "node {id}: {replay}"
        );
        from_snapshots += replay["from_snapshot"].is_u64() as usize;
    }
    assert!(
        from_snapshots >= 2,
        "the leader's and the follower's logs were purged"
    );
}
