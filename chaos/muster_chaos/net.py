"""Hosts of the harness's own: one Linux network namespace per process, joined by veth pairs
to a bridge, and faults made with iptables inside the namespaces (drop, one-way drop, random
loss). Every address lives in the harness's own subnet; nothing else is ever a target."""

import os
import shutil
import subprocess
import sys
import time

# Where a slowed host's slow-link proxy listens, inside its namespace.
SLOW_PORT = 17999
SLOWLINK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slowlink.py")


def sh(*args, check=True):
    done = subprocess.run(args, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


class Net:
    def __init__(self, tag, subnet):
        # Names stay under the 15 characters Linux allows for an interface.
        self.tag = tag
        self.bridge = f"{tag}br"
        self.prefix = f"10.{subnet}.0"
        self.hosts = {}  # name -> (namespace, ip)
        self.proxies = {}  # name -> (Popen, log path) of the slow-link proxy in its namespace
        self.cleanup()
        sh("ip", "link", "add", self.bridge, "type", "bridge", "nf_call_iptables", "0")
        sh("ip", "addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        # Where bridged frames pass the host's iptables (br_netfilter, loaded by Docker, whose
        # FORWARD policy is DROP), the harness's bridge is let through, and only it.
        for tool in self._iptables_tools():
            sh(tool, "-I", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT", check=False)

    def add_host(self, name):
        index = len(self.hosts) + 10
        ns, ip = f"{self.tag}-{name}", f"{self.prefix}.{index}"
        veth = f"{self.tag}v{index}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"{self.prefix}.1")
        self.hosts[name] = (ns, ip)
        return ip

    def ns(self, name):
        return self.hosts[name][0]

    def ip(self, name):
        return self.hosts[name][1]

    def _rule(self, host, chain, peer_flag, peer, extra=()):
        sh("ip", "netns", "exec", self.ns(host), "iptables", "-A", chain, peer_flag,
           self.ip(peer), *extra, "-j", "DROP")

    def drop(self, a, b, one_way=False, loss=None):
        """Drops what `a` sends to `b` (and, unless `one_way`, what `b` sends to `a`); with
        `loss`, only that share of the packets, at random."""
        extra = ("-m", "statistic", "--mode", "random", "--probability", str(loss)) if loss else ()
        self._rule(a, "OUTPUT", "-d", b, extra)
        if not one_way:
            self._rule(a, "INPUT", "-s", b, extra)

    def isolate(self, host, others):
        for other in others:
            self.drop(host, other)
            self.drop(other, host)

    def slow(self, a, b, workdir, seed, delay_ms, jitter_ms=0, stall_chance=0.0, stall_ms=0,
             reset_after_s=0.0):
        """Makes the links between `a` and `b` slow both ways: what either opens to the other
        goes through a slow-link proxy in its own namespace (`slowlink.py`); connections open
        already are reset on their next packet, so that they reconnect through it."""
        for src, dst in ((a, b), (b, a)):
            if src not in self.proxies:
                log = os.path.join(workdir, f"slowlink-{src}.log")
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns(src), sys.executable, SLOWLINK,
                     "--port", str(SLOW_PORT), "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms),
                     "--stall-chance", str(stall_chance), "--stall-ms", str(stall_ms),
                     "--reset-after-s", str(reset_after_s), "--seed", str(seed)],
                    stdout=open(log, "a"), stderr=subprocess.STDOUT)
                self.proxies[src] = (proc, log)
                # Connections redirected before it listens would be refused.
                deadline = time.time() + 10
                while "listening" not in open(log).read():
                    if time.time() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"the slow-link proxy of {src} did not start: {open(log).read()[-500:]}")
                    time.sleep(0.05)
            ns, mark = self.ns(src), ("-m", "mark", "!", "--mark", "0x4d")
            sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
               "-d", self.ip(dst), *mark, "-j", "REDIRECT", "--to-ports", str(SLOW_PORT))
            sh("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-p", "tcp", "-d", self.ip(dst),
               *mark, "-m", "conntrack", "!", "--ctstate", "DNAT", "--ctdir", "ORIGINAL", "-j", "REJECT",
               "--reject-with", "tcp-reset")

    def slowed_connections(self):
        """How many connections went through the slow-link proxies so far."""
        total = 0
        for _, log in self.proxies.values():
            try:
                total += sum(1 for line in open(log) if line.startswith("connection "))
            except OSError:
                pass
        return total

    def heal(self):
        for ns, _ in self.hosts.values():
            sh("ip", "netns", "exec", ns, "iptables", "-F", check=False)
            sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-F", check=False)
        # Connections through a proxy end with it, and reconnect directly.
        for proc, _ in self.proxies.values():
            proc.kill()
            proc.wait()
        self.proxies = {}

    @staticmethod
    def _iptables_tools():
        return [t for t in ("iptables", "iptables-legacy") if shutil.which(t)]

    def cleanup(self):
        for tool in self._iptables_tools():
            while sh(tool, "-D", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT",
                     check=False).returncode == 0:
                pass
        listed = sh("ip", "netns", "list", check=False).stdout.split()
        for ns in listed:
            if ns.startswith(f"{self.tag}-"):
                # What still runs there (a job a killed agent left) would keep the namespace,
                # and its veth, alive after `del`.
                for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                    sh("kill", "-9", pid, check=False)
                sh("ip", "netns", "del", ns, check=False)
        for line in sh("ip", "-o", "link", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(f"{self.tag}v"):
                sh("ip", "link", "del", name, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        # A deleted namespace's veth ends go away asynchronously: wait for the names to be free.
        deadline = time.time() + 15
        while time.time() < deadline and f"{self.tag}v" in sh("ip", "-o", "link", check=False).stdout:
            time.sleep(0.1)
