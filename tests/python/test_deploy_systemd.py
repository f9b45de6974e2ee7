"""The systemd units of deploy/systemd, checked by systemd itself: every key known, every
hardening option valid, the command line pointing at a real binary."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.parametrize("unit", ["muster-server.service", "muster-agent.service"])
def test_unit_is_valid(unit, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here: the units cannot be verified")
    binary = os.environ.get("MUSTER_BIN") or os.path.join(REPO, "target", "debug", "muster")
    text = open(os.path.join(REPO, "deploy", "systemd", unit)).read()
    assert "/usr/local/bin/muster " in text
    # The unit as installed, but naming this checkout's binary.
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/muster ", f"{binary} "))
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                         capture_output=True, text=True)
    problems = [l for l in (out.stdout + out.stderr).splitlines()
                if l.strip() and "Documentation" not in l]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
