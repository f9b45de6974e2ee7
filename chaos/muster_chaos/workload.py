"""Clients that submit, cancel, terminate and poll jobs over every control node, recording each
call as it ended: ok, a definite failure, or unknown (it may or may not have taken effect),
as etcd's robustness tests do. Jobs write their own runs on the host."""

import os
import random
import threading
import time
import traceback

import botocore.exceptions

from .engine import IMAGE

QUEUE, DEFINITION = "chaos", "chaos"
# Probes of failover times go through a queue of higher priority on the same environment, so
# that they measure the failover, not the backlog.
PROBE_QUEUE = "chaos-probe"
RETRY_ATTEMPTS = 3

# Each run of a job picks a token and notes a tick every 200 ms: the checker rebuilds from
# them which runs of which attempt happened when. SIGTERM notes a last tick. Times are the
# kernel's uptime in ns (10 ms steps), the one clock that a process on the host and busybox
# in a container both read alike.
JOB_SCRIPT = (
    'now() {{ set -- $(cat /proc/uptime); echo "${{1%.*}}${{1#*.}}0000000"; }}; '
    'r=$(hostname)-$$-$(now); t() {{ echo "$AWS_BATCH_JOB_ID $AWS_BATCH_JOB_ATTEMPT $r $(now) $1" >> {runs}; }}; '
    "trap 't term; exit 143' TERM; t start; i=0; "
    "while [ $i -lt {ticks} ]; do sleep 0.2; t tick; i=$((i+1)); done; t end"
)


def classify(error):
    """ok / fail / unknown for an exception a boto3 call raised."""
    if isinstance(error, botocore.exceptions.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
        # Muster answers 503 only for what it certainly did not do (no leader took it), and
        # the checker holds it to that; a 500 may have been applied.
        return "fail" if 400 <= status < 500 or status == 503 else "unknown"
    # Nothing was sent: the connection was never made.
    if isinstance(error, (botocore.exceptions.EndpointConnectionError,
                          botocore.exceptions.ConnectTimeoutError)):
        return "fail"
    return "unknown"


class History:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = []
        self.observed = {}  # job id -> [(time, status, attempts)]

    def record(self, op):
        with self.lock:
            self.ops.append(op)

    def observe(self, job, status, attempts, start, end):
        """A read of `job`, made by a call that started at `start` and was answered at `end`."""
        with self.lock:
            self.observed.setdefault(job, []).append((start, end, status, attempts))

    def acked_jobs(self):
        with self.lock:
            return [o["job"] for o in self.ops if o["op"] == "submit" and o["result"] == "ok"]


def setup(cluster, runs_path):
    """The compute environment, queue and definition the workload uses, made through the first
    node that takes them (the root key may take a moment to be committed)."""
    deadline = time.time() + 60
    while True:
        try:
            client = cluster.client(cluster.wait_for_leader() or cluster.server_names[0])
            try:
                client.create_compute_environment(computeEnvironmentName="chaos", type="UNMANAGED")
            except client.exceptions.ClientException as e:
                if "already exists" not in str(e):
                    raise
            for queue, priority in ((QUEUE, 1), (PROBE_QUEUE, 100)):
                try:
                    client.create_job_queue(jobQueueName=queue, priority=priority, computeEnvironmentOrder=[
                        {"order": 1, "computeEnvironment": "chaos"}])
                except client.exceptions.ClientException as e:
                    if "already exists" not in str(e):
                        raise
            # A Docker agent's containers note their runs in the run's directory, mounted at
            # the same path; the process executor runs on the host and ignores both.
            workdir = os.path.dirname(runs_path)
            client.register_job_definition(
                jobDefinitionName=DEFINITION, type="container",
                retryStrategy={"attempts": RETRY_ATTEMPTS},
                containerProperties={"image": IMAGE, "command": ["true"],
                                     "volumes": [{"name": "run", "host": {"sourcePath": workdir}}],
                                     "mountPoints": [{"sourceVolume": "run", "containerPath": workdir}],
                                     "resourceRequirements": [{"type": "VCPU", "value": "1"},
                                                              {"type": "MEMORY", "value": "64"}]})
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


class Workload:
    def __init__(self, cluster, history, runs_path, seed, clients=3, rate=1.0):
        self.cluster, self.history, self.runs_path = cluster, history, runs_path
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i, self.rng.random()), daemon=True)
                        for i in range(clients)]
        self.rate = rate
        self.counter = 0
        self.lock = threading.Lock()
        # Tracebacks of client threads that died.
        self.failures = []

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _name(self, client):
        with self.lock:
            self.counter += 1
            return f"c{client}-{self.counter}"

    def _call(self, entry, fn):
        entry["start"] = time.time()
        try:
            value = fn()
            entry["result"] = "ok"
        except Exception as e:  # every outcome is recorded, none raised
            value = None
            entry["result"] = classify(e)
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
        entry["end"] = time.time()
        self.history.record(entry)
        return value

    def _client(self, index, seed):
        try:
            self._calls(index, seed)
        except Exception:  # a client that dies is the harness's failure, reported as one
            self.failures.append(traceback.format_exc())

    def _calls(self, index, seed):
        rng = random.Random(seed)
        clients = {}
        while not self.stop.is_set():
            # The members as of now (a membership change replaces one).
            server = rng.choice(list(self.cluster.server_names))
            if server not in clients:
                clients[server] = self.cluster.client(server, read_timeout=8)
            client = clients[server]
            roll = rng.random()
            acked = self.history.acked_jobs()
            if roll < 0.7 or not acked:
                name = self._name(index)
                # Mostly short jobs; one in ten long enough to be running when its agent is
                # killed and still running when the agent's lease ends.
                ticks = rng.randint(2, 8) if rng.random() < 0.9 else rng.randint(25, 75)
                command = ["sh", "-c", JOB_SCRIPT.format(runs=self.runs_path, ticks=ticks)]
                entry = {"op": "submit", "name": name, "node": server}
                out = self._call(entry, lambda: client.submit_job(
                    jobName=name, jobQueue=QUEUE, jobDefinition=DEFINITION,
                    containerOverrides={"command": command}))
                if out:
                    entry["job"] = out["jobId"]
            elif roll < 0.8:
                job = rng.choice(acked)
                self._call({"op": "cancel", "job": job, "node": server},
                           lambda: client.cancel_job(jobId=job, reason="chaos"))
            elif roll < 0.85:
                job = rng.choice(acked)
                self._call({"op": "terminate", "job": job, "node": server},
                           lambda: client.terminate_job(jobId=job, reason="chaos"))
            else:
                # Each of these was acknowledged before this call starts: a linearizable read
                # returns every one of them.
                jobs = rng.sample(acked, min(len(acked), 20))
                entry = {"op": "describe", "node": server, "asked": jobs}
                out = self._call(entry, lambda: client.describe_jobs(jobs=jobs))
                if out is not None:
                    entry["found"] = [job["jobId"] for job in out.get("jobs", [])]
                for job in (out or {}).get("jobs", []):
                    self.history.observe(job["jobId"], job["status"], len(job.get("attempts", [])),
                                         entry["start"], entry["end"])
            self.stop.wait(rng.expovariate(self.rate))
