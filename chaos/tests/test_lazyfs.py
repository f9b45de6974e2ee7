"""The lazy file system the F10 fault mounts under each control node: it must keep what was
fsynced and forget the rest, or the fault would prove nothing. Needs root and /dev/fuse
(tests/run.sh installs Debian's libfuse2)."""

import configparser
import os
import socket
import subprocess
import sys
import threading
import time

import boto3
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from muster_chaos import lazyfs  # noqa: E402


@pytest.fixture
def mounted(tmp_path):
    backing, mount, control = tmp_path / "backing", tmp_path / "mount", str(tmp_path / "control.sock")
    backing.mkdir()
    mount.mkdir()
    chaos = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    proc = subprocess.Popen([sys.executable, "-m", "muster_chaos.lazyfs", str(backing), str(mount), control],
                            cwd=chaos, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while not (os.path.ismount(mount) and os.path.exists(control)):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"lazyfs did not mount: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.05)
    yield backing, mount, control
    subprocess.run(["fusermount", "-u", "-z", str(mount)], check=False)
    proc.wait(timeout=20)


def write(path, data, offset=None, sync=False, mode="r+b"):
    with open(path, mode, buffering=0) as f:
        if offset is not None:
            f.seek(offset)
        f.write(data)
        if sync:
            os.fsync(f.fileno())


def test_what_was_fsynced_survives_a_crash_and_nothing_else(mounted):
    backing, mount, control = mounted
    synced, unsynced = mount / "synced", mount / "unsynced"
    write(synced, b"a" * 5000, mode="wb", sync=True)
    # Written after the fsync, over a page boundary and past the end.
    write(synced, b"b" * 4000, offset=3000)
    write(unsynced, b"never synced", mode="wb")
    # Reads see what was written, as a page cache would; the disk does not hold it yet.
    assert synced.read_bytes() == b"a" * 3000 + b"b" * 4000
    assert os.path.getsize(synced) == 7000
    assert (backing / "synced").read_bytes() == b"a" * 5000
    assert unsynced.read_bytes() == b"never synced"

    assert lazyfs.crash(control) >= 2 * 4096

    assert synced.read_bytes() == b"a" * 5000
    # Its name was made at once; its content was never synced.
    assert unsynced.read_bytes() == b""


def test_a_truncate_is_held_like_a_write_and_growing_again_reads_zeros(mounted):
    _, mount, control = mounted
    path = mount / "file"
    write(path, b"x" * 10000, mode="wb", sync=True)
    os.truncate(path, 100)
    os.truncate(path, 9000)
    assert path.read_bytes() == b"x" * 100 + bytes(8900)
    lazyfs.crash(control)
    assert path.read_bytes() == b"x" * 10000

    os.truncate(path, 100)
    write(path, b"y", offset=200, sync=True)
    assert path.read_bytes() == b"x" * 100 + bytes(100) + b"y"
    lazyfs.crash(control)
    assert path.read_bytes() == b"x" * 100 + bytes(100) + b"y"


def test_a_rename_carries_what_is_held_and_an_unlink_drops_it(mounted):
    _, mount, control = mounted
    write(mount / "tmp", b"content", mode="wb")
    os.rename(mount / "tmp", mount / "final")
    assert (mount / "final").read_bytes() == b"content"
    with open(mount / "final", "rb") as f:
        os.fsync(f.fileno())
    write(mount / "gone", b"held", mode="wb")
    os.unlink(mount / "gone")
    lazyfs.crash(control)
    assert (mount / "final").read_bytes() == b"content"
    assert not (mount / "gone").exists()
    os.mkdir(mount / "dir")
    write(mount / "dir" / "f", b"1", mode="wb", sync=True)
    assert sorted(os.listdir(mount)) == ["dir", "final"]


READY = "muster dev ready: AWS Batch API at "


def start_dev(binary, data_dir, port, log):
    proc = subprocess.Popen([binary, "dev", "--data-dir", str(data_dir), "--api-addr", f"127.0.0.1:{port}",
                             "--executor", "process"], stdout=subprocess.PIPE, stderr=log, text=True)
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            if line.startswith(READY):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout=90):
        proc.kill()
        raise RuntimeError(f"muster dev did not become ready in 90 s (exit {proc.wait()})")
    return proc


def test_a_whole_cluster_that_loses_power_keeps_every_job_it_acknowledged(mounted, tmp_path):
    """`muster dev`'s three control nodes keep their data on one lazy file system, so a crash of
    it is a power loss of the whole cluster at once: only what each node fsynced survives, and
    that must include every acknowledged write."""
    _, mount, control = mounted
    binary = os.environ.get("MUSTER_BIN") or os.path.abspath("target/debug/muster")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "dev.log", "a")
    proc = start_dev(binary, mount, port, log)
    try:
        credentials = configparser.ConfigParser()
        credentials.read(mount / "aws" / "credentials")
        section = credentials[credentials.sections()[0]]
        batch = boto3.client("batch", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{port}",
                             aws_access_key_id=section["aws_access_key_id"],
                             aws_secret_access_key=section["aws_secret_access_key"])
        batch.register_job_definition(jobDefinitionName="kept", type="container",
                                      containerProperties={"image": "busybox", "command": ["true"],
                                                           "resourceRequirements": [
                                                               {"type": "VCPU", "value": "1"},
                                                               {"type": "MEMORY", "value": "64"}]})
        acknowledged = [batch.submit_job(jobName=f"kept-{i}", jobQueue="default", jobDefinition="kept")["jobId"]
                        for i in range(5)]
        proc.kill()
        proc.wait(timeout=30)
        assert lazyfs.crash(control) > 0, "the cluster wrote nothing that was not yet fsynced"

        proc = start_dev(binary, mount, port, log)
        found = batch.describe_jobs(jobs=acknowledged)["jobs"]
        assert sorted(job["jobId"] for job in found) == sorted(acknowledged)
        assert batch.describe_job_definitions(jobDefinitionName="kept")["jobDefinitions"]
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()
