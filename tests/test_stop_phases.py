"""Issue 22, case 7: `systemctl stop` takes effect within seconds in every phase of
a hand-over, and leaves nothing running; an unconfirmed MAINPID barrier begins no
hand-over. Real systemd (a private user manager),
real Unicorn, load running.

The fake-process versions of these (tests/test_statemachine.py, tests/test_steps.py)
check the logic; these check what an operator sees: how long `systemctl stop`
takes, the unit's state after it, the processes left in its cgroup."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Tuple

from support.deploy import SHIM
from support.load import Load, get, wait_accepted
from support.systemd import eventually, proc_cmdline

STOP_WITHIN = 10.0      # seconds: "a second or two", with room for a loaded host


def reload_in_background(d) -> Tuple[threading.Thread, dict]:
    reloaded: dict = {}
    t = threading.Thread(target=lambda: reloaded.update(r=d.reload()), daemon=True)
    t.start()
    return t, reloaded


def stop_and_check(d, manager, reload: Tuple[threading.Thread, dict]) -> None:
    """`systemctl stop` mid-reload (with the load stopped: on its next connection the
    .socket unit would start the service again): quick, nothing left, the reload failed."""
    t0 = time.monotonic()
    r = manager.systemctl("stop", "app.service")
    took = time.monotonic() - t0
    print(f"stop took {took:.2f} s")
    assert r.returncode == 0, r.stderr
    st = d.state()
    assert st["ActiveState"] in ("inactive", "failed"), st
    assert manager.unit_processes() == [], [proc_cmdline(p) for p in manager.unit_processes()]
    assert took < STOP_WITHIN, took
    reload[0].join(30)
    assert reload[1]["r"].returncode != 0
    assert manager.events("reload-done") == []


def test_stop_during_the_old_masters_drain_does_not_wait_for_it(unicorn_deploy, manager):
    """(a) An old worker holds a 50 s request, --retire-timeout 60: the hand-over is
    draining the old master when the stop comes. The stop returns within seconds."""
    d = unicorn_deploy(shim_args="--retire-timeout 60")
    d.start()
    old = d.assert_main_pid_is_live_master()
    slow: dict = {}
    t = threading.Thread(target=lambda: slow.update(r=get(d.port, "/slow?s=50", timeout=70)), daemon=True)
    t.start()
    wait_accepted(d.port, lambda: d.app_workers(old))
    with Load(d.port, clients=2) as load:
        new = d.app.release()
        reload = reload_in_background(d)
        # draining: the new release answers, the old master is down to its one busy worker
        assert eventually(lambda: (load.releases_since(time.monotonic() - 0.5), len(d.app_workers(old))),
                          lambda got: new in got[0] and got[1] == 1, interval=0.05)[1] == 1
        assert "reloading" in d.state()["StatusText"]
    stop_and_check(d, manager, reload)


def test_stop_during_the_health_check_of_a_new_master_that_hangs(unicorn_deploy, manager, tmp_path):
    """(b) The new release's health page never answers (its worker sleeps in it): the
    stop comes while the shim waits for that answer, and returns within seconds."""
    d = unicorn_deploy(shim_args="--health-check http://127.0.0.1/health --retire-timeout 60")
    d.start()
    d.assert_main_pid_is_live_master()
    entered = tmp_path / "health-entered"
    with Load(d.port, clients=2) as load:
        # the status of r2's /health, as Ruby: says it was asked, then hangs
        d.app.release(health_status=f"(File.write({str(entered)!r}, 'x'); sleep(60); 200)")
        reload = reload_in_background(d)
        assert eventually(entered.exists, bool), d.m.journal_text()[-3000:]
        assert "reloading" in d.state()["StatusText"]
    stop_and_check(d, manager, reload)
    assert load.failures() == [], load.failure_kinds()


def test_an_unconfirmed_mainpid_barrier_begins_no_hand_over(unicorn_deploy, manager):
    """(c) A manager too busy to read the shim's MAINPID=<shim> (frozen here with SIGSTOP,
    as a swapping or wedged PID 1 would be) never closes the barrier: the reload fails
    after 5 s having started and retired nothing, the old master serves throughout,
    and once the manager reads again it still watches that master."""
    d = unicorn_deploy()
    d.start()
    old = d.assert_main_pid_is_live_master()
    old_release = get(d.port).release
    children = set(open(f"/proc/{old}/task/{old}/children").read().split())     # its workers
    with Load(d.port, clients=2) as load:
        d.app.release()
        os.kill(manager.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = subprocess.run([SHIM, "reload", "--control", os.path.join(manager.runtime_dir, "app", "control.sock")],
                               capture_output=True, text=True, timeout=60)
            took = time.monotonic() - t0
            # while the manager still has not read it: nothing started beside the old master
            assert set(open(f"/proc/{old}/task/{old}/children").read().split()) == children
        finally:
            os.kill(manager.pid, signal.SIGCONT)
        assert r.returncode != 0 and "systemd did not confirm MAINPID= moving to the shim within 5 s" in r.stderr, \
            r.stderr
        assert 5 <= took < 15, took
        st = manager.wait_for("app.service", MainPID=str(old), ActiveState="active", SubState="running")
        assert st["MainPID"] == str(old), st
        time.sleep(0.5)
    assert load.failures() == [], load.failure_kinds()
    assert load.releases_since(0) == {old_release}
    [failed] = manager.wait_events("reload-failed")
    assert failed["RESULT"] == "not-begun" and manager.events("reload-start") == []
