"""A restart after a failed deploy serves the last good release instead of
crash-looping: real systemd, a .socket unit, load running."""
from __future__ import annotations

import os
import shutil
import signal
import time

from support.load import Load, get

STATE = "StateDirectory=app"


def deploy_good_then_bad(d, manager):
    """r1 boots, r2 deploys, r3 is rejected: `current` is left on r3, as deploy tools leave it."""
    d.start()
    good = d.app.release()
    assert d.reload().returncode == 0
    bad = d.app.release(broken=True)
    assert d.reload().returncode != 0
    assert os.path.realpath(d.app.current).endswith(bad)
    return good, bad


def assert_degraded(d, manager, good, bad):
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert st["StatusText"].startswith("degraded: serving last good release"), st
    assert good in st["StatusText"] and bad in st["StatusText"], st
    event = manager.wait_events("fallback")[-1]
    assert event["RELEASE"].endswith(good) and event["FAILED_RELEASE"].endswith(bad)
    assert event["PRIORITY"] == "3" and "broken" in event["SERVER_ERROR"]
    d.assert_main_pid_is_live_master()


def test_restart_after_a_failed_deploy_serves_the_last_good_release(deploy, manager):
    d = deploy(preload=True, service_extra=STATE)
    good, bad = deploy_good_then_bad(d, manager)
    with Load(d.port) as load:
        r = manager.systemctl("restart", "app.service")
        assert r.returncode == 0, r.stderr
        assert get(d.port, timeout=10).release == good
        time.sleep(0.3)
    assert load.failures() == [], load.failure_kinds()
    assert_degraded(d, manager, good, bad)
    fixed = d.app.release()                       # the next good deploy ends the degraded state
    assert d.reload().returncode == 0
    assert get(d.port).release == fixed
    st = d.state()
    assert not st["StatusText"].startswith("degraded"), st


def test_master_killed_after_a_failed_deploy_comes_back_on_the_last_good_release(unicorn_deploy, manager):
    d = unicorn_deploy(preload=True, service_extra=STATE)
    good, bad = deploy_good_then_bad(d, manager)
    with Load(d.port) as load:
        os.kill(manager.main_pid(), signal.SIGKILL)
        st = manager.wait_for("app.service", timeout=30, NRestarts="1", ActiveState="active", SubState="running")
        assert st["NRestarts"] == "1", st
        assert get(d.port, timeout=10).release == good
    assert "ConnectionRefusedError" not in load.failure_kinds()
    assert_degraded(d, manager, good, bad)


def test_no_fallback_fails_the_start_for_good(unicorn_deploy, manager):
    """--no-fallback: the start fails visibly and the unit ends failed, not in a loop."""
    d = unicorn_deploy(preload=True, service_extra=STATE + "\nRestartPreventExitStatus=7",
                       shim_args="--no-fallback")
    deploy_good_then_bad(d, manager)
    r = manager.systemctl("restart", "app.service")
    assert r.returncode != 0
    time.sleep(1.5)                               # longer than RestartSec=: no restart follows
    st = manager.show("app.service", "ActiveState", "Result", "NRestarts", "ExecMainStatus")
    assert st["ActiveState"] == "failed" and st["ExecMainStatus"] == "7" and st["NRestarts"] == "0", st
    failed = manager.wait_events("start-failed")[-1]
    assert "broken" in failed["SERVER_ERROR"]
    assert "--no-fallback" in manager.wait_events("no-fallback")[-1]["MESSAGE"]


def test_no_fallback_when_the_last_good_release_was_deleted(unicorn_deploy, manager):
    d = unicorn_deploy(preload=True, service_extra=STATE + "\nRestartPreventExitStatus=7")
    good, _bad = deploy_good_then_bad(d, manager)
    shutil.rmtree(os.path.join(d.app.root, "releases", good))    # pruned by the deploy tool
    r = manager.systemctl("restart", "app.service")
    assert r.returncode != 0
    assert manager.show("app.service", "ActiveState")["ActiveState"] == "failed"
    assert "no longer exists" in manager.wait_events("no-fallback")[-1]["MESSAGE"]
