"""Submit -> RUNNING latency through `muster dev`, measured with boto3 (a benchmark, not a test).

Usage: python benches/submit_to_running.py --muster target/release/muster --executor docker --jobs 20

Starts `muster dev` on a free port in a temporary directory, registers a definition whose job
sleeps briefly, submits jobs one at a time (each after the previous one ended, so the cluster is
idle) and reports, per job, the time from the SubmitJob call to the first DescribeJobs that shows
RUNNING (polled every 5 ms) and the job's own createdAt -> startedAt.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from conftest import Dev, TEST_IMAGE  # noqa: E402

import boto3  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--muster", default="target/release/muster")
    ap.add_argument("--executor", default="docker", choices=["docker", "process"])
    ap.add_argument("--jobs", type=int, default=20)
    args = ap.parse_args()

    dev = Dev(args.muster, executor=args.executor)
    try:
        dev.use_in_this_process()
        batch = boto3.session.Session().client("batch")
        batch.register_job_definition(
            jobDefinitionName="latency", type="container",
            containerProperties={"image": TEST_IMAGE, "command": ["sh", "-c", "sleep 0.2"],
                                 "resourceRequirements": [{"type": "VCPU", "value": "1"},
                                                          {"type": "MEMORY", "value": "32"}]})
        observed, recorded = [], []
        for i in range(args.jobs):
            t0 = time.monotonic()
            job_id = batch.submit_job(jobName=f"l{i}", jobQueue="default", jobDefinition="latency")["jobId"]
            seen = None
            while True:
                job = batch.describe_jobs(jobs=[job_id])["jobs"][0]
                if seen is None and job["status"] in ("RUNNING", "SUCCEEDED", "FAILED"):
                    seen = time.monotonic() - t0
                if job["status"] in ("SUCCEEDED", "FAILED"):
                    break
                time.sleep(0.005)
            assert job["status"] == "SUCCEEDED", job
            observed.append(seen * 1000)
            recorded.append(job["startedAt"] - job["createdAt"])
        for name, xs in (("client-observed submit->RUNNING ms", observed), ("createdAt->startedAt ms", recorded)):
            xs = sorted(xs)
            p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
            print(f"{args.executor}: {name}: p50 {statistics.median(xs):.0f}  p99 {p99:.0f}  max {xs[-1]:.0f}  (n={len(xs)})")
    finally:
        dev.stop()


if __name__ == "__main__":
    main()
