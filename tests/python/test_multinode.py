"""Multi-node parallel jobs on `muster dev --agents 4`, through boto3 as AWS Batch users submit
them: a rendezvous over TCP between the nodes (process executor, then Docker with the test
image), the gang failing and retried whole, terminate, two gangs that each need most of the
cluster, and a gang that is not starved by a stream of small jobs."""

import configparser
import os
import shutil
import subprocess
import sys
import time

import boto3
import pytest
from botocore.exceptions import ClientError

import conftest
from conftest import TEST_IMAGE, Dev, unique

AGENTS = 4

RENDEZVOUS = r'''
import os, socket, sys, time
index = int(os.environ["AWS_BATCH_JOB_NODE_INDEX"])
count = int(os.environ["AWS_BATCH_JOB_NUM_NODES"])
main = int(os.environ["AWS_BATCH_JOB_MAIN_NODE_INDEX"])
addresses = os.environ["MUSTER_NODE_ADDRESSES"].split(",")
port = int(sys.argv[1])
print("node", index, "of", count, "at", addresses[index], "job", os.environ["AWS_BATCH_JOB_ID"], flush=True)
print("hostfile", " ".join(open(os.environ["MUSTER_HOSTFILE"]).read().split()), flush=True)
print("addresses", " ".join(addresses), flush=True)
if index == main:
    # The main node listens on its own address only: the others must have been told it.
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addresses[main], port))
    server.listen(16)
    arrived = set()
    while len(arrived) < count - 1:
        conn, _ = server.accept()
        arrived.add(int(conn.recv(16).decode()))
        conn.close()
    print("all arrived", sorted(arrived), flush=True)
else:
    host = os.environ["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"]
    assert host == addresses[main], (host, addresses)
    for _ in range(600):
        try:
            conn = socket.create_connection((host, port), timeout=2)
            conn.sendall(str(index).encode())
            conn.close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit(3)
    time.sleep(60)  # stopped once the main node exits
'''


def client_for(dev, service):
    """A boto3 client of `dev` from the files it wrote, as a user's would be."""
    credentials = configparser.ConfigParser()
    credentials.read(os.path.join(dev.data_dir, "aws", "credentials"))
    config = configparser.ConfigParser()
    config.read(os.path.join(dev.data_dir, "aws", "config"))
    return boto3.session.Session().client(
        service,
        endpoint_url=dev.endpoint,
        region_name=config["default"]["region"],
        aws_access_key_id=credentials["default"]["aws_access_key_id"],
        aws_secret_access_key=credentials["default"]["aws_secret_access_key"],
    )


def start(executor):
    binary = os.environ.get("MUSTER_BIN") or shutil.which("muster") or "target/debug/muster"
    return Dev(binary, executor=executor, agents=AGENTS)


def stop(dev):
    dev.stop()
    assert dev.proc.returncode == 0, open(dev.log_path).read()[-4000:]
    shutil.rmtree(dev.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    dev = start("process")
    yield dev
    stop(dev)


@pytest.fixture(scope="module")
def batch(cluster):
    return client_for(cluster, "batch")


def wait_for(batch, job_id, statuses, timeout=90):
    return conftest.wait_for(batch, job_id, statuses, timeout)


def resources(vcpus="1", memory="128"):
    return [{"type": "VCPU", "value": vcpus}, {"type": "MEMORY", "value": memory}]


def register(batch, command, nodes=AGENTS, image="host", attempts=1, ranges=None):
    name = unique("mnp")
    batch.register_job_definition(
        jobDefinitionName=name, type="multinode",
        retryStrategy={"attempts": attempts},
        nodeProperties={
            "numNodes": nodes, "mainNode": 0,
            "nodeRangeProperties": ranges or [
                {"targetNodes": "0:", "container": {"image": image, "command": command,
                                                    "resourceRequirements": resources()}},
            ],
        },
    )
    return name


def script(tmp_path):
    path = tmp_path / "rendezvous.py"
    path.write_text(RENDEZVOUS)
    return str(path)


def node_jobs(batch, job_id):
    nodes = []
    for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"):
        nodes += batch.list_jobs(multiNodeJobId=job_id, jobStatus=status)["jobSummaryList"]
    ids = sorted((n["jobId"] for n in nodes), key=lambda j: int(j.split("#")[1]))
    return batch.describe_jobs(jobs=ids)["jobs"] if ids else []


def log_of(cluster, job):
    logs = client_for(cluster, "logs")
    stream = job["container"]["logStreamName"]
    events = logs.get_log_events(logGroupName="/aws/batch/job", logStreamName=stream, startFromHead=True)
    return [e["message"] for e in events["events"]]


def test_a_rendezvous_runs_across_four_agents_main_node_first(cluster, batch, tmp_path):
    name = register(batch, [sys.executable, script(tmp_path), "45601"])
    job_id = batch.submit_job(jobName="rendezvous", jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})
    assert job["status"] == "SUCCEEDED", job
    assert job["nodeProperties"]["numNodes"] == AGENTS and job["nodeProperties"]["mainNode"] == 0
    assert "container" not in job, "the parent runs no container of its own"

    nodes = node_jobs(batch, job_id)
    assert [n["jobId"] for n in nodes] == [f"{job_id}#{i}" for i in range(AGENTS)]
    assert [n["nodeDetails"] for n in nodes] == [
        {"nodeIndex": i, "isMainNode": i == 0} for i in range(AGENTS)]
    assert all(n["status"] == "SUCCEEDED" for n in nodes)
    workers = {n["container"]["containerInstanceArn"] for n in nodes}
    assert len(workers) == AGENTS, f"each node on an agent of its own: {workers}"
    # The main node started first; the others once it ran.
    main_started = nodes[0]["startedAt"]
    assert all(n["startedAt"] >= main_started for n in nodes[1:]), [n["startedAt"] for n in nodes]
    assert job["attempts"][0]["container"]["containerInstanceArn"] == nodes[0]["container"]["containerInstanceArn"]

    main_log = log_of(cluster, nodes[0])
    assert "all arrived [1, 2, 3]" in main_log, main_log
    other = log_of(cluster, nodes[2])
    assert other[0].startswith(f"node 2 of {AGENTS} at 127.0.0.") and other[0].endswith(f"job {job_id}#2"), other
    # The hostfile lists every node's address in index order, one per agent.
    addresses = other[2].split()[1:]
    assert other[1] == "hostfile " + " ".join(addresses) and len(set(addresses)) == AGENTS, other

    # `muster job logs` of the parent: every node's output, in index order.
    own = subprocess.run([cluster.binary, "job", "logs", job_id], env=cluster.env, capture_output=True,
                         text=True, timeout=60)
    assert own.returncode == 0, own.stderr
    headers = [line for line in own.stdout.splitlines() if line.startswith("==> ")]
    assert headers == [f"==> {job_id}#{i} <==" for i in range(AGENTS)], own.stdout
    assert "all arrived [1, 2, 3]" in own.stdout

    listed = batch.list_jobs(jobQueue="default", jobStatus="SUCCEEDED")["jobSummaryList"]
    mine = [j for j in listed if j["jobId"].startswith(job_id)]
    assert [j["jobId"] for j in mine] == [job_id], "node jobs are listed through multiNodeJobId"
    assert mine[0]["nodeProperties"] == {"numNodes": AGENTS}


def test_a_failing_node_fails_the_attempt_and_the_whole_gang_runs_again(batch):
    fails = ["sh", "-c", 'if [ "$AWS_BATCH_JOB_NODE_INDEX" = 1 ]; then exit 7; fi; sleep 60']
    name = register(batch, fails, nodes=3, attempts=2)
    job_id = batch.submit_job(jobName="flaky", jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})
    assert job["status"] == "FAILED"
    assert len(job["attempts"]) == 2, job["attempts"]
    assert all(a["container"]["exitCode"] == 7 for a in job["attempts"])
    assert job["statusReason"].startswith("Node 1 failed"), job["statusReason"]
    nodes = node_jobs(batch, job_id)
    assert [len(n["attempts"]) for n in nodes] == [2, 2, 2], "every node ran in both attempts"
    assert all(n["status"] == "FAILED" for n in nodes)
    # The other nodes were stopped, not left to sleep out their minute.
    assert job["stoppedAt"] - job["createdAt"] < 45_000


def test_terminate_stops_every_node(batch):
    name = register(batch, ["sleep", "60"], nodes=3)
    job_id = batch.submit_job(jobName="long", jobQueue="default", jobDefinition=name)["jobId"]
    wait_for(batch, job_id, {"RUNNING"})
    batch.terminate_job(jobId=job_id, reason="enough of that")
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"}, timeout=30)
    assert job["status"] == "FAILED" and job["isTerminated"] is True
    assert job["statusReason"] == "enough of that"
    assert all(n["status"] == "FAILED" for n in node_jobs(batch, job_id))


def test_two_gangs_that_each_need_most_of_the_cluster_both_finish(batch):
    name = register(batch, ["sleep", "2"], nodes=3)
    first = batch.submit_job(jobName="first", jobQueue="default", jobDefinition=name)["jobId"]
    second = batch.submit_job(jobName="second", jobQueue="default", jobDefinition=name)["jobId"]
    a = wait_for(batch, first, {"SUCCEEDED", "FAILED"})
    b = wait_for(batch, second, {"SUCCEEDED", "FAILED"})
    assert a["status"] == b["status"] == "SUCCEEDED"
    # Three of four one-vCPU agents each: never both at once.
    assert b["startedAt"] >= a["stoppedAt"] or a["startedAt"] >= b["stoppedAt"], (a, b)


def test_a_gang_is_not_starved_by_a_stream_of_small_jobs(batch):
    small = unique("small")
    batch.register_job_definition(
        jobDefinitionName=small, type="container",
        containerProperties={"image": "host", "command": ["sleep", "2"], "resourceRequirements": resources()})
    first_wave = [batch.submit_job(jobName=f"before{i}", jobQueue="default", jobDefinition=small)["jobId"]
                  for i in range(AGENTS)]
    for job_id in first_wave:
        wait_for(batch, job_id, {"STARTING", "RUNNING", "SUCCEEDED"})
    gang = batch.submit_job(jobName="gang", jobQueue="default",
                            jobDefinition=register(batch, ["sleep", "1"]))["jobId"]
    # Small jobs without a timeout keep arriving behind it; none may take its nodes.
    later = [batch.submit_job(jobName=f"after{i}", jobQueue="default", jobDefinition=small)["jobId"]
             for i in range(2 * AGENTS)]
    waiting = wait_for(batch, gang, {"RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED"})
    if waiting["status"] == "RUNNABLE":
        reason = wait_for_reason(batch, gang)
        assert f"room reserved on {AGENTS} nodes" in reason, reason
    g = wait_for(batch, gang, {"SUCCEEDED", "FAILED"}, timeout=120)
    assert g["status"] == "SUCCEEDED"
    after = [wait_for(batch, j, {"SUCCEEDED", "FAILED"}, timeout=120) for j in later]
    assert all(j["startedAt"] >= g["startedAt"] for j in after), \
        [(j["jobName"], j["startedAt"], g["startedAt"]) for j in after]


def wait_for_reason(batch, job_id, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = batch.describe_jobs(jobs=[job_id])["jobs"][0]
        reason = job.get("statusReason") or ""
        if job["status"] != "RUNNABLE" or "reserved" in reason:
            return reason if job["status"] == "RUNNABLE" else f"room reserved on {AGENTS} nodes (started)"
        time.sleep(0.2)
    return reason


def test_bad_node_properties_are_refused_naming_the_field(batch):
    def refused(**kwargs):
        with pytest.raises(ClientError) as caught:
            batch.register_job_definition(jobDefinitionName=unique("bad"), type="multinode", **kwargs)
        assert caught.value.response["Error"]["Code"] == "ClientException"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        return caught.value.response["Error"]["Message"]

    container = {"image": "host", "command": ["true"], "resourceRequirements": resources()}
    overlap = refused(nodeProperties={"numNodes": 4, "mainNode": 0, "nodeRangeProperties": [
        {"targetNodes": "0:2", "container": container}, {"targetNodes": "2:", "container": container}]})
    assert "nodeProperties.nodeRangeProperties.targetNodes" in overlap and "node 2" in overlap, overlap
    gap = refused(nodeProperties={"numNodes": 4, "mainNode": 0, "nodeRangeProperties": [
        {"targetNodes": "0", "container": container}, {"targetNodes": "2:", "container": container}]})
    assert "node 1 is in no range" in gap, gap
    main = refused(nodeProperties={"numNodes": 2, "mainNode": 5, "nodeRangeProperties": [
        {"targetNodes": ":", "container": container}]})
    assert "nodeProperties.mainNode" in main, main
    no_image = refused(nodeProperties={"numNodes": 2, "mainNode": 0, "nodeRangeProperties": [
        {"targetNodes": ":", "container": {"command": ["true"], "resourceRequirements": resources()}}]})
    assert "nodeProperties.nodeRangeProperties.container.image" in no_image, no_image

    name = register(batch, ["true"], nodes=2)
    with pytest.raises(ClientError) as caught:
        batch.submit_job(jobName="x", jobQueue="default", jobDefinition=name,
                         nodeOverrides={"numNodes": 0})
    assert "nodeOverrides.numNodes" in caught.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as caught:
        batch.submit_job(jobName="x", jobQueue="default", jobDefinition=name,
                         containerOverrides={"command": ["false"]})
    assert "containerOverrides" in caught.value.response["Error"]["Message"]


def test_a_gang_larger_than_the_cluster_fails_at_once(batch):
    name = register(batch, ["true"], nodes=AGENTS + 1)
    job_id = batch.submit_job(jobName="huge", jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"FAILED", "SUCCEEDED"}, timeout=30)
    assert job["status"] == "FAILED"
    assert job["statusReason"].startswith("MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"), job["statusReason"]


def test_a_rendezvous_in_docker_containers_on_the_host_network():
    dev = start("docker")
    try:
        batch = client_for(dev, "batch")
        # A port nothing on this host holds now (the containers share its network).
        port = conftest.free_port()
        # Every other node sends its index again and again until the main node has heard from all of
        # them and exits (which stops the others): a connection the kernel queued behind another one
        # and dropped when the listener closed is simply sent again.
        command = ["sh", "-c",
                   'main="$AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"; '
                   'if [ "$AWS_BATCH_JOB_NODE_INDEX" = "$AWS_BATCH_JOB_MAIN_NODE_INDEX" ]; then '
                   '  echo "hosts $(cat "$MUSTER_HOSTFILE" | tr "\\n" " ")"; '
                   '  heard=" "; tries=0; '
                   '  while :; do '
                   '    missing=0; '
                   '    for i in $(seq 1 $(($AWS_BATCH_JOB_NUM_NODES - 1))); do case "$heard" in *" $i "*) ;; *) missing=1 ;; esac; done; '
                   '    if [ $missing = 0 ] || [ $tries -ge 30 ]; then break; fi; '
                   # Each nc is bounded: a connection neither side closes must not hang the job.
                   f'    heard="$heard$(timeout 5 nc -l -p {port} | tr -cd 0-9) "; tries=$((tries + 1)); '
                   '  done; '
                   '  for i in $heard; do echo "heard $i"; done; '
                   '  if [ $missing = 0 ]; then echo all arrived; fi; '
                   'else '
                   f'  while :; do timeout 5 sh -c "echo $AWS_BATCH_JOB_NODE_INDEX | nc -w 1 $main {port}"; sleep 0.2; done; '
                   'fi']
        name = register(batch, command, nodes=3, image=TEST_IMAGE)
        job_id = batch.submit_job(jobName="rendezvous", jobQueue="default", jobDefinition=name)["jobId"]
        try:
            job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"}, timeout=120)
        finally:
            # Whatever happens, say what each node did and printed.
            for n in node_jobs(batch, job_id):
                printed = log_of(dev, n) if n.get("container", {}).get("logStreamName") else []
                print(n["jobId"], n["status"], n.get("statusReason"), n.get("container", {}).get("containerInstanceArn"),
                      n["attempts"], printed[-10:])
        nodes = node_jobs(batch, job_id)
        assert job["status"] == "SUCCEEDED", (job["statusReason"], [(n["status"], n.get("statusReason"), n["attempts"]) for n in nodes])
        assert len({n["container"]["containerInstanceArn"] for n in nodes}) == 3
        log = log_of(dev, nodes[0])
        assert "all arrived" in log and {l for l in log if l.startswith("heard ")} == {"heard 1", "heard 2"}, log
        hosts = [l for l in log if l.startswith("hosts ")][0].split()[1:]
        assert len(hosts) == 3 and all(h.startswith("127.0.0.") for h in hosts), log
    finally:
        stop(dev)
