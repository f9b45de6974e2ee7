#!/usr/bin/env python3
"""Muster's fault harness: three `muster server` and two `muster agent` processes (one on the
process executor, one on a Docker engine of its own), each in a network namespace of its own,
a boto3 workload over every node, faults one after another, then heal, quiesce and check
(muster_chaos/check.py).

    python3 chaos/run.py                       # ten faults (tests/run.sh runs CI's short form)
    python3 chaos/run.py --faults 60 --seed 7  # longer; a failing seed is printed to replay

Needs root (namespaces, iptables) and a built `muster` (MUSTER_BIN or target/debug/muster).
Writes a JSON summary per run under --out; keeps the run's logs there when a check fails.
"""

import argparse
import glob
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from muster_chaos import faults as fault_kinds  # noqa: E402
from muster_chaos.check import TERMINAL, check  # noqa: E402
from muster_chaos.cluster import Cluster  # noqa: E402
from muster_chaos.net import Net  # noqa: E402
from muster_chaos.workload import PROBE_QUEUE, QUEUE, RETRY_ATTEMPTS, History, Workload, setup  # noqa: E402

STATUSES = ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"]


def view(client):
    """Every job of the workload's queues as this node answers: id -> name, status, attempts."""
    jobs = {}
    for queue, status in ((q, s) for q in (QUEUE, PROBE_QUEUE) for s in STATUSES):
        token = None
        while True:
            kwargs = {"jobQueue": queue, "jobStatus": status, "maxResults": 100}
            if token:
                kwargs["nextToken"] = token
            page = client.list_jobs(**kwargs)
            for summary in page["jobSummaryList"]:
                jobs[summary["jobId"]] = {"name": summary["jobName"], "status": summary["status"]}
            token = page.get("nextToken")
            if not token:
                break
    ids = sorted(jobs)
    for i in range(0, len(ids), 100):
        for job in client.describe_jobs(jobs=ids[i:i + 100])["jobs"]:
            jobs[job["jobId"]]["attempts"] = len(job.get("attempts", []))
    return jobs


def quiesce(cluster, bound):
    """Reads every node until all jobs are terminal on all of them, or `bound` seconds pass.
    Returns the last views read, with None for a node that could not be read then."""
    deadline = time.time() + bound
    clients = {s: cluster.client(s, read_timeout=20) for s in cluster.server_names}
    while True:
        views = {}
        for server, client in clients.items():
            try:
                views[server] = view(client)
            except Exception as e:
                print(f"  reading {server}: {e}", flush=True)
                views[server] = None
        done = all(v is not None for v in views.values()) and all(
            j["status"] in TERMINAL for v in views.values() for j in v.values())
        if done or time.time() > deadline:
            return views, time.time()
        time.sleep(1)


def percentiles(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]
    return {"n": len(values), "p50": pick(0.5), "p99": pick(0.99), "max": values[-1],
            "mean": round(statistics.mean(values))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=10, help="faults to inject, one after another")
    parser.add_argument("--only", default="", help="comma-separated fault kinds (default: every kind; each once per round, in an order drawn from the seed)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--gap", type=float, default=2.0, help="seconds of quiet load between faults")
    parser.add_argument("--rate", type=float, default=1.0, help="calls per second per client")
    parser.add_argument("--out", default="chaos/results")
    parser.add_argument("--subnet", type=int, default=77, help="the harness's hosts are 10.<subnet>.0.x")
    parser.add_argument("--servers", type=int, default=3, help="control nodes (3 or 5)")
    parser.add_argument("--docker-agents", type=int, default=1,
                        help="of the two agents, how many run jobs as containers (on an engine of the harness's own)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs even when no check fails")
    args = parser.parse_args()

    if os.geteuid() != 0:
        sys.exit("chaos/run.py needs root: it makes network namespaces and iptables rules")
    # No core files from processes aborted at crash points (every child inherits this).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    binary = os.environ.get("MUSTER_BIN") or os.path.abspath("target/debug/muster")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    kinds = [k for k in args.only.split(",") if k] or list(fault_kinds.ALL)
    unknown = [k for k in kinds if k not in fault_kinds.ALL]
    if unknown:
        sys.exit(f"unknown fault kinds {unknown}; known: {', '.join(fault_kinds.ALL)}")
    print(f"chaos: seed {seed}, {args.faults} faults of {kinds}", flush=True)

    workdir = tempfile.mkdtemp(prefix="muster-chaos-")
    runs_path = os.path.join(workdir, "runs")
    net = Net(f"m{args.subnet}", args.subnet)
    history = History()
    events, violations, summary = [], [], {}
    cluster = None
    try:
        cluster = Cluster(binary, workdir, net, servers=args.servers,
                          lazy_disks="unsynced_loss" in kinds, docker_agents=args.docker_agents)
        cluster.start()
        setup(cluster, runs_path)
        workload = Workload(cluster, history, runs_path, seed, rate=args.rate)
        workload.start()
        ctx = fault_kinds.Context(cluster, net, rng, history)
        started = time.time()
        # Every kind once per round, in an order drawn from the seed.
        schedule = []
        while len(schedule) < args.faults:
            round_ = list(kinds)
            rng.shuffle(round_)
            schedule += round_
        for kind in schedule[:args.faults]:
            at = time.time()
            try:
                detail = fault_kinds.ALL[kind](ctx)
                error = None
            except Exception as e:
                detail, error = {}, f"{type(e).__name__}: {e}"
            finally:
                net.heal()
            events.append({"fault": kind, "at": round(at - started, 1),
                           "seconds": round(time.time() - at, 1), "detail": detail, "error": error})
            print(f"  {kind}: {detail}{' ERROR ' + error if error else ''}", flush=True)
            if error:
                violations.append({"invariant": "fault-harness", "detail": f"{kind}: {error}"})
            time.sleep(args.gap)
        # Heal: every process up and running again.
        net.heal()
        for proc in (cluster.procs[n] for n in cluster.server_names + cluster.agent_names):
            if proc.paused:
                proc.resume()
            if not proc.alive:
                proc.start()
        workload.finish()
        for failure in workload.failures:
            violations.append({"invariant": "fault-harness", "detail": f"a workload client died: {failure[-400:]}"})
        healed = time.time()
        views, quiet = quiesce(cluster, bound=90)
        runs = open(runs_path).read().splitlines() if os.path.exists(runs_path) else []
        for server, v in views.items():
            if v is None:
                violations.append({"invariant": "node-answers-after-heal",
                                   "detail": f"{server} could not be read {90} s after the heal"})
        views = {s: v for s, v in views.items() if v is not None}
        if not views:
            violations.append({"invariant": "node-answers-after-heal", "detail": "no node could be read"})
        violations += check(history.ops, history.observed, views, runs, RETRY_ATTEMPTS)
        results = {}
        for op in history.ops:
            results.setdefault(op["op"], {}).setdefault(op["result"], 0)
            results[op["op"]][op["result"]] += 1
        kills = [e["detail"] for e in events if e["fault"] == "leader_kill" and e["detail"]]
        summary = {
            "seed": seed, "faults": events, "operations": results,
            "jobs": len(next(iter(views.values()), {}) or {}), "runs_lines": len(runs),
            "quiesced_after_heal_s": round(quiet - healed, 1),
            # Processes that exited on their own and were restarted by the harness's supervisor.
            "restarted_on_exit": {n: p.restarts for n, p in cluster.procs.items() if p.restarts},
            "docker_engine_restarts": cluster.engine.restarts if cluster.engine else None,
            # Exits at the crash points the harness armed (restarted too, counted apart).
            "crashed_at_points": {n: p.crashed_at_points for n, p in cluster.procs.items() if p.crashed_at_points},
            "failover_ms": {k: percentiles([d.get(k) for d in kills])
                            for k in ("elected_ms", "first_write_ms", "placed_ms")},
            "violations": violations,
            # What did not simply succeed, for the post-mortem of a failed check.
            "not_ok": [op for op in history.ops if op["result"] != "ok"][:300],
            # Jobs clients cancelled or terminated, for the same post-mortems.
            "ended_by_clients": [(op["op"], op["job"]) for op in history.ops
                                 if op["op"] in ("cancel", "terminate") and op["result"] == "ok"],
        }
    finally:
        if cluster:
            cluster.stop()
        net.cleanup()
    # Every node's committed log (after its snapshot), replayed: no worker over-committed at any
    # index, nor in the snapshot's state.
    replays = {}
    try:
        for server in cluster.server_names if cluster else []:
            out = subprocess.run([binary, "debug", "replay-log", "--data-dir",
                                  os.path.join(workdir, f"{server}-data")],
                                 capture_output=True, text=True, timeout=300)
            try:
                replay = json.loads(out.stdout)
            except ValueError:
                violations.append({"invariant": "log-replay", "detail": f"{server}: {out.stderr.strip()[-300:]}"})
                continue
            # From the node's snapshot where the log before it was dropped (every 50 entries here).
            replays[server] = {k: replay[k] for k in ("from_snapshot", "committed", "commands", "jobs")}
            for index, violation in replay["violations"]:
                violations.append({"invariant": "over-commit-in-log", "detail": f"{server} at index {index}: {violation}"})
    finally:
        # The disks, whatever the replays did.
        if cluster:
            cluster.unmount()
    if summary:
        summary["log_replays"] = replays
        # How often a warden stopped what a killed agent left running once its lease ended
        # (evidence that `agent_kill`'s long downtimes exercised it).
        summary["warden_stops"] = sum(
            open(path, errors="replace").read().count("lease ended with attempts still running")
            for path in glob.glob(os.path.join(workdir, "*-work", "warden.log"))
        )
        summary["violations"] = violations
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"run-{seed}.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "faults"}, indent=1))
    if violations or args.keep_logs:
        kept = os.path.join(args.out, f"run-{seed}-logs")
        shutil.copytree(workdir, kept, ignore=shutil.ignore_patterns("*-data", "*-work"), dirs_exist_ok=True)
        print(f"chaos: {len(violations)} violations (seed {seed}); logs kept in {kept}")
    shutil.rmtree(workdir, ignore_errors=True)
    passed = 0 if violations else 1
    print(f"chaos: {passed} passed, {1 - passed} failed")
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    main()
