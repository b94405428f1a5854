"""The shim's own death in steady state (kill -9): the master serves on, and the
watcher the shim left in the unit's cgroup starts a new shim that adopts it at
once, so STATUS never claims a supervision that is gone and the next reload
works, with load running and no request lost. A stop or a restart never adopts.
Real systemd (a private user manager; the same tests run on systemd 257 in a
booted Debian 13 container: tests/test_failpaths_trixie.py)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from support.classic import classic  # noqa: F401 (a fixture)
from support.load import Load, get
from support.systemd import eventually, exited, is_shim
from test_failpaths_classic import STATE, wait_serving
from test_reload_trigger import trigger_lines

ADOPT_WITHIN = 2.0       # seconds from the kill to STATUS saying what happened


def shim_pid(d, manager) -> int:
    with open(os.path.join(manager.runtime_dir, "app", "shim.pid")) as f:
        pid = int(f.read().split()[0])            # what the reload client reads too
    assert is_shim(pid), pid
    return pid


def kill_and_wait_adopted(d, manager, shim: int, master: int) -> int:
    """kill -9 the shim; STATUS says within ADOPT_WITHIN that a new shim adopted `master`."""
    os.kill(shim, signal.SIGKILL)
    t0 = time.monotonic()
    said = f"(adopted after the shim (pid {shim}) died)"
    st = eventually(d.state, lambda st: said in st["StatusText"], timeout=10, interval=0.02)
    took = time.monotonic() - t0
    assert took < ADOPT_WITHIN, (took, st, manager.journal_text()[-3000:])
    assert f"serving: master {master}, " in st["StatusText"], st       # after "degraded: …; " if it was
    assert (st["ActiveState"], int(st["MainPID"])) == ("active", master), st
    event = manager.wait_events("adopted", OLD_SHIM_PID=shim)[-1]
    assert event["MASTER_PID"] == str(master) and "it answered its probe" in event["MESSAGE"], event
    new = eventually(lambda: shim_pid(d, manager), lambda pid: pid != shim)
    assert new in manager.unit_processes() and exited(shim)
    return new


@pytest.mark.parametrize("socket_unit", [True, False], ids=["socket-unit", "listen"])
def test_a_killed_shim_is_adopted_and_the_next_reload_works(deploy, manager, socket_unit):
    d = deploy(socket_unit=socket_unit)
    d.start()
    shim = shim_pid(d, manager)
    master = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        adopter = kill_and_wait_adopted(d, manager, shim, master)
        assert manager.events("adopt-failed") == []
        name = d.app.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr + manager.journal_text()[-3000:]
        new = d.assert_main_pid_is_live_master()
        assert new != master and exited(master)
        assert get(d.port).release == name
        st = d.state()
        assert st["StatusText"].startswith(f"serving: master {new}, ") and "(adopted after" not in st["StatusText"], st
        # The adopting shim left its own watcher: a second death is adopted as well.
        kill_and_wait_adopted(d, manager, adopter, new)
        assert get(d.port).release == name
    assert load.ok_count() > 0
    assert load.failures() == [], load.failure_kinds()
    assert d.stop().returncode == 0
    assert manager.unit_processes() == []


@pytest.mark.parametrize("socket_unit", [True, False], ids=["socket-unit", "listen"])
def test_the_packaged_units_reload_through_the_adopting_shim(unicorn_deploy, manager, socket_unit):
    """units/app.service's shape: a StateDirectory=, and ExecReload= signals the pid in
    shim.pid, then `reload --signalled` reports: both reach the shim that adopted."""
    d = unicorn_deploy(socket_unit=socket_unit, service_extra=trigger_lines() + "StateDirectory=app\n")
    d.start()
    master = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        adopter = kill_and_wait_adopted(d, manager, shim_pid(d, manager), master)
        name = d.app.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr + manager.journal_text()[-3000:]
        assert get(d.port).release == name
        assert manager.wait_events("signal")[-1]["_PID"] == str(adopter)
        d.app.release(broken=True)
        assert d.reload().returncode != 0              # a bad release is still rolled back
        assert get(d.port).release == name
    assert load.failures() == [], load.failure_kinds()
    assert d.stop().returncode == 0
    assert manager.unit_processes() == []


def test_a_stop_or_a_restart_never_adopts(unicorn_deploy, manager):
    """The watcher outlives a signal sent to every process of the unit that is not a
    stop (`systemctl kill -s USR1`: reopen the logs) and leaves with the shim on a stop
    or a restart: nothing adopts then, nothing stays behind."""
    d = unicorn_deploy()
    d.start()
    master = d.assert_main_pid_is_live_master()
    r = manager.systemctl("kill", "-s", "USR1", "app.service")
    assert r.returncode == 0, r.stderr
    with Load(d.port) as load:
        kill_and_wait_adopted(d, manager, shim_pid(d, manager), master)
    assert load.failures() == [], load.failure_kinds()
    for _ in range(2):
        r = manager.systemctl("restart", "app.service")
        assert r.returncode == 0, r.stderr
        assert d.assert_main_pid_is_live_master() != master
    assert d.stop().returncode == 0
    assert manager.unit_processes() == []
    time.sleep(ADOPT_WITHIN)       # an adoption would have said so well within this
    assert len(manager.events("supervision-lost")) == 1 and len(manager.events("adopted")) == 1
    assert manager.events("watcher-gone") == [] and manager.events("watcher-error") == []   # the stop's signal ends it
    assert "(adopted after" not in d.state()["StatusText"]


def test_a_degraded_classic_service_under_its_own_user_is_adopted_as_it_was(classic, manager):
    """A non-root User= serving its last good release after a bad deploy and a restart: the
    adopting shim runs as that user, keeps saying what serves is not what was deployed,
    and the fixed deploy goes through it."""
    d = classic(absolute_config=True, bundler=False, service_extra=STATE)
    d.start()
    good = d.release()
    assert d.reload().returncode == 0
    d.release(broken=True)
    assert d.reload().returncode != 0
    assert manager.systemctl("restart", "app.service").returncode == 0
    wait_serving(d, good)
    master = manager.main_pid()
    shim = shim_pid(d, manager)
    with Load(d.port) as load:
        adopter = kill_and_wait_adopted(d, manager, shim, master)
        assert os.stat(f"/proc/{adopter}").st_uid == d.user.pw_uid
        assert d.state()["StatusText"].startswith(f"degraded: serving last good release {d.root}/releases/{good}")
        fixed = d.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr + d.journal_text()[-3000:]
        wait_serving(d, fixed)
        assert not d.state()["StatusText"].startswith("degraded"), d.state()
    assert load.failures() == [], load.failure_kinds()


def test_a_killed_watcher_is_replaced_and_the_shim_is_still_adopted(deploy, manager):
    """kill -9 of the watcher alone: the shim sees it at once (its end of the pipe), reaps it
    (no zombie), starts a new one and tells it the master; the shim's death after that
    is adopted as before."""
    d = deploy(socket_unit=True)
    d.start()
    shim = shim_pid(d, manager)
    master = d.assert_main_pid_is_live_master()

    def watchers() -> list:
        found = []
        for pid in manager.unit_processes():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    words = f.read().split(b"\0")
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"shim-watcher" in words:
                found.append((pid, state))
        return found
    first = eventually(watchers, lambda w: len(w) == 1)[0][0]
    with Load(d.port) as load:
        os.kill(first, signal.SIGKILL)
        event = manager.wait_events("watcher-gone")[-1]
        assert f"the watcher (pid {first}) ended" in event["MESSAGE"] and "a new one" in event["MESSAGE"], event
        second = eventually(watchers, lambda w: len(w) == 1 and w[0][0] != first)
        assert second[0][1] != "Z" and exited(first), second
        kill_and_wait_adopted(d, manager, shim, master)
        r = d.reload()
        assert r.returncode == 0, r.stderr + manager.journal_text()[-3000:]
    assert load.failures() == [], load.failure_kinds()
    assert d.stop().returncode == 0
    assert manager.unit_processes() == []
