"""The history checker: what must hold after the faults heal and the cluster quiesces.

Inputs are plain data (so that the checker itself is tested on histories with bugs put in on
purpose, tests/test_check.py):
- `ops`: every call the clients made, each with `op`, `result` (ok / fail / unknown), `name`
  and `job` where known;
- `observed`: job id -> [(call start, call end, status, attempts)] as the clients saw them
  while polling;
- `views`: node -> {job id: {"name", "status", "attempts"}} read from each node at the end;
- `runs`: lines the jobs wrote: job, attempt, run token, time (ns), event.
"""

TERMINAL = {"SUCCEEDED", "FAILED"}


def parse_runs(lines):
    """(job, attempt) -> {run token: (first ns, last ns, ended)}."""
    runs = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 5:
            continue
        job, attempt, token, ns, event = parts
        per_attempt = runs.setdefault((job, int(attempt)), {})
        first, last, ended = per_attempt.get(token, (int(ns), int(ns), False))
        per_attempt[token] = (min(first, int(ns)), max(last, int(ns)), ended or event in ("end", "term"))
    return runs


def check(ops, observed, views, runs_lines, retry_attempts):
    violations = []

    def bad(kind, detail):
        violations.append({"invariant": kind, "detail": detail})

    nodes = sorted(views)
    reference = views[nodes[0]] if nodes else {}

    # Every control node answers identically.
    for node in nodes[1:]:
        ids = sorted(j for j in set(views[node]) | set(reference)
                     if views[node].get(j) != reference.get(j))
        if ids:
            bad("nodes-agree", f"{node} differs from {nodes[0]} on {len(ids)} jobs, e.g. "
                f"{[(j, views[node].get(j), reference.get(j)) for j in ids[:3]]}")

    by_name = {}
    for job_id, job in reference.items():
        by_name.setdefault(job["name"], []).append(job_id)
    submits = {}
    for op in ops:
        if op["op"] == "submit":
            submits[op["name"]] = op

    for name, op in submits.items():
        made = by_name.get(name, [])
        if op["result"] == "ok":
            # No acknowledged submit lost, on any node.
            for node in nodes:
                if op["job"] not in views[node]:
                    bad("acked-submit-lost", f"{name} ({op['job']}) acknowledged, absent on {node}")
            if len(made) > 1:
                bad("submit-applied-twice", f"{name}: {made}")
        elif op["result"] == "unknown":
            if len(made) > 1:
                bad("unknown-submit-applied-twice", f"{name}: {made}")
        elif made:
            bad("refused-submit-applied",
                f"{name} was refused ({op.get('error')}), yet jobs {made} exist")
    for name, ids in by_name.items():
        if name not in submits:
            bad("phantom-job", f"jobs {ids} named {name}, which no client submitted")

    # Every job ended, within its retry strategy.
    for job_id, job in reference.items():
        if job["status"] not in TERMINAL:
            bad("not-terminal-after-heal", f"{job_id} ({job['name']}) is {job['status']}")
        if job["attempts"] > retry_attempts:
            bad("attempts-above-strategy", f"{job_id}: {job['attempts']} > {retry_attempts}")

    # Reads are linearizable (S2). A describe returns every job acknowledged before it began
    # (a node answering from a stale replica would not), and what a read returned is never
    # undone by a read that began after it ended: a terminal status stays, attempts never go
    # down. Reads that overlap in time may be ordered either way, so only real-time order
    # counts.
    for op in ops:
        if op["op"] == "describe" and op["result"] == "ok":
            missing = sorted(set(op.get("asked", [])) - set(op.get("found", [])))
            if missing:
                bad("stale-read", f"a describe through {op['node']} missed acknowledged jobs {missing[:3]}")
    for job_id, seen in observed.items():
        seen = sorted(seen)
        for i, (_, end1, s1, a1) in enumerate(seen):
            for start2, _, s2, a2 in seen[i + 1:]:
                if start2 <= end1:
                    continue
                if s1 in TERMINAL and s2 != s1:
                    bad("terminal-changed", f"{job_id}: {s1} then {s2}")
                if a2 < a1:
                    bad("attempts-went-down", f"{job_id}: {a1} then {a2}")
        final = reference.get(job_id)
        terminal = [s for _, _, s, _ in seen if s in TERMINAL]
        if final and terminal and final["status"] != terminal[-1]:
            bad("terminal-changed", f"{job_id}: seen {terminal[-1]}, ends {final['status']}")

    # Never twice: one run per attempt, and no two runs of a job at once.
    runs = parse_runs(runs_lines)
    per_job = {}
    for (job, attempt), tokens in runs.items():
        if len(tokens) > 1:
            bad("attempt-ran-twice", f"{job} attempt {attempt} ran {len(tokens)} times")
        for first, last, _ in tokens.values():
            per_job.setdefault(job, []).append((first, last, attempt))
        if job not in reference:
            bad("run-of-unknown-job", f"{job} attempt {attempt} ran but no node holds the job")
    for job, intervals in per_job.items():
        intervals.sort()
        for (f1, l1, a1), (f2, l2, a2) in zip(intervals, intervals[1:]):
            if f2 <= l1:
                bad("runs-overlap", f"{job}: attempt {a1} ran until {l1}, attempt {a2} from {f2}")
    return violations
