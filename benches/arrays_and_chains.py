"""Accepting and resolving a 10,000-child array and a 10,000-job dependency chain on a
3-node `muster dev` with the process executor (a benchmark, not a test).

Usage: python benches/arrays_and_chains.py --muster target/release/muster [--size 10000] [--array-only]

Reports wall time to accept (the SubmitJob calls), time until every job ended, and the
resident memory of the muster process before and after.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from conftest import Dev  # noqa: E402

import boto3  # noqa: E402


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wait_ended(batch, job_id, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = batch.describe_jobs(jobs=[job_id])["jobs"][0]
        if job["status"] in ("SUCCEEDED", "FAILED"):
            return job
        time.sleep(0.2)
    raise SystemExit(f"{job_id} did not end within {timeout} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--muster", default="target/release/muster")
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--array-only", action="store_true", help="skip the chain")
    args = ap.parse_args()
    dev = Dev(args.muster, executor="process")
    try:
        dev.use_in_this_process()
        batch = boto3.session.Session().client("batch")
        batch.register_job_definition(
            jobDefinitionName="tiny", type="container",
            containerProperties={"image": "none", "command": ["true"],
                                 "resourceRequirements": [{"type": "VCPU", "value": "0.25"},
                                                          {"type": "MEMORY", "value": "16"}]})
        print(f"muster RSS idle: {rss_mib(dev.proc.pid):.0f} MiB")

        t0 = time.monotonic()
        array = batch.submit_job(jobName="big-array", jobQueue="default", jobDefinition="tiny",
                                 arrayProperties={"size": args.size})["jobId"]
        accepted = time.monotonic() - t0
        job = wait_ended(batch, array, args.timeout)
        done = time.monotonic() - t0
        print(f"array of {args.size}: accepted in {accepted * 1000:.0f} ms (one SubmitJob), all ended in {done:.1f} s "
              f"({args.size / done:.0f} children/s), status {job['status']}, RSS {rss_mib(dev.proc.pid):.0f} MiB")

        if args.array_only:
            return
        t0 = time.monotonic()
        previous = None
        for i in range(args.size):
            kw = {"dependsOn": [{"jobId": previous}]} if previous else {}
            previous = batch.submit_job(jobName=f"c{i}", jobQueue="default", jobDefinition="tiny", **kw)["jobId"]
        accepted = time.monotonic() - t0
        job = wait_ended(batch, previous, args.timeout)
        done = time.monotonic() - t0
        print(f"chain of {args.size}: accepted in {accepted:.1f} s ({args.size / accepted:.0f} submits/s, sequential boto3), "
              f"all ended in {done:.1f} s, status {job['status']}, RSS {rss_mib(dev.proc.pid):.0f} MiB")
    finally:
        dev.stop()


if __name__ == "__main__":
    main()
