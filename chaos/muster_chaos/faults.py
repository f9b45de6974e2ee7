"""The faults, each applied to a running cluster under load and then healed. Each returns what
it did, with the figures it measured."""

import os
import time

from .cluster import API, GRPC, RAFT, SNAPSHOT_EVERY_ENTRIES
from .net import sh
from .workload import PROBE_QUEUE, classify


class Context:
    def __init__(self, cluster, net, rng, history):
        self.cluster, self.net, self.rng, self.history = cluster, net, rng, history
        self.probes = 0

    def leader(self):
        leader = self.cluster.wait_for_leader(timeout=30)
        if leader is None:
            raise RuntimeError("no leader with a quorum within 30 s")
        return leader

    def hold(self, seconds):
        time.sleep(seconds)

    def probe(self, server, timeout=30):
        """Submits a probe job through `server` until one is acknowledged, then waits for it to
        be placed; returns (accepted at, placed at), None where it did not happen in time. The
        probes are calls of the history like any other."""
        client = self.cluster.client(server, read_timeout=5)
        deadline = time.time() + timeout
        job = accepted = None
        while time.time() < deadline and job is None:
            self.probes += 1
            name = f"probe-{self.probes}"
            entry = {"op": "submit", "name": name, "node": server, "start": time.time()}
            try:
                job = client.submit_job(jobName=name, jobQueue=PROBE_QUEUE, jobDefinition="chaos",
                                        containerOverrides={"command": ["true"]})["jobId"]
                entry.update(result="ok", job=job)
                accepted = time.time()
            except Exception as e:
                entry.update(result=classify(e), error=f"{type(e).__name__}: {e}"[:300])
                time.sleep(0.05)
            entry["end"] = time.time()
            self.history.record(entry)
        if job is None:
            return None, None
        while time.time() < deadline:
            try:
                status = client.describe_jobs(jobs=[job])["jobs"][0]["status"]
                if status in ("STARTING", "RUNNING", "SUCCEEDED", "FAILED"):
                    return accepted, time.time()
            except Exception:
                pass
            time.sleep(0.02)
        return accepted, None


def leader_kill(ctx):
    """F1: SIGKILL the leader; restart it a few seconds later."""
    leader = ctx.leader()
    proc = ctx.cluster.procs[leader]
    killed = time.time()
    proc.kill()
    new = ctx.cluster.wait_for_leader(timeout=30, other_than=leader)
    elected = time.time()
    accepted, placed = ctx.probe(new) if new else (None, None)
    ctx.hold(ctx.rng.uniform(1, 4))
    proc.start()
    ms = lambda t: None if t is None else round((t - killed) * 1000)
    return {"killed": leader, "new_leader": new, "elected_ms": ms(elected if new else None),
            "first_write_ms": ms(accepted), "placed_ms": ms(placed)}


def kill_and_restart(ctx, victim, down_for):
    ctx.cluster.procs[victim].kill()
    down = ctx.rng.uniform(*down_for)
    ctx.hold(down)
    ctx.cluster.procs[victim].start()
    return {"killed": victim, "down_s": round(down, 1)}


def follower_kill(ctx):
    """F2: SIGKILL a follower; restart it after a while."""
    return kill_and_restart(ctx, ctx.rng.choice(ctx.cluster.followers(ctx.leader())), (2, 6))


def leader_pause(ctx):
    """F5: SIGSTOP the leader past the election timeout, then SIGCONT."""
    leader = ctx.leader()
    proc = ctx.cluster.procs[leader]
    proc.pause()
    ctx.hold(ctx.rng.uniform(3, 6))
    proc.resume()
    return {"paused": leader}


def agent_kill(ctx):
    """F11: SIGKILL an agent (its jobs run on); restart it, half the time only after the leader
    marked it lost and retried its jobs elsewhere (its warden must have stopped them by then)."""
    down_for = ctx.rng.choice([(1, 4), (10, 14)])
    return kill_and_restart(ctx, ctx.rng.choice(ctx.cluster.agent_names), down_for)


def agent_host_death(ctx):
    """F12: an agent's machine dies: the agent, its warden and every job it runs, killed at
    once; it comes back (its disk kept) after the leader has marked it lost and retried its
    jobs elsewhere."""
    victim = ctx.rng.choice(ctx.cluster.agent_names)
    ctx.cluster.procs[victim].kill()
    ns = ctx.net.ns(victim)
    killed = 0
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        killed += sh("kill", "-9", pid, check=False).returncode == 0
    if victim in ctx.cluster.docker_agent_names:
        # Its containers run under the engine, outside its namespace: gone with the machine.
        engine = ctx.cluster.engine
        ids = sh("docker", "-H", engine.host, "ps", "-aq", check=False).stdout.split()
        if ids:
            sh("docker", "-H", engine.host, "rm", "-f", *ids, check=False)
        killed += len(ids)
    down = ctx.rng.uniform(10, 14)
    ctx.hold(down)
    ctx.cluster.procs[victim].start()
    return {"died": victim, "processes_killed": killed, "down_s": round(down, 1)}


def leader_isolated(ctx):
    """F3: cut the leader off from the other control nodes; its agents still reach it."""
    leader = ctx.leader()
    ctx.net.isolate(leader, ctx.cluster.followers(leader))
    ctx.hold(ctx.rng.uniform(4, 8))
    ctx.net.heal()
    return {"isolated": leader}


def leader_one_way(ctx):
    """What the leader sends to the other control nodes is lost; it still hears them."""
    leader = ctx.leader()
    for other in ctx.cluster.followers(leader):
        ctx.net.drop(leader, other, one_way=True)
    ctx.hold(ctx.rng.uniform(4, 8))
    ctx.net.heal()
    return {"muted": leader}


def partial_partition(ctx):
    """F4: two control nodes cannot reach each other; both reach the third."""
    a, b = ctx.rng.sample(ctx.cluster.server_names, 2)
    ctx.net.drop(a, b)
    ctx.hold(ctx.rng.uniform(4, 8))
    ctx.net.heal()
    return {"split": [a, b]}


def flaky_follower(ctx):
    """F6 and the pre-vote case: a follower's links lose a third of their packets."""
    leader = ctx.leader()
    victim = ctx.rng.choice(ctx.cluster.followers(leader))
    for other in ctx.cluster.server_names:
        if other != victim:
            ctx.net.drop(victim, other, loss=0.35)
    ctx.hold(ctx.rng.uniform(5, 10))
    ctx.net.heal()
    return {"lossy": victim}


def slow_links(ctx):
    """F6 with delay instead of loss: one control node's links (to the other control nodes and
    to the agents) held 150–400 ms each way, with jitter, now and then a 1.5 s stall, and
    connections reset after a few seconds on average; the leader half the time."""
    leader = ctx.leader()
    victim = leader if ctx.rng.random() < 0.5 else ctx.rng.choice(ctx.cluster.followers(leader))
    delay = ctx.rng.uniform(150, 400)
    for other in ctx.cluster.server_names + ctx.cluster.agent_names:
        if other != victim:
            ctx.net.slow(victim, other, ctx.cluster.workdir, seed=ctx.rng.randrange(1 << 30),
                         delay_ms=round(delay), jitter_ms=round(delay / 2), stall_chance=0.01,
                         stall_ms=1500, reset_after_s=5.0)
    ctx.hold(ctx.rng.uniform(6, 10))
    through = ctx.net.slowed_connections()
    ctx.net.heal()
    if through == 0:
        raise RuntimeError(f"no connection went through the slow links of {victim}")
    return {"slowed": victim, "was_leader": victim == leader, "delay_ms": round(delay),
            "connections_slowed": through}


def agent_link_stalled(ctx):
    """F14 (stall): an agent's connections to every control node stall (bytes taken, never
    delivered) for 6–12 s, then are reset; its heartbeats stop arriving, so its attempts must
    stop before the leader retries them."""
    victim = ctx.rng.choice(ctx.cluster.agent_names)
    for server in ctx.cluster.server_names:
        ctx.net.slow(victim, server, ctx.cluster.workdir, seed=ctx.rng.randrange(1 << 30),
                     delay_ms=3_600_000)
    ctx.hold(ctx.rng.uniform(6, 12))
    through = ctx.net.slowed_connections()
    ctx.net.heal()
    if through == 0:
        raise RuntimeError(f"no connection of {victim} went through the stalled links")
    return {"stalled": victim, "connections_stalled": through}


def agent_cut_off(ctx):
    """F13: an agent cut off from every control node, past its stop_after (and sometimes past
    the node-lost TTL), then back."""
    victim = ctx.rng.choice(ctx.cluster.agent_names)
    for server in ctx.cluster.server_names:
        ctx.net.drop(victim, server)
    ctx.hold(ctx.rng.choice([6, 12]))
    ctx.net.heal()
    return {"cut_off": victim}


def agent_reaches_isolated_follower(ctx):
    """An agent that reaches only a follower that is itself cut off from the others."""
    leader = ctx.leader()
    follower = ctx.rng.choice(ctx.cluster.followers(leader))
    victim = ctx.rng.choice(ctx.cluster.agent_names)
    for server in ctx.cluster.server_names:
        if server != follower:
            ctx.net.drop(victim, server)
    ctx.net.isolate(follower, [s for s in ctx.cluster.server_names if s != follower])
    ctx.hold(12)
    ctx.net.heal()
    return {"agent": victim, "follower": follower}


def disk_full(ctx):
    """F8: one control node's data disk filled to the last byte, then freed."""
    victim = ctx.rng.choice(ctx.cluster.server_names)
    was_leader = victim == ctx.cluster.leader()
    # The disk itself: under a lazyfs (with unsynced_loss in the run) a filler written through
    # the data directory would only be held in memory.
    filler = os.path.join(ctx.cluster.disk_dir(victim), "filler")
    try:
        # Unbuffered: a buffered file's close would try to write its last partial chunk again,
        # fail with ENOSPC, and (as it once did) skip the freeing below, leaving the disk full.
        with open(filler, "wb", buffering=0) as f:
            chunk = b"\0" * (1 << 20)
            try:
                while True:
                    f.write(chunk)
            except OSError:
                pass
        ctx.hold(ctx.rng.uniform(5, 10))
    finally:
        os.remove(filler)
    return {"filled": victim, "was_leader": was_leader}


def docker_restart(ctx):
    """F15: the Docker agent's engine restarted under running jobs, as `systemctl restart
    docker` does (SIGTERM, then start); without live-restore it stops their containers on the
    way down. Each attempt must end with a reason and be retried per its strategy: never left
    RUNNING, never run twice. Waits up to 20 s for a container to be running first."""
    engine = ctx.cluster.engine
    if engine is None:
        raise RuntimeError("the run has no Docker agent (--docker-agents 0)")
    deadline = time.time() + 20
    while engine.running() == 0 and time.time() < deadline:
        ctx.hold(0.5)
    running = engine.running()
    began = time.time()
    engine.restart()
    return {"containers_running": running, "engine_down_s": round(time.time() - began, 1)}


def unsynced_loss(ctx):
    """F10: a control node loses power: killed, and every write its disk had not fsynced lost
    (each node's data directory is a lazyfs then, muster_chaos/lazyfs.py); back after 1-4 s.
    The leader half the time, which may have acknowledged to clients what only it held."""
    leader = ctx.leader()
    victim = leader if ctx.rng.random() < 0.5 else ctx.rng.choice(ctx.cluster.followers(leader))
    lost = ctx.cluster.power_loss(victim)
    down = ctx.rng.uniform(1, 4)
    ctx.hold(down)
    ctx.cluster.procs[victim].start()
    return {"lost_power": victim, "was_leader": victim == leader, "unsynced_bytes_lost": lost,
            "down_s": round(down, 1)}


def clock_jump(ctx):
    """F7: one control node's wall clock steps 10 minutes forward, then 20 back, then home.
    Requests signed by clients (whose clocks are right) fall outside its 5-minute SigV4
    window and are refused while it is off; nothing else may change."""
    # Half the time the leader, whose clock liveness and stamps read.
    victim = ctx.leader() if ctx.rng.random() < 0.5 else ctx.rng.choice(ctx.cluster.server_names)
    clock = ctx.cluster.clock_files.get(victim)
    if clock is None:
        raise RuntimeError("libfaketime is not installed (apt-get install faketime)")
    client = ctx.cluster.client(victim, read_timeout=5)
    refused = {}
    for offset in ("+600", "-600"):
        with open(clock, "w") as f:
            f.write(offset + "\n")
        time.sleep(2)  # libfaketime reads the file once a second
        try:
            client.describe_jobs(jobs=[])
            refused[offset] = False
        except Exception as e:
            refused[offset] = "403" in str(e) or "Signature" in str(e) or "Skew" in str(e)
        ctx.hold(ctx.rng.uniform(3, 6))
    with open(clock, "w") as f:
        f.write("+0\n")
    if not all(refused.values()):
        raise RuntimeError(f"the clock step did not take effect on {victim}: {refused}")
    return {"stepped": victim, "refused_while_off": refused}


# Crash points (crates/muster-crashpoint) a control node passes all the time, and the pass
# to crash at: a follower appends and applies what the leader sends, the leader what it
# proposes.
SERVER_CRASH_POINTS = ["log_after_write", "log_after_flush", "apply_before", "apply_after"]
# Passed only by a node that is sent a snapshot: one kept down until the leader's log has moved
# on past what it kept.
SNAPSHOT_CRASH_POINTS = ["snapshot_install_before", "snapshot_install_after"]


def leader_log_index(ctx):
    leader = ctx.cluster.wait_for_leader(timeout=10)
    gauges = ctx.cluster.gauges(leader) if leader else None
    return (gauges or {}).get("muster_raft_last_log_index")


def log_moves_past(ctx, index, timeout=120):
    """Holds until the leader's last log index is three snapshot intervals past `index`: it has
    then taken a snapshot and dropped the log a node that stopped at `index` would need (the
    workload writes it). Returns how long that took, None if it did not happen in time."""
    began = time.time()
    while time.time() < began + timeout:
        now = leader_log_index(ctx)
        if now is not None and now >= index + 3 * SNAPSHOT_EVERY_ENTRIES:
            return round(time.time() - began, 1)
        ctx.hold(0.5)
    return None


def read_from(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def crash_point(ctx):
    """F9: a process restarted with a crash point armed (MUSTER_CRASH_AT), so that it aborts
    there, between writing and flushing its log, between flushing and acknowledging, before or
    after applying, before or after installing a snapshot the leader sent, or (an agent)
    between starting an attempt and reporting it; then restarted as its supervisor would. A
    control node half the time (the leader half of those), a follower kept down until it must
    be sent a snapshot a quarter, an agent otherwise."""
    cluster = ctx.cluster
    waited_for_snapshot = None
    draw = ctx.rng.random()
    if draw < 0.5:
        leader = ctx.leader()
        victim = leader if ctx.rng.random() < 0.5 else ctx.rng.choice(cluster.followers(leader))
        point, at = ctx.rng.choice(SERVER_CRASH_POINTS), ctx.rng.randint(1, 12)
    elif draw < 0.75:
        # A follower kept down until the leader's log moved on: sent a snapshot on its return,
        # it crashes installing it.
        victim = ctx.rng.choice(cluster.followers(ctx.leader()))
        point, at = ctx.rng.choice(SNAPSHOT_CRASH_POINTS), 1
        stopped_at = (cluster.gauges(victim) or {}).get("muster_raft_last_log_index")
        if stopped_at is None:
            raise RuntimeError(f"{victim} reported no log index before it was to be stopped")
        cluster.procs[victim].kill()
        waited_for_snapshot = log_moves_past(ctx, stopped_at)
        if waited_for_snapshot is None:
            # Back up unarmed, as the heal would not bring it back before the next fault.
            cluster.procs[victim].start()
            raise RuntimeError(f"the leader's log did not move {3 * SNAPSHOT_EVERY_ENTRIES} entries past {stopped_at} in 120 s")
    else:
        victim, point, at = ctx.rng.choice(cluster.agent_names), "agent_after_start", ctx.rng.randint(1, 3)
    proc = cluster.procs[victim]
    restarts = proc.restarts
    proc.kill()
    proc.next_start_env = {"MUSTER_CRASH_AT": f"{point}:{at}"}
    said_from = os.path.getsize(proc.log_path)
    proc.start()
    armed = time.time()
    deadline = armed + 30
    while time.time() < deadline and proc.restarts == restarts:
        ctx.hold(0.1)
    crashed = proc.restarts > restarts
    if crashed:
        # A restart the harness caused: counted apart from exits nobody planned.
        proc.restarts -= 1
        proc.crashed_at_points += 1
    if not crashed:
        # Not reached in time (an agent given no work): restarted unarmed.
        proc.kill()
        proc.start()
    elif f"crashing at {point}".encode() not in read_from(proc.log_path, said_from):
        raise RuntimeError(f"{victim} exited, but not at its crash point {point}")
    return {"victim": victim, "point": f"{point}:{at}", "crashed": crashed,
            "crashed_after_s": round(time.time() - armed, 1) if crashed else None,
            **({"down_until_the_log_moved_s": waited_for_snapshot} if waited_for_snapshot is not None else {})}


def membership_change(ctx):
    """F16: under load, a control node on a spare host joins (learner, caught up, voter) and
    then the leader is removed (it hands leadership over first), as an operator replaces a
    machine; the removed node's host becomes the next spare. Membership is back to its size."""
    cluster = ctx.cluster
    leader = ctx.leader()
    via = ctx.rng.choice(cluster.server_names)
    began = time.time()
    spare = cluster.start_spare()
    new_id, old_id = cluster.node_ids[spare], cluster.node_ids[leader]
    ip = ctx.net.ip(spare)
    added = cluster.admin(via, "cluster", "add-node", "--id", str(new_id),
                          "--raft-addr", f"{ip}:{RAFT}", "--grpc-addr", f"{ip}:{GRPC}",
                          "--api-addr", f"{ip}:{API}")
    if added.returncode != 0:
        cluster.procs[spare].kill()
        raise RuntimeError(f"add-node {new_id} through {via}: {added.stderr.strip()[-300:]}")
    cluster.now_member(spare)
    voter_at = time.time()
    # Any member forwards the change to the leader; the removed leader hands over first.
    via = ctx.rng.choice([s for s in cluster.server_names if s != leader])
    removed = cluster.admin(via, "cluster", "remove-node", str(old_id))
    if removed.returncode != 0:
        raise RuntimeError(f"remove-node {old_id} through {via}: {removed.stderr.strip()[-300:]}")
    removed_at = time.time()
    cluster.now_spare(leader)
    new_leader = cluster.wait_for_leader(timeout=30)
    accepted, placed = ctx.probe(new_leader) if new_leader else (None, None)
    ms = lambda t: None if t is None else round((t - began) * 1000)
    return {"added": f"{spare} as {new_id}", "removed": f"{leader} ({old_id}, leader when the change began)",
            "voter_ms": ms(voter_at), "removed_ms": ms(removed_at),
            "first_write_after_ms": None if accepted is None else round((accepted - removed_at) * 1000),
            "placed_after_ms": None if placed is None else round((placed - removed_at) * 1000),
            "members": {n: cluster.node_ids[n] for n in cluster.server_names}}


ALL = {f.__name__: f for f in [
    leader_kill, follower_kill, leader_pause, agent_kill, agent_host_death, leader_isolated,
    leader_one_way, partial_partition, flaky_follower, slow_links, agent_link_stalled, agent_cut_off, agent_reaches_isolated_follower, disk_full,
    clock_jump, membership_change, crash_point, unsynced_loss, docker_restart,
]}
