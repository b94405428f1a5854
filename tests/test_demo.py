"""The README's first command: the demo runs its tour and cleans up after itself."""
from __future__ import annotations

import os
import subprocess

from support.deploy import REPO


def test_demo_tour():
    r = subprocess.run([os.path.join(REPO, "scripts", "demo"), "--no-wait"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    assert "-> r1" in out
    assert "reload app  (exit 0" in out and "curl -> r2" in out
    assert "deploy broken r3" in out and "(exit 1" in out and "curl -> r2   (the old release keeps serving)" in out
    assert ", 0 failed" in out
    assert "SHIM_EVENT=reload-failed" in out and "ActiveState=active" in out
    leftovers = subprocess.run(["pgrep", "-f", "unicorn-shim-demo"], capture_output=True, text=True).stdout
    assert leftovers == ""
