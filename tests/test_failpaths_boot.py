"""A boot that fails for a while: after a reboot the database comes up a few seconds
late. The deployed release is also the last that served, so there is nothing to fall
back to; the shim tries it again with a bounded backoff, says so in STATUS= and the
journal, and serves once the dependency is there. Exit 7 (which the shipped units'
RestartPreventExitStatus=7 never retries) stays for a release that never served.
Real systemd (a private user manager), real Unicorn, a .socket unit, load running."""
from __future__ import annotations

import os
import threading
import time

from support.load import Load, get

# What the shipped units set, and a state directory for the last good release.
UNIT = "StateDirectory=app\nRestartPreventExitStatus=7"


def needs(flag: str) -> str:
    """Unicorn config lines: the master fails at boot while `flag` does not exist (the database)."""
    return f'raise "database not reachable ({flag} missing)" unless File.exist?("{flag}")'


def test_a_boot_failing_until_its_database_is_up_is_retried(unicorn_deploy, manager, tmp_path):
    flag = str(tmp_path / "database-up")
    open(flag, "w").close()
    d = unicorn_deploy(service_extra=UNIT)
    d.app.release(extra=needs(flag))
    d.start()
    name = get(d.port).release
    os.unlink(flag)                                  # the reboot: the database is not up yet
    with Load(d.port) as load:
        restart = {}
        t = threading.Thread(target=lambda: restart.update(r=manager.systemctl("restart", "app.service")))
        t.start()
        deadline = time.monotonic() + 20
        while not (st := d.state())["StatusText"].startswith("starting: retrying in"):
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        assert "database not reachable" in st["StatusText"] and "attempt 2 of 6" in st["StatusText"], st
        time.sleep(3)
        open(flag, "w").close()                      # the database is up
        t.join(120)
        assert restart["r"].returncode == 0, restart["r"].stderr
        assert get(d.port).release == name
    assert load.failures() == [], load.failure_kinds()
    st = manager.show("app.service", "ActiveState", "SubState", "NRestarts", "StatusText")
    assert (st["ActiveState"], st["SubState"], st["NRestarts"]) == ("active", "running", "0"), st
    assert st["StatusText"].startswith("serving"), st
    retries = manager.wait_events("boot-retry", 2)
    assert len(retries) >= 2 and all(e["PRIORITY"] == "4" for e in retries), retries
    assert "database not reachable" in retries[0]["SERVER_ERROR"], retries[0]
    assert manager.events("start-failed") == []
    d.assert_main_pid_is_live_master()


def test_a_release_that_never_served_is_not_retried(unicorn_deploy, manager, tmp_path):
    """A first install whose release cannot boot: exit 7 at once, the unit ends failed, no retry."""
    d = unicorn_deploy(service_extra=UNIT)
    d.app.release(broken=True, preload=True)
    r = d.start(check=False)
    assert r.returncode != 0
    st = manager.wait_for("app.service", timeout=30, ActiveState="failed")
    st = manager.show("app.service", "ActiveState", "ExecMainStatus", "NRestarts")
    assert (st["ExecMainStatus"], st["NRestarts"]) == ("7", "0"), st
    assert manager.events("boot-retry") == []


def test_a_dependency_down_for_longer_ends_in_exit_11_which_systemd_retries(unicorn_deploy, manager, tmp_path):
    """Six failed tries of the release that served: exit 11, not 7, so Restart= goes on; the app
    serves once the dependency is up."""
    flag = str(tmp_path / "database-up")
    open(flag, "w").close()
    d = unicorn_deploy(service_extra=UNIT)
    name = d.app.release(extra=needs(flag))
    d.start()
    os.unlink(flag)
    r = manager.systemctl("restart", "--no-block", "app.service")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 120
    while (st := manager.show("app.service", "NRestarts"))["NRestarts"] == "0":
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    text = manager.wait_journal("status=11/")
    assert "status=11/" in text, text[-3000:]          # systemd: "Main process exited, code=exited, status=11/n/a"
    failed = manager.wait_events("start-failed")[-1]
    assert "failed 6 times" in failed["MESSAGE"] and "database not reachable" in failed["SERVER_ERROR"], failed
    open(flag, "w").close()
    st = manager.wait_for("app.service", timeout=60, ActiveState="active", SubState="running")
    assert get(d.port).release == name
