"""The shim's own death in steady state (kill -9): the master serves on, but nothing
supervises it and no reload can work. The next reload says so, in its error line and
in the unit's STATUS=, and a restart brings supervision back, with load running.
Real systemd (a private user manager; the same tests run on systemd 257 in a booted
Debian 13 container: tests/test_failpaths_trixie.py)."""
from __future__ import annotations

import os
import signal
import time

from support.load import Load, get
from support.systemd import proc_cmdline


def wait_status(d, prefix: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while not (st := d.state())["StatusText"].startswith(prefix):
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    return st


def test_a_dead_shim_is_named_in_status_and_by_the_next_reload(unicorn_deploy, manager):
    d = unicorn_deploy()
    d.start()
    with open(os.path.join(manager.runtime_dir, "app", "shim.pid")) as f:
        shim = int(f.read().split()[0])            # what the client reads too
    assert "unicorn-shim" in proc_cmdline(shim)
    master = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        os.kill(shim, signal.SIGKILL)
        d.app.release()
        r = d.reload()
        assert r.returncode != 0
        st = wait_status(d, "supervision lost")
        assert st["StatusText"] == (f"supervision lost: the shim (pid {shim}) died; master {master} serves on "
                                    "unsupervised; reloads fail until a restart (systemctl restart app.service)"), st
        assert (st["ActiveState"], int(st["MainPID"])) == ("active", master), st
        text = manager.wait_journal(f"the shim (pid {shim}) died")
        assert f"the shim (pid {shim}) died; master {master} serves on, but reloads cannot work: " \
               "systemctl restart app.service" in text, text[-2000:]
        assert d.reload().returncode != 0          # every later reload says the same, until a restart
        r = manager.systemctl("restart", "app.service")
        assert r.returncode == 0, r.stderr
        st = wait_status(d, "serving")
        new = d.assert_main_pid_is_live_master()
        assert new != master
        name = d.app.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr
        assert get(d.port).release == name
    assert load.failures() == [], load.failure_kinds()
