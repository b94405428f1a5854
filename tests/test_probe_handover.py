"""Issue 21: a new generation is proven by real requests over its own probe socket
before it replaces the old one (real systemd, real servers, load running)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from support.deploy import Deployment
from support.load import Load, get

HANG_AT_IMPORT = "import time\ntime.sleep(100000)\n"
READY_TIMEOUT = 10
FAILED_MASTER_GRACE = 10       # the shim's bound on stopping a failed master (shim/runtime/masters.py)
GTHREAD = 'worker_class = "gthread"\nthreads = 2'


@pytest.mark.parametrize("workers", ["sync", "gthread"])
@pytest.mark.parametrize("preload", [False, True], ids=["preload-off", "preload-on"])
def test_gunicorn_release_that_hangs_at_import_is_rolled_back(manager, tmp_path, preload, workers):
    """Issue 21's first finding: the hung workers looked ready (asleep, using no CPU), the
    reload returned 0, the old master was retired and nothing served."""
    extra = GTHREAD if workers == "gthread" else ""
    d = Deployment(manager, str(tmp_path), server="gunicorn", preload=preload,
                   shim_args=f"--ready-timeout {READY_TIMEOUT}")
    d.app.release(extra=extra)
    d.start()
    old = d.assert_main_pid_is_live_master()
    with Load(d.port, clients=4) as load:
        time.sleep(0.3)
        d.app.release(extra=extra)
        app_py = os.path.join(d.app.current, "app.py")
        with open(app_py) as f:
            text = f.read()
        with open(app_py, "w") as f:
            f.write(HANG_AT_IMPORT + text)
        t0 = time.monotonic()
        r = d.reload()
        took = time.monotonic() - t0
        time.sleep(0.5)
    assert r.returncode != 0, manager.journal_text()[-3000:]
    assert READY_TIMEOUT - 1 < took < READY_TIMEOUT + FAILED_MASTER_GRACE + 10, took
    [failed] = manager.events("reload-failed")
    assert "no answer to GET /" in failed["REASON"], failed["REASON"]
    assert failed["RESULT"] == "rolled-back"
    assert load.failures() == [], load.failure_kinds()
    assert {x.release for x in load.results} == {"r1"}
    assert get(d.port, timeout=5).release == "r1"
    assert d.assert_main_pid_is_live_master() == old
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert "no answer to GET /" in st["StatusText"] or "failed" in st["StatusText"], st
    assert not manager.events("reload-done")


@pytest.mark.parametrize("preload", [False, True], ids=["preload-off", "preload-on"])
def test_unicorn_failed_health_check_on_the_guides_config_keeps_the_old_release_exactly(manager, preload):
    """Issue 21's second finding: the rollback's HUP made the old master re-read its config,
    now the new release's, and serve from it. The check no longer needs the old workers
    stopped, so nothing is sent to the old master: it serves its own release throughout."""
    from support.classic import ClassicDeployment
    d = ClassicDeployment(manager, preload=preload, listen=False,
                          shim_args="--health-check http://shop.example/health")
    try:
        d.start()
        old = manager.main_pid()
        old_cwd = os.readlink(f"/proc/{old}/cwd")
        assert old_cwd.endswith("/releases/r1")
        with Load(d.port, clients=2) as load:
            d.release(health_status=500)
            r = d.reload()
            assert r.returncode != 0
            [failed] = manager.events("reload-failed")
            assert "health check http://shop.example/health: HTTP 500" in failed["REASON"], failed["REASON"]
            time.sleep(2)       # a config reload (HUP) would have moved the old master by now
            t = time.monotonic()
            for _ in range(10):
                assert get(d.port, timeout=5).release == "r1"
                assert d.unix_get("/health") == f"health release=r1 cwd={old_cwd}"
        assert load.failures() == [], load.failure_kinds()
        # (r2 may have answered on the shared socket between its readiness and its check)
        assert load.releases_since(t) == {"r1"}
        assert manager.main_pid() == old and os.readlink(f"/proc/{old}/cwd") == old_cwd
        assert "keeps serving the old release" in failed["MESSAGE"]
    finally:
        d.stop()


def test_health_check_runs_at_boot_and_a_failing_release_is_not_last_good(deploy, manager):
    """Issue 21: a release that failed its check at reload was booted unchecked by the next
    restart and recorded as the last good one, which erased the fallback."""
    d = deploy(service_extra="StateDirectory=app", shim_args="--health-check http://app.example/health")
    d.start()
    good = d.app.release()
    assert d.reload().returncode == 0
    bad = d.app.release(health_status=500)
    assert d.reload().returncode != 0
    with Load(d.port) as load:
        r = manager.systemctl("restart", "app.service")
        assert r.returncode == 0, r.stderr + manager.journal_text()[-2000:]
        assert get(d.port, timeout=10).release == good
        time.sleep(0.3)
    assert load.failures() == [], load.failure_kinds()
    st = d.state()
    assert st["StatusText"].startswith("degraded: serving last good release"), st
    event = manager.events("fallback")[-1]
    assert event["RELEASE"].endswith(good) and event["FAILED_RELEASE"].endswith(bad)
    assert "HTTP 500" in event["REASON"], event
    # restarted again: the bad release is still not the last good one
    assert manager.systemctl("restart", "app.service").returncode == 0
    assert get(d.port, timeout=10).release == good
    assert manager.events("fallback")[-1]["RELEASE"].endswith(good)


def test_the_classic_quit_hook_costs_no_stall_under_spawn(unicorn_deploy, manager):
    """Issue 21 item 5: with the widely copied before_fork hook verbatim (QUIT the .oldbin
    master at the first worker, then sleep 1), every reload window's worst latency was
    about 1,010 ms: the old master was gone a second before a new worker accepted. With no
    .oldbin presented, the old master serves until the shim retires it."""
    # 10 reloads in a row: a 1 s probation (the standby still taken each time; the default 5 s
    # would add 40 s to this test alone, see the README's "Tests")
    d = unicorn_deploy(ready_hook=False, seed_hook="quit-first", shim_args="--probation 1")
    d.start()
    worst = []
    with Load(d.port, clients=4) as load:
        time.sleep(0.5)
        for _ in range(10):
            name = d.app.release()
            t0 = time.monotonic()
            r = d.reload()
            t1 = time.monotonic()
            assert r.returncode == 0, r.stderr + manager.journal_text()[-2000:]
            assert get(d.port, timeout=5).release == name
            assert not os.path.exists(d.app.pid_file + ".oldbin")
            time.sleep(0.5)
            worst.append(max(x.latency for x in load.results if t0 <= x.start <= t1 + 0.2))
    assert load.failures() == [], load.failure_kinds()
    # A stall is the hook's sleep: 1 s. Anything well below is a loaded host's noise.
    assert max(worst) < 0.6, [round(w * 1000) for w in worst]
    # The shim retired each old master (the hook never reached it): each drain took time.
    assert all(int(e["RETIRE_MS"]) > 0 for e in manager.events("reload-done")), manager.events("reload-done")


def test_an_old_master_that_does_not_answer_after_a_rollback_is_not_said_to_serve(unicorn_deploy, manager):
    """Issue 21 item 3: 'keeps serving the old release' only once the old generation answered
    its own probe; else the reload says what was seen and the unit's status reads degraded."""
    d = unicorn_deploy(preload=True)
    d.start()
    old = d.assert_main_pid_is_live_master()
    workers = d.app_workers(old)
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)       # they accept nothing more: the old generation is stuck
    try:
        d.app.release(broken=True)
        r = d.reload()
        assert r.returncode != 0
        [failed] = manager.events("reload-failed")
        assert "did not answer its probe (timeout" in failed["MESSAGE"], failed["MESSAGE"]
        assert "keeps serving" not in failed["MESSAGE"]
        st = d.state()
        assert st["StatusText"].startswith(f"degraded: after a failed reload, master {old} is back in charge "
                                           "but did not answer its probe"), st
        assert int(st["MainPID"]) == old
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    good = d.app.release()                 # the next good deploy ends it
    assert d.reload().returncode == 0
    assert get(d.port, timeout=5).release == good
    assert not d.state()["StatusText"].startswith("degraded"), d.state()


def test_usr2_health_check_rollback_brings_the_old_workers_back_without_a_config_reload(unicorn_deploy, manager):
    """Under usr2 the generations share a probe socket, so the old workers are stopped
    (WINCH) for the check; the rollback brings them back one TTIN at a time. A HUP would
    re-read the config through `current`: r2's, which asks for 3 workers."""
    d = unicorn_deploy(shim_args="--upgrade usr2 --health-check http://app.example/health")
    d.start()
    old = d.assert_main_pid_is_live_master()
    with Load(d.port, clients=2) as load:
        d.app.release(health_status=500, extra="worker_processes 3")
        r = d.reload()
        assert r.returncode != 0
        [failed] = manager.events("reload-failed")
        assert "HTTP 500" in failed["REASON"] and "keeps serving the old release" in failed["MESSAGE"], failed
        t = time.monotonic()
        time.sleep(1.5)
    assert load.failures() == [], load.failure_kinds()
    assert load.releases_since(t) == {"r1"}
    assert d.assert_main_pid_is_live_master() == old
    assert len(d.app_workers(old)) == 2, d.app_workers(old)


STALL_AFTER_BOOT = """
_BOOT = time.monotonic()
_serve = application


def application(environ, start_response):
    if time.monotonic() - _BOOT > 1.0:     # a second after boot, every request hangs
        time.sleep(100)
    return _serve(environ, start_response)
"""


def test_a_release_that_stalls_after_ready_is_rolled_back_in_probation(manager, tmp_path):
    """Issue 21: a Gunicorn release whose workers stalled shortly after boot reloaded with
    rc 0 and then timed out requests for minutes. With --probation it is watched, with the
    old master still serving, and rolled back when a probe is not answered."""
    d = Deployment(manager, str(tmp_path), server="gunicorn", preload=False,
                   shim_args="--probation 6 --ready-timeout 20")
    d.start()
    old = d.assert_main_pid_is_live_master()
    good = d.app.release()
    t0 = time.monotonic()
    assert d.reload().returncode == 0               # a good release passes its probation
    assert time.monotonic() - t0 >= 6
    old = d.assert_main_pid_is_live_master()
    with Load(d.port, clients=4) as load:
        d.app.release()
        with open(os.path.join(d.app.current, "app.py"), "a") as f:
            f.write(STALL_AFTER_BOOT)
        r = d.reload()
        t = time.monotonic()
        time.sleep(1)
    assert r.returncode != 0
    [failed] = manager.events("reload-failed")
    assert "failed a probe during probation (GET /: timeout" in failed["REASON"], failed["REASON"]
    assert "keeps serving the old release" in failed["MESSAGE"]
    assert d.assert_main_pid_is_live_master() == old
    assert load.releases_since(t) == {good}
    # Requests a stalled worker had accepted are cut when its master is stopped: at most
    # one per sync worker; the rest of the load never failed.
    assert len(load.failures()) <= d.app.workers, load.failure_kinds()
