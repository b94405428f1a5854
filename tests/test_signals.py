"""Whatever an operator or logrotate sends the unit, the shim neither dies nor
lies: real systemd, real servers, load running."""
from __future__ import annotations

import os
import signal
import time

import pytest

from support.load import Load, get
from support.systemd import is_shim


def shim_pid(manager) -> int:
    return [p for p in manager.unit_processes() if is_shim(p)][0]


@pytest.mark.parametrize("sig", ["USR1", "TTIN", "TTOU", "WINCH"])
def test_systemctl_kill_reaches_the_server_and_the_shim_lives(deploy, manager, server, sig):
    """The logrotate postrotate step (`systemctl kill -s USR1 app`, every process of
    the unit) and the worker count signals: the shim survives, says so, and the next
    reload works."""
    d = deploy()
    d.start()
    shim = shim_pid(manager)
    with Load(d.port) as load:
        r = manager.systemctl("kill", "-s", sig, "app.service")
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
        assert shim in manager.unit_processes()
        st = d.state()
        assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
        name = d.app.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr
        assert get(d.port).release == name
    assert load.failures() == [], load.failure_kinds()
    assert any(sig in e["MESSAGE"] for e in manager.wait_events("signal"))
    if sig == "USR1" and server == "unicorn":
        assert "reopening logs" in manager.wait_journal("reopening logs")


def test_signals_that_would_end_or_freeze_the_shim_do_not(unicorn_deploy, manager):
    d = unicorn_deploy()
    d.start()
    shim = shim_pid(manager)
    for sig in (signal.SIGALRM, signal.SIGTSTP, signal.SIGPWR, signal.SIGVTALRM, signal.SIGTTIN):
        os.kill(shim, sig)
    time.sleep(0.5)
    with open(f"/proc/{shim}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] == "S"      # alive, and not stopped
    name = d.app.release()
    assert d.reload().returncode == 0
    assert get(d.port).release == name
    assert len(manager.wait_events("signal", 5)) == 5


def test_usr2_to_the_shim_is_a_reload(unicorn_deploy, manager):
    d = unicorn_deploy()
    d.start()
    name = d.app.release()
    os.kill(shim_pid(manager), signal.SIGUSR2)
    assert manager.wait_events("reload-done")
    assert get(d.port).release == name
    d.assert_main_pid_is_live_master()
