"""The deploy recipe as the README gives it: `deploy/docker/build.sh` builds the image with no
registry, `docker-compose up -d` starts three control nodes and two agents from
`deploy/compose/docker-compose.yml` (mutual TLS, agents joining with the token `muster
cluster init` wrote), the root user's AWS files appear in the data directory, the aws CLI
runs a job in a container of the engine, and `docker-compose down -v` takes it all away."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
COMPOSE_FILE = os.path.join(REPO, "deploy", "compose", "docker-compose.yml")
JOB_IMAGE = os.environ.get("MUSTER_TEST_IMAGE", "muster-test/busybox:1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_answers():
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def compose_cluster(tmp_path_factory):
    if not engine_answers():
        pytest.skip("no Docker engine (or no docker-compose) on this machine: the compose recipe needs one")
    binary = os.environ.get("MUSTER_BIN") or os.path.join(REPO, "target", "debug", "muster")
    image = f"muster:test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["bash", os.path.join(REPO, "deploy", "docker", "build.sh")], check=True,
                   env={**os.environ, "MUSTER_BIN": binary, "MUSTER_IMAGE": image})
    data = tmp_path_factory.mktemp("compose") / "data"
    port = free_port()
    env = {**os.environ, "MUSTER_IMAGE": image, "MUSTER_COMPOSE_DATA": str(data),
           "MUSTER_API_PORT": str(port)}
    project = f"mustertest{uuid.uuid4().hex[:8]}"
    compose = ["docker-compose", "-f", COMPOSE_FILE, "-p", project]
    subprocess.run([*compose, "up", "-d"], check=True, env=env, capture_output=True)
    try:
        yield data, port, env
    finally:
        logs = subprocess.run([*compose, "logs", "--no-color", "--tail", "40"], env=env,
                              capture_output=True, text=True).stdout
        down = subprocess.run([*compose, "down", "-v"], env=env, capture_output=True, text=True)
        subprocess.run(["docker", "image", "rm", image], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        print(logs[-6000:])


def wait_for(what, check, seconds=120):
    deadline = time.time() + seconds
    last = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {seconds} s ({last})")


def test_compose_cluster_runs_a_job_from_the_aws_cli(compose_cluster):
    data, port, env = compose_cluster
    wait_for("node 1 is ready",
             lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=3).status == 200)
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3).status == 200
    wait_for("the root user's AWS files appear", lambda: (data / "aws" / "credentials").exists())
    aws_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    aws_env["AWS_CONFIG_FILE"] = str(data / "aws" / "config")
    aws_env["AWS_SHARED_CREDENTIALS_FILE"] = str(data / "aws" / "credentials")

    def aws(*args):
        out = subprocess.run(["aws", "batch", *args, "--output", "json"], env=aws_env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout) if out.stdout.strip() else {}

    wait_for("both agents register", lambda: json.loads(subprocess.run(
        [os.environ.get("MUSTER_BIN") or os.path.join(REPO, "target", "debug", "muster"),
         "cluster", "status", "--output", "json"], env=aws_env, capture_output=True,
        text=True).stdout or "{}").get("agents", {}).get("READY") == 2)
    aws("register-job-definition", "--job-definition-name", "hello", "--type", "container",
        "--container-properties", json.dumps({
            "image": JOB_IMAGE, "command": ["echo", "hello from compose"],
            "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "64"}]}))
    job = aws("submit-job", "--job-name", "hello", "--job-queue", "default",
              "--job-definition", "hello")["jobId"]
    status = {}

    def ended():
        status.update(aws("describe-jobs", "--jobs", job)["jobs"][0])
        return status["status"] in ("SUCCEEDED", "FAILED")

    wait_for("the job ends", ended)
    assert status["status"] == "SUCCEEDED", status
    assert status["container"]["containerInstanceArn"] in ("agent1", "agent2"), status
    out = subprocess.run(["aws", "logs", "get-log-events", "--log-group-name", "/aws/batch/job",
                          "--log-stream-name", status["container"]["logStreamName"], "--output", "json"],
                         env=aws_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [e["message"] for e in json.loads(out.stdout)["events"]] == ["hello from compose"]
