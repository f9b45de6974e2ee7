"""Starts one `muster dev` for the whole session and points boto3 and the aws CLI at it."""

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import boto3
import pytest

READY = "muster dev ready: AWS Batch API at "
TEST_IMAGE = os.environ.get("MUSTER_TEST_IMAGE", "muster-test/busybox:1")


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(batch, job_id, statuses, timeout=60):
    """Polls DescribeJobs until the job reaches one of `statuses`, and returns it."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        jobs = batch.describe_jobs(jobs=[job_id])["jobs"]
        if jobs:
            job = jobs[0]
            if job["status"] in statuses:
                return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {job}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dev:
    def __init__(self, binary, executor="docker", agents=1):
        self.binary = binary
        self.executor = executor
        self.agents = agents
        self.data_dir = tempfile.mkdtemp(prefix="muster-dev-")
        self.port = free_port()
        self.log_path = os.path.join(self.data_dir, "muster.log")
        self._start()
        self.env = dict(
            os.environ,
            AWS_SHARED_CREDENTIALS_FILE=os.path.join(self.data_dir, "aws", "credentials"),
            AWS_CONFIG_FILE=os.path.join(self.data_dir, "aws", "config"),
            AWS_ENDPOINT_URL_BATCH=self.endpoint,
            AWS_ENDPOINT_URL_CLOUDWATCH_LOGS=self.endpoint,
        )
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_DEFAULT_REGION", "AWS_REGION"):
            self.env.pop(key, None)

    def _start(self):
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [self.binary, "dev", "--data-dir", self.data_dir, "--api-addr", f"127.0.0.1:{self.port}",
             "--executor", self.executor, "--agents", str(self.agents),
             # The container-options test mounts a folder of the temporary directory.
             "--allow-host-path", tempfile.gettempdir(),
             # Test-only: lets timeouts and RUNNABLE time limits be tested in seconds.
             "--test-min-attempt-duration-secs", "1", "--test-min-state-time-limit-secs", "1"],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        self.endpoint = self._wait_ready(deadline=time.monotonic() + 60)

    def crash_and_restart(self):
        """kill -9, as a power cut or the OOM killer would, then start again on the same data."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()
        self._start()

    def _wait_ready(self, deadline):
        lines = []
        found = {}

        def read():
            for line in self.proc.stdout:
                lines.append(line)
                if line.startswith(READY):
                    found["endpoint"] = line[len(READY):].split()[0]
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=max(0, deadline - time.monotonic()))
        if "endpoint" not in found:
            self.stop()
            raise RuntimeError(f"muster dev did not become ready: {lines} {open(self.log_path).read()[-4000:]}")
        return found["endpoint"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # Ctrl-C: the clean shutdown path
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        self.log.close()

    def use_in_this_process(self):
        """Points this test process at the dev cluster exactly as a user would: only the two
        files muster dev wrote and the endpoint variable."""
        for key in list(os.environ):
            if key.startswith("AWS_"):
                del os.environ[key]
        for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL_BATCH", "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"):
            os.environ[key] = self.env[key]


@pytest.fixture(scope="session")
def dev():
    binary = os.environ.get("MUSTER_BIN") or shutil.which("muster") or "target/debug/muster"
    d = Dev(binary)
    yield d
    d.stop()
    assert d.proc.returncode == 0, open(d.log_path).read()[-4000:]
    shutil.rmtree(d.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def batch(dev):
    dev.use_in_this_process()
    return boto3.session.Session().client("batch")


@pytest.fixture
def aws(dev):
    def run(*args, check=True):
        proc = subprocess.run(["aws", "batch", *args, "--output", "json"], env=dev.env,
                              capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"aws batch {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc
    return run
