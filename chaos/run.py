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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from muster_chaos import faults as fault_kinds  # noqa: E402
from muster_chaos.check import TERMINAL, check  # noqa: E402
from muster_chaos.cluster import API as API_PORT, Cluster  # noqa: E402
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
            jobs[job["jobId"]]["reason"] = job.get("statusReason")
    return jobs


def stalled_state(cluster, views):
    """What a post-mortem of jobs left unfinished needs: each node's Raft and scheduler
    figures as its /metrics gives them, and why each unfinished job waits, as nodes say."""
    metrics = {}
    for server in cluster.server_names:
        try:
            with urllib.request.urlopen(f"http://{cluster.net.ip(server)}:{API_PORT}/metrics", timeout=2) as r:
                metrics[server] = [line for line in r.read().decode().splitlines()
                                   if line.startswith(("muster_raft_", "muster_scheduler_placements"))]
        except Exception as e:
            metrics[server] = f"{type(e).__name__}: {e}"
    waiting = {}
    for server, v in views.items():
        for job_id, job in (v or {}).items():
            if job["status"] not in TERMINAL:
                waiting.setdefault(job_id, {})[server] = f'{job["status"]}: {job.get("reason")}'
    return {"metrics": metrics, "unfinished": dict(list(waiting.items())[:20])}


# How long the cluster may go after the heal without one more job ending (while some have not),
# and how long it may take in all. The workload keeps the agents near full, so what is left at
# the heal takes as long as the backlog needs; a bound on progress, not on the whole backlog,
# is what tells a stalled cluster from a busy one.
STALL_BOUND_S = 60
QUIESCE_BOUND_S = 300


def quiesce(cluster):
    """Reads every node until all jobs are terminal on all of them, until no more jobs ended
    for `STALL_BOUND_S`, or until `QUIESCE_BOUND_S` pass. Returns the last views read (None for
    a node that could not be read then), when they were read, and the jobs not yet ended on
    the slowest node at each read."""
    started = time.time()
    clients = {s: cluster.client(s, read_timeout=20) for s in cluster.server_names}
    progress, fewest, last_progress = [], None, started
    while True:
        views = {}
        for server, client in clients.items():
            try:
                views[server] = view(client)
            except Exception as e:
                print(f"  reading {server}: {e}", flush=True)
                views[server] = None
        now = time.time()
        # Counted only when every node answered: a node that cannot be read once would make
        # the count drop, and real progress after it would go unseen.
        left = None
        if all(v is not None for v in views.values()):
            left = max(sum(j["status"] not in TERMINAL for j in v.values()) for v in views.values())
        progress.append((round(now - started, 1), left))
        if left is not None and (fewest is None or left < fewest):
            fewest, last_progress = left, now
        done = left == 0
        if done or now - last_progress > STALL_BOUND_S or now - started > QUIESCE_BOUND_S:
            return views, now, progress
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
    # SIGTERM unwinds like Ctrl-C, so that the processes, namespaces, disks and engine are
    # cleaned up by the same `finally` blocks.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

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
    checked = False
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
        views, quiet, progress = quiesce(cluster)
        stalled = stalled_state(cluster, views) if progress[-1][1] != 0 else None
        runs = open(runs_path).read().splitlines() if os.path.exists(runs_path) else []
        for server, v in views.items():
            if v is None:
                violations.append({"invariant": "node-answers-after-heal",
                                   "detail": f"{server} could not be read {round(quiet - healed)} s after the heal"})
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
            # Jobs not yet ended on the slowest node, at each read after the heal: (s, jobs).
            "backlog_after_heal": progress[::5] + ([progress[-1]] if (len(progress) - 1) % 5 else []),
            "stalled": stalled,
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
        checked = True
    finally:
        # Cleaning up is not interrupted: a second Ctrl-C or SIGTERM would leave processes,
        # namespaces or mounts behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cluster:
            cluster.stop()
        net.cleanup()
        if not checked:
            # Interrupted or failed before the checks: nothing more is read from the disks, so
            # they go now, and the processes' logs are kept for the post-mortem.
            if cluster:
                cluster.unmount()
            kept = os.path.join(args.out, f"run-{seed}-logs")
            shutil.copytree(workdir, kept, ignore=_not_kept, dirs_exist_ok=True)
            print(f"chaos: the run did not reach its checks; logs kept in {kept}", flush=True)
            shutil.rmtree(workdir, ignore_errors=True)
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
        shutil.copytree(workdir, kept, ignore=_not_kept, dirs_exist_ok=True)
        print(f"chaos: {len(violations)} violations (seed {seed}); logs kept in {kept}")
    # Last, so that a log that shows only its tail still names what broke.
    for violation in violations:
        print(f"chaos: violation {violation['invariant']}: {violation['detail'][:600]}")
    shutil.rmtree(workdir, ignore_errors=True)
    passed = 0 if violations else 1
    print(f"chaos: {passed} passed, {1 - passed} failed")
    sys.exit(1 if violations else 0)


def _not_kept(directory, names):
    """What a kept run leaves out: the nodes' data and work directories, and anything that is
    not a plain file or directory (the lazy disks' control sockets cannot be copied)."""
    skipped = set(shutil.ignore_patterns("*-data", "*-work")(directory, names))
    for name in names:
        path = os.path.join(directory, name)
        if not (os.path.isfile(path) or os.path.isdir(path)) or os.path.islink(path):
            skipped.add(name)
    return skipped


if __name__ == "__main__":
    main()
