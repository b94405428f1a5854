"""Issue 2: boot under a real systemd with real Unicorn; MAINPID, READY, stop, crash."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from support.load import Load, get, wait_accepted
from support.systemd import eventually, proc_cmdline, proc_environ

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("socket_unit", [True, False], ids=["socket-unit", "listen"])
def test_start_returns_only_when_serving(deploy, manager, socket_unit):
    d = deploy(socket_unit=socket_unit)
    d.start()
    r = get(d.port, timeout=5)            # the very first request after start returns
    assert r.error is None and r.release == "r1"
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running")
    master = d.assert_main_pid_is_live_master()
    assert f"master {master}" in st["StatusText"] and "2 workers" in st["StatusText"]
    assert "releases/r1" in st["StatusText"]


def test_master_gets_sockets_not_the_shims_environment(deploy, manager, server):
    d = deploy(socket_unit=True, service_extra="WatchdogSec=30")
    d.start()
    master = d.assert_main_pid_is_live_master()
    env = proc_environ(master)
    for private in ("NOTIFY_SOCKET", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert private not in env
    # fd 3: the held socket; fd 4: the master's own probe socket (issue 21)
    if server == "unicorn":
        assert env["UNICORN_FD"] == "3,4" and "LISTEN_FDS" not in env and "LISTEN_PID" not in env
        assert os.readlink(f"/proc/{master}/fd/3").startswith("socket:")
        assert os.readlink(f"/proc/{master}/fd/4").startswith("socket:")
    else:   # sd_listen_fds() in the master: LISTEN_PID must be the master's own pid
        assert (env["LISTEN_FDS"], env["LISTEN_PID"]) == ("2", str(master))
    assert get(d.port, timeout=5).error is None


def test_config_reload_keeps_the_held_socket(unicorn_deploy, manager):
    """Unicorn's HUP drops inherited sockets its config does not name: the shim names them."""
    d = unicorn_deploy(socket_unit=True)
    d.start()
    master = d.assert_main_pid_is_live_master()
    assert f"-l127.0.0.1:{d.port}" in proc_cmdline(master)
    with Load(d.port, clients=2) as load:
        os.kill(master, signal.SIGHUP)
        time.sleep(2)
    assert load.failures() == [] and load.ok_count() > 0
    assert get(d.port, timeout=5).error is None
    assert d.m.main_pid() == master


def test_ready_hook_reports_within_100ms(unicorn_deploy, manager):
    """Unicorn logs `worker=N ready` from the same place the hook reports."""
    d = unicorn_deploy(workers=3)
    d.start()
    def worker_ready(entries):
        return [int(e["__REALTIME_TIMESTAMP"]) for e in entries
                if "worker=" in str(e.get("MESSAGE")) and " ready" in str(e.get("MESSAGE"))]

    def shim_ready(entries):
        return [e for e in entries if e.get("SHIM_EVENT") == "ready"]
    entries = eventually(lambda: manager.journal(unit="app.service"),
                         lambda es: len(worker_ready(es)) >= 3 and shim_ready(es))
    worker_ready, shim_ready = worker_ready(entries), shim_ready(entries)
    assert len(worker_ready) == 3 and len(shim_ready) == 1
    assert "hook" in shim_ready[0]["MESSAGE"]
    delay = (int(shim_ready[0]["__REALTIME_TIMESTAMP"]) - max(worker_ready)) / 1e6
    assert delay < 0.1, delay


def test_heuristic_readiness_without_hook(deploy, manager):
    d = deploy(ready_hook=False)
    d.start()
    assert get(d.port, timeout=5).release == "r1"
    ready = manager.wait_events("ready")
    assert len(ready) == 1 and "heuristic" in ready[0]["MESSAGE"]


@pytest.mark.parametrize("socket_unit", [True, False], ids=["socket-unit", "listen"])
def test_master_crash_is_seen_by_systemd_and_restarted(deploy, manager, socket_unit):
    d = deploy(socket_unit=socket_unit)
    d.start()
    master = d.assert_main_pid_is_live_master()
    with Load(d.port, clients=4) as load:
        time.sleep(0.5)
        os.kill(master, signal.SIGKILL)
        st = manager.wait_for("app.service", timeout=30, NRestarts="1", ActiveState="active",
                              SubState="running")
        assert st["NRestarts"] == "1", st
        time.sleep(1.0)
    text = manager.wait_journal("Main process exited, code=killed, status=9/KILL")
    assert "Main process exited, code=killed, status=9/KILL" in text
    new_master = d.assert_main_pid_is_live_master()
    assert new_master != master
    if socket_unit:
        assert load.failures() == [], load.failure_kinds()
    assert load.ok_count() > 0


def test_stop_is_graceful_and_leaves_nothing(deploy, manager):
    """KillSignal= is the server's graceful stop (Unicorn QUIT, Gunicorn TERM): every
    process gets it, the shim included, and a request in flight completes."""
    d = deploy()
    d.start()
    result = {}
    t = threading.Thread(target=lambda: result.update(r=get(d.port, "/slow?s=2", timeout=10)))
    t.start()
    wait_accepted(d.port, manager.unit_processes)
    stop = manager.systemctl("stop", "app.service")
    t.join()
    assert stop.returncode == 0
    assert result["r"].error is None, result["r"].error
    st = d.state()
    assert (st["ActiveState"], st["Result"]) == ("inactive", "success"), st
    assert manager.unit_processes() == []
    stopping = manager.wait_events("stopping")
    assert len(stopping) == 1


def test_ready_hook_is_used(deploy, manager):
    d = deploy(workers=3)
    d.start()
    ready = manager.wait_events("ready")
    assert len(ready) == 1 and "ready with 3 workers" in ready[0]["MESSAGE"] and "hook" in ready[0]["MESSAGE"]


def test_start_fails_when_master_never_ready(deploy, manager):
    d = deploy(shim_args="--ready-timeout 3", service_extra="Restart=no")
    d.app.release(extra=d.app.never_ready())
    r = d.start(check=False)
    assert r.returncode != 0
    st = d.state()
    assert st["ActiveState"] == "failed", st
    assert "not ready within 3 s" in manager.wait_journal("not ready within 3 s")
    assert manager.unit_processes() == []


def test_start_fails_when_master_dies(deploy, manager):
    d = deploy(service_extra="Restart=no")
    d.app.release(broken=True)
    r = d.start(check=False)
    assert r.returncode != 0
    assert d.state()["ActiveState"] == "failed"
    text = manager.wait_journal("start failed: master", "before it was ready")
    assert "start failed: master" in text and "before it was ready" in text
    assert manager.unit_processes() == []


def test_example_units_verify(tmp_path):
    """systemd-analyze verify passes on the shipped examples (with the checkout's
    unicorn-shim standing in for /usr/bin/unicorn-shim, which verify requires to exist)."""
    units = []
    for name in sorted(os.listdir(os.path.join(REPO, "units"))):
        if name.endswith((".service", ".socket")) and "@" not in name:   # templates: see test_package
            text = open(os.path.join(REPO, "units", name)).read()
            (tmp_path / name).write_text(text.replace("/usr/bin/unicorn-shim",
                                                      os.path.join(REPO, "bin", "unicorn-shim")))
            units.append(str(tmp_path / name))
    assert len(units) >= 3
    r = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    assert r.returncode == 0, r.stdout + r.stderr
    # verify exits 0 on directives it ignores: any line about our files is a defect.
    ours = [line for line in (r.stdout + r.stderr).splitlines()
            if str(tmp_path) in line or line.split(":")[0] in {os.path.basename(u) for u in units}]
    assert ours == []
