"""A Docker engine of the harness's own, for its Docker agents: restartable under running
containers (F15) without touching the machine's engine. Its socket, data and state live in
the run's directory, on a bridge of its own (never `docker0`: an engine started with
`--bridge=none` deletes the machine engine's `docker0`), with no iptables rules; the job
image is loaded from the machine's engine (tests/images/build.sh builds it there)."""

import json
import os
import shutil
import signal
import subprocess
import time

IMAGE = os.environ.get("MUSTER_TEST_IMAGE", "muster-test/busybox:1")


def run(*args, check=True, **kwargs):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kwargs)


class Engine:
    def __init__(self, workdir, subnet):
        self.dir = os.path.join(workdir, "dockerd")
        self.bridge = f"m{subnet}dk"
        self.socket = os.path.join(self.dir, "docker.sock")
        self.host = f"unix://{self.socket}"
        # Where the machine's containerd serves this engine too, its own namespaces keep the
        # two engines' containers apart.
        self.namespace = f"muster-chaos-{subnet}"
        self.proc = None
        self.restarts = 0
        os.makedirs(self.dir)
        run("ip", "link", "del", self.bridge, check=False)
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"10.{subnet}.200.1/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        with open(os.path.join(self.dir, "daemon.json"), "w") as f:
            # Without live-restore: an engine that stops stops its containers, as
            # `systemctl restart docker` does on a default install.
            json.dump({"live-restore": False}, f)
        try:
            self.up()
            saved = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
            loaded = subprocess.run(["docker", "-H", self.host, "load", "-q"], stdin=saved.stdout,
                                    capture_output=True, text=True)
            saved.stdout.close()
            if saved.wait() != 0 or loaded.returncode != 0:
                raise RuntimeError(f"loading {IMAGE} into the harness's engine: {loaded.stderr[-300:]}")
        except BaseException:
            self.cleanup()
            raise

    def up(self):
        log = open(os.path.join(self.dir, "dockerd.log"), "ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--config-file", os.path.join(self.dir, "daemon.json"),
             "--data-root", os.path.join(self.dir, "root"), "--exec-root", os.path.join(self.dir, "exec"),
             "--pidfile", os.path.join(self.dir, "dockerd.pid"), "--host", self.host,
             f"--bridge={self.bridge}", "--iptables=false", "--ip6tables=false", "--storage-driver=vfs",
             "--containerd-namespace", self.namespace, "--containerd-plugins-namespace", f"{self.namespace}-plugins"],
            stdout=log, stderr=log)
        log.close()
        deadline = time.time() + 60
        while run("docker", "-H", self.host, "info", check=False).returncode != 0:
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                raise RuntimeError("the harness's Docker engine did not start (see dockerd/dockerd.log)")
            time.sleep(0.2)

    def down(self):
        """Stops the engine as `systemctl stop docker` does: SIGTERM, then wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.proc = None

    def restart(self):
        self.down()
        self.restarts += 1
        self.up()

    def running(self):
        out = run("docker", "-H", self.host, "ps", "-q", check=False).stdout
        return len(out.split())

    def cleanup(self):
        if self.proc is not None:
            ids = run("docker", "-H", self.host, "ps", "-aq", check=False).stdout.split()
            if ids:
                run("docker", "-H", self.host, "rm", "-f", *ids, check=False)
            try:
                self.down()
            except subprocess.TimeoutExpired:
                self.proc.kill()
        # vfs layers and the exec root hold mounts until the engine is gone.
        for sub in ("root", "exec"):
            path = os.path.join(self.dir, sub)
            if os.path.isdir(path):
                run("sh", "-c", f"grep -o ' {path}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                    check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        run("ip", "link", "del", self.bridge, check=False)
