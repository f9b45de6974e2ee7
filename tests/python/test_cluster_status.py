"""`muster cluster status` against `muster dev`, as a script reads it: a JSON object with the
leader's id and every member's id, role, vote and indexes; and the table, exit code 0 while a
leader holds a quorum."""

import json
import subprocess


def test_status_json_names_the_leader_and_every_member(dev):
    out = subprocess.run([dev.binary, "cluster", "status", "--output", "json"], env=dev.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    members = status["members"]
    assert sorted(m["id"] for m in members) == [1, 2, 3]
    leaders = [m for m in members if m["role"] == "leader"]
    assert [m["id"] for m in leaders] == [status["leader"]]
    for m in members:
        assert m["role"] in ("leader", "follower", "learner")
        assert m["voter"] is True
        assert isinstance(m["last_log_index"], int)
        assert m["applied_index"] <= m["last_log_index"]
    assert status["quorum"] is True
    assert status["agents"].get("READY", 0) >= 1


def test_status_table_exits_zero_with_a_quorum(dev):
    out = subprocess.run([dev.binary, "cluster", "status"], env=dev.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split()[:3] == ["ID", "ROLE", "VOTER"]
    assert "quorum: true" in out.stdout
