"""The checker catches what it is for: each test feeds it a history with one bug put in on
purpose (as a cluster that acknowledged before committing, ran an attempt twice, or let two
nodes disagree would produce) and expects that violation, and a clean history passes."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from muster_chaos.check import check  # noqa: E402


def submit(name, result, job=None):
    op = {"op": "submit", "name": name, "result": result}
    if job:
        op["job"] = job
    return op


def job(name, status="SUCCEEDED", attempts=1):
    return {"name": name, "status": status, "attempts": attempts}


def clean():
    ops = [submit("a", "ok", "j-a"), submit("b", "unknown"), submit("c", "fail"),
           {"op": "describe", "node": "s2", "result": "ok", "asked": ["j-a"], "found": ["j-a"]}]
    views = {n: {"j-a": job("a"), "j-b": job("b", "FAILED", 2)} for n in ("s1", "s2", "s3")}
    runs = [
        "j-a 1 r1 1000 start", "j-a 1 r1 2000 tick", "j-a 1 r1 3000 end",
        "j-b 1 r2 1000 start", "j-b 1 r2 1500 term",
        "j-b 2 r3 2000 start", "j-b 2 r3 2500 end",
    ]
    observed = {"j-a": [(1.0, 1.1, "RUNNING", 1), (2.0, 2.1, "SUCCEEDED", 1)]}
    return ops, observed, views, runs


def kinds(violations):
    return sorted({v["invariant"] for v in violations})


def test_a_clean_history_passes():
    assert check(*clean(), retry_attempts=3) == []


def test_an_acknowledged_submit_that_never_committed_is_caught():
    # Acknowledge before commit: the client got a job id that no node holds.
    ops, observed, views, runs = clean()
    ops.append(submit("d", "ok", "j-d"))
    assert kinds(check(ops, observed, views, runs, 3)) == ["acked-submit-lost"]


def test_an_acknowledged_submit_missing_on_one_node_is_caught():
    ops, observed, views, runs = clean()
    del views["s3"]["j-a"]
    found = kinds(check(ops, observed, views, [r for r in runs if not r.startswith("j-a")], 3))
    assert "acked-submit-lost" in found and "nodes-agree" in found


def test_an_unknown_submit_applied_twice_is_caught():
    ops, observed, views, runs = clean()
    for v in views.values():
        v["j-b2"] = job("b")
    assert kinds(check(ops, observed, views, runs, 3)) == ["unknown-submit-applied-twice"]


def test_a_refused_submit_that_was_applied_and_a_phantom_are_caught():
    ops, observed, views, runs = clean()
    for v in views.values():
        v["j-c"] = job("c")
        v["j-x"] = job("x")
    assert kinds(check(ops, observed, views, runs, 3)) == ["phantom-job", "refused-submit-applied"]


def test_an_attempt_run_twice_is_caught():
    # The agent-restart bug: the same attempt run again, one run after the other.
    ops, observed, views, runs = clean()
    runs += ["j-a 1 r9 4000 start", "j-a 1 r9 5000 end"]
    assert kinds(check(ops, observed, views, runs, 3)) == ["attempt-ran-twice"]


def test_two_attempts_running_at_once_are_caught():
    # A cut-off agent that did not stop while the job was retried elsewhere.
    ops, observed, views, runs = clean()
    runs = [r for r in runs if not r.startswith("j-b")] + [
        "j-b 1 r2 1000 start", "j-b 1 r2 3000 tick",
        "j-b 2 r3 2000 start", "j-b 2 r3 2500 end",
    ]
    assert kinds(check(ops, observed, views, runs, 3)) == ["runs-overlap"]


def test_a_terminal_status_that_changes_is_caught():
    ops, observed, views, runs = clean()
    observed["j-a"].append((3.0, 3.1, "RUNNING", 2))
    found = kinds(check(ops, observed, views, runs, 3))
    assert "terminal-changed" in found


def test_reads_that_overlap_may_be_ordered_either_way():
    ops, observed, views, runs = clean()
    # Began before the SUCCEEDED read ended: a linearizable store may answer it first.
    observed["j-a"].append((1.5, 2.5, "RUNNING", 1))
    assert check(ops, observed, views, runs, 3) == []


def test_a_read_that_misses_an_acknowledged_job_is_caught():
    ops, observed, views, runs = clean()
    # What a node answering from a replica behind the leader would return.
    ops.append({"op": "describe", "node": "s3", "result": "ok", "asked": ["j-a"], "found": []})
    assert kinds(check(ops, observed, views, runs, 3)) == ["stale-read"]


def test_jobs_left_running_and_attempts_past_the_strategy_are_caught():
    ops, _, views, runs = clean()
    observed = {}
    for v in views.values():
        v["j-a"] = job("a", "RUNNING")
        v["j-b"] = job("b", "FAILED", 4)
    assert kinds(check(ops, observed, views, runs, 3)) == ["attempts-above-strategy", "not-terminal-after-heal"]


def test_nodes_that_disagree_are_caught():
    ops, observed, views, runs = clean()
    views["s2"]["j-b"] = job("b", "FAILED", 1)
    assert kinds(check(ops, observed, views, runs, 3)) == ["nodes-agree"]
