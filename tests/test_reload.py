"""Issue 3: zero-downtime `systemctl reload` under real systemd, real Unicorn, real load."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from support.deploy import SHIM
from support.load import Load, get
from support.systemd import eventually


def reload_and_check(d, load, expect_release: str) -> None:
    """One good deploy: reload exits 0, the new release serves, MainPID is the live master."""
    before = d.m.main_pid()
    r = d.reload()
    assert r.returncode == 0, r.stderr + d.m.journal_text()[-2000:]
    t = time.monotonic()
    assert get(d.port, timeout=5).release == expect_release
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    master = d.assert_main_pid_is_live_master()
    assert master != before
    time.sleep(0.3)
    assert load.releases_since(t + 0.05) == {expect_release}


def test_twenty_reloads_under_load_lose_nothing(deploy, manager):
    # 20 reloads in a row: a 1 s probation (the standby still taken each time; the default 5 s
    # would add 80 s to this test alone, see the README's "Tests")
    d = deploy(shim_args="--probation 1")
    d.start()
    with Load(d.port, clients=4) as load:
        for _ in range(20):
            name = d.app.release()
            reload_and_check(d, load, name)
    assert load.failures() == [], load.failure_kinds()
    assert load.ok_count() > 200
    done = manager.wait_events("reload-done", 20)
    assert [int(e["GENERATION"]) for e in done] == list(range(2, 22))
    stop = d.stop()
    assert stop.returncode == 0
    st = d.state()
    assert (st["ActiveState"], st["Result"]) == ("inactive", "success")
    assert manager.unit_processes() == []


@pytest.mark.parametrize("socket_unit,preload,seed_hook,ready_hook", [
    (False, True, False, True),
    (True, False, False, True),
    (True, True, True, True),
    (True, False, True, False),
], ids=["listen-preload", "socket-nopreload", "seedhook-preload", "seedhook-nopreload-heuristic"])
def test_reloads_in_every_setup(unicorn_deploy, manager, socket_unit, preload, seed_hook, ready_hook):
    d = unicorn_deploy(socket_unit=socket_unit, preload=preload, seed_hook=seed_hook, ready_hook=ready_hook)
    d.start()
    with Load(d.port, clients=4) as load:
        for _ in range(3):
            reload_and_check(d, load, d.app.release())
    assert load.failures() == [], load.failure_kinds()
    assert "Supervising process" not in manager.journal_text()


def rollback(d, manager, load, *, reason, release_kw=None):
    """A bad deploy: reload fails naming the reason; the old release keeps serving."""
    good = d.app.count and f"r{d.app.count}"
    old_master = d.assert_main_pid_is_live_master()
    d.app.release(**(release_kw or {}))
    before = len(manager.events("reload-failed"))
    r = d.reload()
    assert r.returncode != 0
    failed = manager.wait_events("reload-failed", before + 1)
    reasons = (reason,) if isinstance(reason, str) else reason
    assert failed and any(r in failed[-1]["REASON"] for r in reasons), failed[-1:]
    assert get(d.port, timeout=5).release == good
    assert d.assert_main_pid_is_live_master() == old_master
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert "failed" in st["StatusText"]
    return failed[-1]


@pytest.mark.parametrize("socket_unit,preload,ready_hook", [
    (True, True, True), (False, False, False)], ids=["socket-preload-hook", "listen-nopreload-heuristic"])
def test_reloads_in_other_setups(deploy, manager, socket_unit, preload, ready_hook):
    d = deploy(socket_unit=socket_unit, preload=preload, ready_hook=ready_hook)
    d.start()
    with Load(d.port, clients=4) as load:
        for _ in range(3):
            reload_and_check(d, load, d.app.release())
    assert load.failures() == [], load.failure_kinds()


def test_usr2_upgrade_for_unicorn(unicorn_deploy, manager):
    """Unicorn's own re-exec (the default is spawn): the new master is the old one's
    child until the old one exits; with the common hook, which QUITs the old master."""
    d = unicorn_deploy(shim_args="--upgrade usr2", seed_hook=True)
    d.start()
    with Load(d.port, clients=4) as load:
        for _ in range(3):
            reload_and_check(d, load, d.app.release())
        rollback(d, manager, load, reason="exited", release_kw={"broken": True})
    assert load.failures() == [], load.failure_kinds()
    assert [e["MESSAGE"].split("(")[1].split(")")[0] for e in manager.wait_events("reload-start", 4)] == ["usr2"] * 4


def test_rollback_when_new_master_dies(deploy, manager):
    d = deploy(preload=True)
    d.start()
    with Load(d.port) as load:
        rollback(d, manager, load, reason="exited", release_kw={"broken": True})
        reload_and_check(d, load, d.app.release())     # and the next good deploy goes through
    assert load.failures() == [], load.failure_kinds()


def test_rollback_when_new_master_dies_with_seed_hook(unicorn_deploy, manager):
    d = unicorn_deploy(preload=True, seed_hook=True)
    d.start()
    with Load(d.port) as load:
        rollback(d, manager, load, reason="exited", release_kw={"broken": True})
        reload_and_check(d, load, d.app.release())     # and the next good deploy goes through
    assert load.failures() == [], load.failure_kinds()


def test_rollback_when_workers_crash_loop(deploy, manager, server):
    """Unicorn and Puma without preload respawn crashing workers forever; Gunicorn's
    arbiter exits when a worker fails to boot, or, when two fail at once, halts for
    graceful_timeout with one left unreaped. Either way: rejected in seconds."""
    d = deploy(preload=False, shim_args="--ready-timeout 60")
    d.start()
    with Load(d.port) as load:
        t = time.monotonic()
        rollback(d, manager, load, reason=("exited", "unreaped") if server == "gunicorn" else "crash-looping",
                 release_kw={"broken": True})
        assert time.monotonic() - t < 20     # counted deaths, not the 60 s timeout (a loaded host takes seconds)
    assert load.failures() == [], load.failure_kinds()


def test_rollback_when_not_ready_in_time(deploy, manager):
    d = deploy(shim_args="--ready-timeout 3")
    d.start()
    with Load(d.port) as load:
        rollback(d, manager, load, reason="not ready within 3 s",
                 release_kw={"extra": d.app.never_ready()})
    assert load.failures() == [], load.failure_kinds()
    assert len(d.master_pids()) == 1


def test_rollback_when_health_check_fails(deploy, manager):
    d = deploy()
    d.shim_args += f" --health-check http://127.0.0.1:{d.port}/health"
    d.start()
    with Load(d.port) as load:
        reload_and_check(d, load, d.app.release())     # a healthy release passes the check
        rollback(d, manager, load, reason="HTTP 500", release_kw={"health_status": 500})
        time.sleep(0.5)
    assert load.failures() == [], load.failure_kinds()
    # the old master got its workers back: it still answers with several workers
    assert "2 workers" in eventually(d.state, lambda st: "2 workers" in st["StatusText"])["StatusText"]


def test_back_to_back_reloads_both_run(deploy, manager):
    """systemd runs one reload job of a unit at a time; a deploy tool calling
    `unicorn-shim reload` directly meanwhile is queued by the shim, not dropped."""
    d = deploy()
    d.start()
    control = os.path.join(manager.runtime_dir, "app", "control.sock")
    with Load(d.port) as load:
        d.app.release(extra=d.app.slow_boot(2))     # the first hand-over is in flight when the second comes
        results = {}
        first = threading.Thread(target=lambda: results.update(systemctl=d.reload()))
        first.start()
        manager.wait_events("reload-start")
        results["direct"] = subprocess.run([SHIM, "reload", "--control", control],
                                           capture_output=True, text=True, timeout=120)
        first.join()
    assert results["systemctl"].returncode == 0, results["systemctl"].stderr
    assert results["direct"].returncode == 0, results["direct"].stderr
    # the direct request waited for the hand-over in flight, then ran its own
    assert "reloaded: generation 3" in results["direct"].stdout
    assert [int(e["GENERATION"]) for e in manager.wait_events("reload-done", 2)] == [2, 3]
    assert manager.wait_events("reload-queued")
    assert load.failures() == []
    d.assert_main_pid_is_live_master()
