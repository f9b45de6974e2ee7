"""Real `muster server` and `muster agent` processes, each in a namespace of its own, started,
killed, paused and restarted by PID."""

import configparser
import os
import tomllib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import boto3
from botocore.config import Config

from . import lazyfs
from .engine import Engine

GRPC, RAFT, API, LOGS = 7101, 7102, 7070, 7103
# Snapshots far more often than production's 100,000 entries, so that within a run the log is
# folded and dropped again and again, a node back from a long fault or newly added is sent a
# snapshot, and a crash point can catch a node installing one.
SNAPSHOT_EVERY_ENTRIES = 50
# Each control node's data directory is a tmpfs of this size (the disk a fault fills).
DATA_DISK_MIB = 512
# Debian's faketime package (tests/run.sh installs it).
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"


class Proc:
    def __init__(self, name, argv, log_path):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.popen = None
        self.paused = False
        # Whether the harness wants it running: one that exits on its own is restarted, as
        # systemd's Restart=on-failure would (deploy/systemd).
        self.wanted = False
        self.restarts = 0
        self.extra_env = {}
        # Environment for the next start only (a crash point armed once).
        self.next_start_env = {}
        # Exits at crash points the harness armed (restarts it caused, not counted above).
        self.crashed_at_points = 0
        # Held by start, kill and the supervisor's restart: the supervisor must never restart
        # a process that a fault is killing or has just started.
        self.lock = threading.RLock()

    def start(self):
        with self.lock:
            log = open(self.log_path, "ab")
            # MUSTER_CHAOS_LOG: other directives for a post-mortem (e.g. the scheduler's debug).
            log_filter = os.environ.get("MUSTER_CHAOS_LOG", "warn,muster=info,muster_raft=info")
            env = {**os.environ, "MUSTER_LOG": log_filter,
                   **self.extra_env, **self.next_start_env}
            self.next_start_env = {}
            self.popen = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
            log.close()
            self.wanted = True

    @property
    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig):
        if self.alive:
            os.kill(self.popen.pid, sig)

    def kill(self):
        with self.lock:
            self.wanted = False
            if self.alive:
                self.signal(signal.SIGCONT)
                self.popen.kill()
                self.popen.wait(timeout=30)
            self.paused = False

    def restart_if_exited(self):
        """The supervisor's part: a wanted process that exited on its own starts again."""
        with self.lock:
            if self.wanted and self.popen is not None and self.popen.poll() is not None:
                self.restarts += 1
                self.start()
                return True
        return False

    def pause(self):
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        self.signal(signal.SIGCONT)
        self.paused = False


class Cluster:
    """`servers` control nodes and `agents` process-executor agents on `net`."""

    def __init__(self, binary, workdir, net, servers=3, agents=2, node_lost_after=8,
                 agent_stop_after=4, spares=1, lazy_disks=False, docker_agents=0):
        # What a failed setup must undo: nothing of it may outlive the run.
        self.procs, self.mounts, self.lazyfs_procs, self.engine = {}, [], {}, None
        self.stopped = threading.Event()
        try:
            self._set_up(binary, workdir, net, servers, agents, node_lost_after, agent_stop_after,
                         spares, lazy_disks, docker_agents)
        except BaseException:
            self.stop()
            self.unmount()
            raise

    def _set_up(self, binary, workdir, net, servers, agents, node_lost_after, agent_stop_after,
                spares, lazy_disks, docker_agents):
        self.binary, self.workdir, self.net = binary, workdir, net
        self.node_lost_after = node_lost_after
        # The hosts whose control nodes are members now (a membership change swaps one for a
        # spare), and the Raft id each one runs under: an id is never used twice.
        self.server_names = [f"s{i}" for i in range(1, servers + 1)]
        self.spare_names = [f"s{i}" for i in range(servers + 1, servers + spares + 1)]
        self.node_ids = {name: i for i, name in enumerate(self.server_names, 1)}
        self.next_id = servers + 1
        self.agent_names = [f"a{i}" for i in range(1, agents + 1)]
        for name in self.server_names + self.spare_names + self.agent_names:
            net.add_host(name)
        self.procs = {}
        # The cluster's CA, node certificates and agents' join token, as an operator makes
        # them: every internal port runs mutual TLS, as in production.
        self.pki = pki = os.path.join(workdir, "pki")
        subprocess.run([binary, "cluster", "init", "--dir", pki, "--executor", "process",
                        "--servers", ",".join(net.ip(n) for n in self.server_names)],
                       check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(pki, "server-1.toml"), "rb") as f:
            founding = tomllib.load(f)["founding_join_token"]
        with open(os.path.join(pki, "agent.toml"), "rb") as f:
            joining = tomllib.load(f)
        self.founding_table = (f'[founding_join_token]\nid = "{founding["id"]}"\n'
                               f'secret_sha256 = "{founding["secret_sha256"]}"\n'
                               f'expires_at_unix = {founding["expires_at_unix"]}\n')
        # With lazy disks, each node's data directory is a lazyfs (muster_chaos/lazyfs.py) over
        # its disk, which forgets what was not fsynced when the node loses power (F10).
        self.lazy_disks = lazy_disks
        for name in self.server_names + self.spare_names:
            # Each control node's data on a small filesystem of its own, so that a fault can
            # fill one node's disk and no other's.
            disk = self.disk_dir(name)
            os.makedirs(disk)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DATA_DISK_MIB}m", "tmpfs", disk], check=True)
            self.mounts.append(disk)
            if lazy_disks:
                self._mount_lazyfs(name)
        # Each control node's wall clock can be stepped (libfaketime, reading an offset from a
        # file of its own once a second; the monotonic clock, which Raft's timers use, is left
        # alone).
        self.clock_files = {}
        if os.path.exists(LIBFAKETIME):
            for name in self.server_names + self.spare_names:
                clock = os.path.join(workdir, f"{name}.clock")
                with open(clock, "w") as f:
                    f.write("+0\n")
                self.clock_files[name] = clock
        for name in self.server_names:
            self._server(name, founder=self.node_ids[name] == 1)
        control = ", ".join(f'"{net.ip(n)}:{GRPC}"' for n in self.server_names)
        # The last `docker_agents` agents run jobs as containers, on an engine of the harness's
        # own (restarted by `docker_restart`); each job mounts the run's directory to note its
        # runs there.
        self.docker_agent_names = self.agent_names[len(self.agent_names) - docker_agents:] if docker_agents else []
        self.engine = Engine(workdir, net.prefix.split(".")[1]) if docker_agents else None
        for name in self.agent_names:
            config = os.path.join(workdir, f"{name}.toml")
            docker = name in self.docker_agent_names
            executor = f'executor = "docker"\nallowed_host_paths = ["{workdir}"]\n' if docker else 'executor = "process"\n'
            with open(config, "w") as f:
                f.write(f'node_id = "{name}"\ncompute_environment = "chaos"\ncontrol_plane = [{control}]\n'
                        f'{executor}work_dir = "{workdir}/{name}-work"\nvcpus = 2\n'
                        f'memory_mib = 1024\nheartbeat_secs = 1\nstop_grace_secs = 2\n'
                        f'stop_after_secs = {agent_stop_after}\nlog_listen_addr = "{net.ip(name)}:{LOGS}"\n'
                        f'join_token = "{joining["join_token"]}"\n'
                        f'ca_fingerprint = "{joining["ca_fingerprint"]}"\n')
            self._proc(name, ["agent", "--config", config])
            if docker:
                self.procs[name].extra_env = {"DOCKER_HOST": self.engine.host}
        self.credentials = None
        self.client_lock = threading.Lock()

    def _proc(self, name, args):
        argv = ["ip", "netns", "exec", self.net.ns(name), self.binary, *args]
        before = self.procs.get(name)
        self.procs[name] = Proc(name, argv, os.path.join(self.workdir, f"{name}.log"))
        if before is not None:
            # A host's new node (a membership change) keeps the host's counts.
            self.procs[name].restarts = before.restarts
            self.procs[name].crashed_at_points = before.crashed_at_points
        self._fake_clock(name)

    def _fake_clock(self, name):
        clock = self.clock_files.get(name)
        if clock:
            self.procs[name].extra_env = {
                "LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": clock,
                "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def data_dir(self, name):
        return os.path.join(self.workdir, f"{name}-data")

    def disk_dir(self, name):
        """Where `name`'s data is stored: its data directory, or the disk under its lazyfs."""
        return os.path.join(self.workdir, f"{name}-disk") if self.lazy_disks else self.data_dir(name)

    def _mount_lazyfs(self, name):
        data, control = self.data_dir(name), self.lazyfs_control(name)
        os.makedirs(data)
        log = open(os.path.join(self.workdir, f"{name}-lazyfs.log"), "ab")
        proc = subprocess.Popen([sys.executable, "-m", "muster_chaos.lazyfs", self.disk_dir(name), data, control],
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        self.lazyfs_procs[name] = proc
        deadline = time.time() + 30
        while not (os.path.ismount(data) and os.path.exists(control)):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the lazyfs of {name} did not mount (see {name}-lazyfs.log)")
            time.sleep(0.05)

    def lazyfs_control(self, name):
        return os.path.join(self.workdir, f"{name}-lazyfs.sock")

    def power_loss(self, name):
        """`name`'s control node loses power: killed, and what its disk had not fsynced lost.
        Returns the bytes lost."""
        if name not in self.lazyfs_procs:
            raise RuntimeError("power loss needs lazy disks (the run's kinds include unsynced_loss)")
        self.procs[name].kill()
        return lazyfs.crash(self.lazyfs_control(name))

    def _server(self, name, founder=False, joining=False):
        """Writes the config of the control node that `name` runs (under its id in `node_ids`)
        and makes its process."""
        node_id, ip = self.node_ids[name], self.net.ip(name)
        tls_dir = os.path.join(self.pki, "tls")
        tls = (f'[tls]\nca_file = "{tls_dir}/ca.pem"\ncert_file = "{tls_dir}/control-{node_id}.pem"\n'
               f'key_file = "{tls_dir}/control-{node_id}.key"\nca_key_file = "{tls_dir}/ca.key"\n')
        # Its peers: the members, and itself when it joins a running cluster.
        peers = "".join(
            f'[[peers]]\nid = {self.node_ids[n]}\ngrpc_addr = "{self.net.ip(n)}:{GRPC}"\n'
            f'raft_addr = "{self.net.ip(n)}:{RAFT}"\n'
            for n in self.server_names + ([name] if joining else []))
        config = os.path.join(self.workdir, f"node-{node_id}.toml")
        with open(config, "w") as f:
            f.write(f'node_id = {node_id}\ngrpc_addr = "{ip}:{GRPC}"\nraft_addr = "{ip}:{RAFT}"\n'
                    f'api_addr = "{ip}:{API}"\ndata_dir = "{self.data_dir(name)}"\n'
                    f'node_lost_after_secs = {self.node_lost_after}\n'
                    f'snapshot_every_entries = {SNAPSHOT_EVERY_ENTRIES}\n'
                    f'{"join_existing_cluster = true" + chr(10) if joining else ""}{tls}'
                    f'{self.founding_table if founder else ""}{peers}')
        self._proc(name, ["server", "--config", config])

    def admin(self, via, *args, timeout=180):
        """`muster ARGS` as an operator runs it, signed with the root user's keys, through
        `via`'s API; returns the finished process."""
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.credentials[0],
               "AWS_SECRET_ACCESS_KEY": self.credentials[1], "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL_BATCH": f"http://{self.net.ip(via)}:{API}"}
        return subprocess.run([self.binary, *args], capture_output=True, text=True, env=env,
                              timeout=timeout)

    def start_spare(self):
        """A spare host's control node under a new id, with an empty disk and its certificate
        made as an operator makes one (`muster cluster new-node`), started to wait for
        `add-node`. Returns the host; it is not a member yet."""
        if not self.spare_names:
            raise RuntimeError("no spare host (an earlier membership change did not finish)")
        name = self.spare_names[0]
        node_id = self.next_id
        self.next_id += 1
        made = subprocess.run([self.binary, "cluster", "new-node", "--dir", self.pki, "--id", str(node_id),
                               "--host", self.net.ip(name)], capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"new-node {node_id}: {made.stderr.strip()[-300:]}")
        data = self.data_dir(name)
        for entry in os.listdir(data):
            path = os.path.join(data, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        self.node_ids[name] = node_id
        self._server(name, joining=True)
        self.procs[name].start()
        return name

    def now_member(self, name):
        self.spare_names.remove(name)
        self.server_names.append(name)

    def now_spare(self, name):
        """`name`'s node was removed: stopped, and its host kept for a later new node."""
        self.procs[name].kill()
        self.server_names.remove(name)
        self.spare_names.append(name)

    def start(self):
        for proc in self.procs.values():
            proc.start()
        threading.Thread(target=self._supervise, daemon=True).start()
        path = os.path.join(self.workdir, "s1-data", "aws", "credentials")
        deadline = time.time() + 60
        while not os.path.exists(path):
            if time.time() > deadline:
                raise RuntimeError("the founder never wrote the root credentials")
            time.sleep(0.1)
        time.sleep(0.2)
        parser = configparser.ConfigParser()
        parser.read(path)
        section = parser[parser.sections()[0]]
        self.credentials = (section["aws_access_key_id"], section["aws_secret_access_key"])

    def client(self, server, read_timeout=10):
        # boto3's default session is not safe to make clients from in several threads at once.
        with self.client_lock:
            return self._client(server, read_timeout)

    def _client(self, server, read_timeout):
        """A boto3 Batch client of `server`'s API that never retries on its own, so that each
        call in the history is one request. (botocore's `max_attempts` counts retries: 1 still
        sends twice, and a first send that was applied then looked like a refused second one.)"""
        return boto3.client(
            "batch", region_name="us-east-1",
            endpoint_url=f"http://{self.net.ip(server)}:{API}",
            aws_access_key_id=self.credentials[0], aws_secret_access_key=self.credentials[1],
            config=Config(connect_timeout=2, read_timeout=read_timeout,
                          retries={"total_max_attempts": 1, "mode": "standard"}))

    def gauges(self, server):
        """The `muster_raft_*` gauges of `server`'s /metrics, or None if it does not answer."""
        try:
            with urllib.request.urlopen(f"http://{self.net.ip(server)}:{API}/metrics", timeout=1) as r:
                text = r.read().decode()
        except Exception:
            return None
        values = {}
        for m in re.finditer(r'^(muster_raft_\w+)\{node="\d+"\} (\S+)$', text, re.M):
            values[m.group(1)] = float(m.group(2))
        return values

    def leader(self):
        """The server that leads with a quorum, if exactly one says so."""
        leading = [s for s in self.server_names
                   if self.procs[s].alive and not self.procs[s].paused
                   and (self.gauges(s) or {}).get("muster_raft_leading") == 1.0]
        return leading[0] if len(leading) == 1 else None

    def wait_for_leader(self, timeout=30, other_than=None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            leader = self.leader()
            if leader and leader != other_than:
                return leader
            time.sleep(0.05)
        return None

    def followers(self, leader):
        return [s for s in self.server_names if s != leader]

    def _supervise(self):
        while not self.stopped.wait(1.0):
            for proc in list(self.procs.values()):
                proc.restart_if_exited()

    def stop(self):
        self.stopped.set()
        for proc in self.procs.values():
            proc.kill()
        if self.engine is not None:
            self.engine.cleanup()
            self.engine = None

    def unmount(self):
        gone = [os.path.realpath(p) for p in self.mounts + [self.data_dir(n) for n in self.lazyfs_procs]]
        for name, proc in self.lazyfs_procs.items():
            subprocess.run(["fusermount", "-u", "-z", self.data_dir(name)], check=False)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.lazyfs_procs = {}
        for data in self.mounts:
            subprocess.run(["umount", "-l", data], check=False)
        # Lazy unmounts finish in the background: the run's directory is removed only after.
        deadline = time.time() + 20
        while time.time() < deadline:
            with open("/proc/mounts") as f:
                mounted = {line.split()[1] for line in f}
            if not mounted.intersection(gone):
                break
            time.sleep(0.1)
        self.mounts = []
