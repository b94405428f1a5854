"""Issue 4: faults under real systemd with real servers and load running.

Each case checks the requests that failed, systemd's view afterwards against
reality, the result of a reload that was running, and that a stop leaves
nothing behind."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from support.load import Load, get
from support.systemd import WAIT, eventually, exited, is_shim, proc_cmdline, proc_parent


def finish(d, manager):
    """After each case: stop leaves the unit inactive and nothing running."""
    stop = d.stop()
    assert stop.returncode == 0
    assert manager.unit_processes() == []
    assert d.state()["ActiveState"] in ("inactive", "failed")


def reload_in_background(d):
    result = {}
    t = threading.Thread(target=lambda: result.update(r=d.reload()))
    t.start()
    return t, result


SHIM_EXIT_TIMEOUTS = "TimeoutStartSec=300\nTimeoutStopSec=5"


def assert_restarted_promptly(d, manager, reload_thread):
    """The shim died during a reload: `systemctl reload` returns and the unit is
    restarted, without waiting for TimeoutStartSec=."""
    reload_thread.join(60)
    assert not reload_thread.is_alive(), ("systemctl reload still waiting", d.state())
    st = manager.wait_for("app.service", timeout=60, NRestarts="1", ActiveState="active", SubState="running")
    assert (st["NRestarts"], st["ActiveState"], st["SubState"]) == ("1", "active", "running"), st
    # (a stop may time out: the new master hangs in its boot hook, deaf to the stop signal)
    assert not [line for line in manager.journal_text().splitlines() if "timed out" in line and "eload" in line]


# A worker's title (not "worker" anywhere: the config's path may hold the test's name)
WORKER_TITLE = re.compile(r"worker\[\d+\]|cluster worker \d+")


def wait_new_master(d, old, timeout=WAIT):
    """The new master once it exists (usr2: the old master's non-worker child; spawn: a
    second master beside the old). The server's name in its command line tells it from
    the ExecReload= process, which systemd 257 starts as systemd-executor."""
    def new_master():
        for pid in d.m.unit_processes():
            # (the server's name: not a child of the manager that has not exec'd yet, as
            # ExecReload='s process for a moment, which a test that stops "new" would hang)
            cmdline = proc_cmdline(pid)
            if pid != old and d.app.server in cmdline and not is_shim(pid) \
                    and proc_parent(pid) in (old, d.m.pid) and not WORKER_TITLE.search(cmdline) \
                    and pid not in d.app_workers(old):
                return pid
        return None
    pid = eventually(new_master, bool, timeout, interval=0.01)
    assert pid, "no new master appeared"
    return pid


def test_kill9_new_master_while_it_boots(deploy, manager):
    d = deploy(shim_args="--ready-timeout 30")
    d.start()
    old = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        d.app.release(extra=d.app.never_ready())      # it would boot forever: killed meanwhile
        t, result = reload_in_background(d)
        new = wait_new_master(d, old)
        time.sleep(0.3)
        os.kill(new, signal.SIGKILL)
        t.join()
    assert result["r"].returncode != 0
    assert "killed by SIGKILL" in manager.wait_events("reload-failed")[-1]["REASON"] or \
        "exited" in manager.wait_events("reload-failed")[-1]["REASON"]
    assert load.failures() == [], load.failure_kinds()
    assert d.assert_main_pid_is_live_master() == old
    finish(d, manager)


def test_stopped_new_master_fails_at_ready_timeout(deploy, manager):
    d = deploy(shim_args="--ready-timeout 3")
    d.start()
    old = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        d.app.release(extra=d.app.slow_boot(2))     # still reading its config when stopped
        t, result = reload_in_background(d)
        new = wait_new_master(d, old)
        os.kill(new, signal.SIGSTOP)
        t.join()
    assert result["r"].returncode != 0
    assert "not ready within 3 s" in manager.wait_events("reload-failed")[-1]["REASON"]
    assert load.failures() == [], load.failure_kinds()
    assert d.assert_main_pid_is_live_master() == old
    assert not os.path.exists(f"/proc/{new}") or open(f"/proc/{new}/stat").read().split()[2] == "Z"
    finish(d, manager)


WAIT_FOR_FILE = """
import os, time
def post_fork(server, worker):
    while not os.path.exists(%r):
        time.sleep(0.01)
"""


@pytest.mark.parametrize("server", ["gunicorn"])
def test_gunicorn_halting_after_boot_errors_is_rejected_in_seconds(deploy, manager, server):
    """Gunicorn 20.1: two workers fail to boot before its SIGCHLD handler runs (a busy
    machine; here the master is stopped meanwhile). It reaps one, halts, and waits
    graceful_timeout (30 s) for the other, which it never reaps. The shim sees the
    dead worker left unreaped and rejects the release in seconds."""
    d = deploy(preload=False, shim_args="--ready-timeout 60")
    d.start()
    old = d.assert_main_pid_is_live_master()
    fail_now = os.path.join(d.app.root, "fail-now")
    with Load(d.port) as load:
        d.app.release(broken=True, extra=WAIT_FOR_FILE % fail_now)
        t, result = reload_in_background(d)
        new = wait_new_master(d, old)
        workers = eventually(lambda: d.app_workers(new), lambda ws: len(ws) >= 2, interval=0.005)
        os.kill(new, signal.SIGSTOP)
        open(fail_now, "w").close()
        eventually(lambda: all(exited(w) for w in workers), bool, interval=0.005)
        os.kill(new, signal.SIGCONT)
        cont = time.monotonic()
        t.join()
        took = time.monotonic() - cont
    assert len(workers) == 2
    assert result["r"].returncode != 0
    assert "left 1 unreaped" in manager.wait_events("reload-failed")[-1]["REASON"]
    assert took < 10, took              # Gunicorn alone ends this after graceful_timeout = 30 s
    assert load.failures() == [], load.failure_kinds()
    assert d.assert_main_pid_is_live_master() == old
    finish(d, manager)


def test_kill9_a_new_worker_during_hand_over(deploy, manager):
    d = deploy(workers=3)
    d.start()
    old = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        name = d.app.release()
        t, result = reload_in_background(d)
        new = wait_new_master(d, old)
        os.kill(eventually(lambda: d.app_workers(new), bool, interval=0.005)[0], signal.SIGKILL)
        t.join()
        time.sleep(0.3)
    # Unicorn respawns the worker and the reload goes through; Gunicorn does the same.
    assert result["r"].returncode == 0, result["r"].stderr
    assert get(d.port).release == name
    assert d.assert_main_pid_is_live_master() == new
    # the killed worker's request in flight may be cut (at most one per client):
    # that is the kill, not the shim; nothing is refused
    cut = ("RemoteDisconnected", "ConnectionResetError", "IncompleteRead")
    assert all(k in cut for k in load.failure_kinds()), load.failure_kinds()
    assert len(load.failures()) <= load.clients
    finish(d, manager)


def test_kill9_old_master_in_the_middle_of_a_hand_over(deploy, manager):
    kill_old_master_mid_hand_over(deploy(), manager)


def test_kill9_old_master_in_the_middle_of_a_usr2_hand_over(unicorn_deploy, manager):
    """usr2: the new master is the old one's child and is reparented to the manager."""
    kill_old_master_mid_hand_over(unicorn_deploy(shim_args="--upgrade usr2"), manager)


def kill_old_master_mid_hand_over(d, manager):
    d.start()
    old = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        name = d.app.release()
        t, result = reload_in_background(d)
        wait_new_master(d, old)
        os.kill(old, signal.SIGKILL)
        t.join()
        time.sleep(0.3)
    assert result["r"].returncode == 0, result["r"].stderr
    assert get(d.port).release == name
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    new = d.assert_main_pid_is_live_master()
    assert new != old
    assert "Supervising process" not in manager.journal_text()
    # requests in flight on the killed master's workers may be cut; nothing is refused
    assert "ConnectionRefusedError" not in load.failure_kinds()
    finish(d, manager)


def test_kill9_shim_in_steady_state(deploy, manager):
    """The app keeps serving; the watcher the shim left starts a new shim that adopts the
    master, and the next reload works (the details: tests/test_failpaths_shim.py)."""
    d = deploy()
    d.start()
    master = d.assert_main_pid_is_live_master()
    shim = [p for p in manager.unit_processes() if is_shim(p)][0]
    with Load(d.port) as load:
        os.kill(shim, signal.SIGKILL)
        eventually(d.state, lambda st: f"(adopted after the shim (pid {shim}) died)" in st["StatusText"])
        assert d.m.main_pid() == master and d.state()["ActiveState"] == "active"
        name = d.app.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr
        assert get(d.port).release == name
    assert load.failures() == [], load.failure_kinds()
    assert d.m.main_pid() != master and d.state()["ActiveState"] == "active"
    finish(d, manager)


def test_kill9_shim_in_the_middle_of_a_hand_over(deploy, manager):
    """MAINPID is the shim during a hand-over: systemd sees it die and restarts the
    unit at once; behind a .socket unit no connection is refused meanwhile."""
    # The new master hangs in its boot hook and ignores the stop signal: a short
    # TimeoutStopSec= lets systemd's SIGKILL come sooner than the default 60 s. A long
    # TimeoutStartSec= makes a wait for it (systemd 257 after RELOADING=1) a hang.
    d = deploy(service_extra=SHIM_EXIT_TIMEOUTS)
    d.start()
    old = d.assert_main_pid_is_live_master()
    shim = [p for p in manager.unit_processes() if is_shim(p)][0]
    with Load(d.port) as load:
        d.app.release(extra=d.app.never_ready())
        t, result = reload_in_background(d)
        wait_new_master(d, old)
        assert manager.main_pid() == shim
        os.kill(shim, signal.SIGKILL)
        d.app.release()       # the deploy tool's next attempt: what the restart boots
        assert_restarted_promptly(d, manager, t)
    assert result["r"].returncode != 0
    assert "ConnectionRefusedError" not in load.failure_kinds()
    finish(d, manager)


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage", "pid-1", "other-pid"])
def test_pid_file_damage_between_reloads(unicorn_deploy, manager, damage):
    """With the common before_fork hook, which QUITs whatever .oldbin names: the shim
    rewrites the pid file to the master it knows before USR2."""
    d = unicorn_deploy(seed_hook=True, shim_args="--upgrade usr2")
    d.start()
    pid_file = d.app.pid_file
    sleeper = subprocess.Popen(["sleep", "60"])     # a process outside the unit
    with Load(d.port) as load:
        if damage == "deleted":
            os.unlink(pid_file)
        else:
            text = {"truncated": "", "garbage": "0x;rm -rf\n", "pid-1": "1\n",
                    "other-pid": f"{sleeper.pid}\n"}[damage]
            with open(pid_file, "w") as f:
                f.write(text)
        name = d.app.release()
        r = d.reload()
        time.sleep(0.3)
    assert r.returncode == 0, r.stderr
    assert sleeper.poll() is None          # never signalled
    sleeper.kill()
    assert get(d.port).release == name
    assert load.failures() == [], load.failure_kinds()
    master = d.assert_main_pid_is_live_master()
    assert open(pid_file).read().strip() == str(master)
    named = damage in ("pid-1", "other-pid")       # it named a process: repaired, and said so
    assert bool(manager.wait_events("pid-file-repaired") if named else manager.events("pid-file-repaired")) == named
    finish(d, manager)


@pytest.mark.parametrize("fault", ["read-only", "disk-full"])
def test_pid_directory_unwritable_at_reload(unicorn_deploy, manager, tmp_path, fault):
    """The pid file's directory turns read-only or full: the reload fails before
    anything is signalled, and says why."""
    piddir = str(tmp_path / "pids")
    os.makedirs(piddir)
    ns = ["nsenter", "-t", str(manager.pid), "-m", "--"]   # the manager's private mount namespace
    if fault == "disk-full":
        subprocess.run(ns + ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", piddir], check=True)
    d = unicorn_deploy(pid_file=os.path.join(piddir, "unicorn.pid"))
    d.start()
    old = d.assert_main_pid_is_live_master()
    if fault == "read-only":
        subprocess.run(ns + ["mount", "--bind", piddir, piddir], check=True)
        subprocess.run(ns + ["mount", "-o", "remount,bind,ro", piddir], check=True)
    else:
        subprocess.run(ns + ["sh", "-c", f"cat /dev/zero > {piddir}/fill"], capture_output=True)
    try:
        with Load(d.port) as load:
            d.app.release()
            t = time.monotonic()
            r = d.reload()
            took = time.monotonic() - t
        assert r.returncode != 0
        reason = manager.wait_events("reload-failed")[-1]["REASON"]
        want = "Read-only file system" if fault == "read-only" else "No space left on device"
        assert "pid file" in reason and want in reason, reason
        assert took < 10      # at once, not at the ready timeout
        assert load.failures() == []
        assert d.assert_main_pid_is_live_master() == old
    finally:
        subprocess.run(ns + ["umount", piddir], check=False)
    finish(d, manager)


def test_watchdog_restarts_a_hung_master(deploy, manager):
    """WATCHDOG=1 stops when the master hangs (SIGSTOP): systemd's watchdog restarts
    the unit, and behind the .socket unit no connection is refused."""
    d = deploy(service_extra="WatchdogSec=2\nTimeoutStopSec=5")
    d.start()
    master = d.assert_main_pid_is_live_master()
    time.sleep(3)                         # longer than WatchdogSec: the shim's pings keep it alive
    assert d.state()["NRestarts"] == "0"
    with Load(d.port) as load:
        os.kill(master, signal.SIGSTOP)
        st = manager.wait_for("app.service", timeout=40, NRestarts="1", ActiveState="active",
                              SubState="running")
        time.sleep(0.5)
    assert st["NRestarts"] == "1", st
    assert "Watchdog timeout" in manager.wait_journal("Watchdog timeout")
    assert "ConnectionRefusedError" not in load.failure_kinds()
    assert load.ok_count() > 0
    assert d.assert_main_pid_is_live_master() != master
    finish(d, manager)


def test_slow_boot_extends_the_start_timeout(deploy, manager):
    """EXTEND_TIMEOUT_USEC: an app slower than TimeoutStartSec= still starts, bounded
    by the shim's own --ready-timeout."""
    d = deploy(service_extra="TimeoutStartSec=2")
    slow = {"unicorn": "before_fork { |s, w| sleep 2 if w.nr == 0 }",
            "gunicorn": "import time\ndef when_ready(server):\n    time.sleep(4)",
            "puma": "before_fork { sleep 3 }"}[d.app.server]
    d.app.release(extra=slow)
    t = time.monotonic()
    d.start()
    assert time.monotonic() - t > 2
    assert get(d.port, timeout=5).error is None
    finish(d, manager)
