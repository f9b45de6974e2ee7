"""Real `muster server` and `muster agent` processes, each in a namespace of its own, started,
killed, paused and restarted by PID."""

import configparser
import os
import tomllib
import re
import signal
import subprocess
import threading
import time
import urllib.request

import boto3
from botocore.config import Config

GRPC, RAFT, API, LOGS = 7101, 7102, 7070, 7103
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

    def start(self):
        self.wanted = True
        log = open(self.log_path, "ab")
        env = {**os.environ, "MUSTER_LOG": "warn,muster=info,muster_raft=info", **self.extra_env}
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
        log.close()

    @property
    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig):
        if self.alive:
            os.kill(self.popen.pid, sig)

    def kill(self):
        self.wanted = False
        if self.alive:
            self.signal(signal.SIGCONT)
            self.popen.kill()
            self.popen.wait(timeout=30)
        self.paused = False

    def pause(self):
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        self.signal(signal.SIGCONT)
        self.paused = False


class Cluster:
    """`servers` control nodes and `agents` process-executor agents on `net`."""

    def __init__(self, binary, workdir, net, servers=3, agents=2, node_lost_after=8,
                 agent_stop_after=4):
        self.binary, self.workdir, self.net = binary, workdir, net
        self.server_names = [f"s{i}" for i in range(1, servers + 1)]
        self.agent_names = [f"a{i}" for i in range(1, agents + 1)]
        for name in self.server_names + self.agent_names:
            net.add_host(name)
        self.procs = {}
        # The cluster's CA, node certificates and agents' join token, as an operator makes
        # them: every internal port runs mutual TLS, as in production.
        pki = os.path.join(workdir, "pki")
        subprocess.run([binary, "cluster", "init", "--dir", pki, "--executor", "process",
                        "--servers", ",".join(net.ip(n) for n in self.server_names)],
                       check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(pki, "server-1.toml"), "rb") as f:
            founding = tomllib.load(f)["founding_join_token"]
        with open(os.path.join(pki, "agent.toml"), "rb") as f:
            joining = tomllib.load(f)
        tls_dir = os.path.join(pki, "tls")

        def tls(i):
            return (f'[tls]\nca_file = "{tls_dir}/ca.pem"\ncert_file = "{tls_dir}/control-{i}.pem"\n'
                    f'key_file = "{tls_dir}/control-{i}.key"\nca_key_file = "{tls_dir}/ca.key"\n')
        founding_table = (f'[founding_join_token]\nid = "{founding["id"]}"\n'
                          f'secret_sha256 = "{founding["secret_sha256"]}"\n'
                          f'expires_at_unix = {founding["expires_at_unix"]}\n')
        peers = "".join(
            f'[[peers]]\nid = {i}\ngrpc_addr = "{net.ip(n)}:{GRPC}"\nraft_addr = "{net.ip(n)}:{RAFT}"\n'
            for i, n in enumerate(self.server_names, 1))
        self.mounts = []
        for i, name in enumerate(self.server_names, 1):
            # Each control node's data on a small filesystem of its own, so that a fault can
            # fill one node's disk and no other's.
            data = os.path.join(workdir, f"{name}-data")
            os.makedirs(data)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DATA_DISK_MIB}m", "tmpfs", data], check=True)
            self.mounts.append(data)
            ip = net.ip(name)
            config = os.path.join(workdir, f"{name}.toml")
            with open(config, "w") as f:
                f.write(f'node_id = {i}\ngrpc_addr = "{ip}:{GRPC}"\nraft_addr = "{ip}:{RAFT}"\n'
                        f'api_addr = "{ip}:{API}"\ndata_dir = "{workdir}/{name}-data"\n'
                        f'node_lost_after_secs = {node_lost_after}\n{tls(i)}'
                        f'{founding_table if i == 1 else ""}{peers}')
            self._proc(name, ["server", "--config", config])
        # Each control node's wall clock can be stepped (libfaketime, reading an offset from a
        # file of its own once a second; the monotonic clock, which Raft's timers use, is left
        # alone).
        self.clock_files = {}
        if os.path.exists(LIBFAKETIME):
            for name in self.server_names:
                clock = os.path.join(workdir, f"{name}.clock")
                with open(clock, "w") as f:
                    f.write("+0\n")
                self.clock_files[name] = clock
                self.procs[name].extra_env = {
                    "LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": clock,
                    "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        control = ", ".join(f'"{net.ip(n)}:{GRPC}"' for n in self.server_names)
        for name in self.agent_names:
            config = os.path.join(workdir, f"{name}.toml")
            with open(config, "w") as f:
                f.write(f'node_id = "{name}"\ncompute_environment = "chaos"\ncontrol_plane = [{control}]\n'
                        f'executor = "process"\nwork_dir = "{workdir}/{name}-work"\nvcpus = 2\n'
                        f'memory_mib = 1024\nheartbeat_secs = 1\nstop_grace_secs = 2\n'
                        f'stop_after_secs = {agent_stop_after}\nlog_listen_addr = "{net.ip(name)}:{LOGS}"\n'
                        f'join_token = "{joining["join_token"]}"\n'
                        f'ca_fingerprint = "{joining["ca_fingerprint"]}"\n')
            self._proc(name, ["agent", "--config", config])
        self.credentials = None
        self.stopped = threading.Event()

    def _proc(self, name, args):
        argv = ["ip", "netns", "exec", self.net.ns(name), self.binary, *args]
        self.procs[name] = Proc(name, argv, os.path.join(self.workdir, f"{name}.log"))

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
                if proc.wanted and proc.popen is not None and proc.popen.poll() is not None:
                    proc.restarts += 1
                    proc.start()

    def stop(self):
        self.stopped.set()
        for proc in self.procs.values():
            proc.kill()

    def unmount(self):
        for data in self.mounts:
            subprocess.run(["umount", "-l", data], check=False)
        self.mounts = []
