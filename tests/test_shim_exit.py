"""The shim, main process during a hand-over, ends while `systemctl reload` runs:
systemd must restart the unit at once, on every systemd version tested (252, 257).

systemd >= 253 leaves a unit that last said RELOADING=1 waiting for READY=1
after ExecReload= ends, even when its main process is dead: the unit hung in
"reloading" until TimeoutStartSec= with the old and the new master both serving
and nobody supervising. A long TimeoutStartSec= here makes such a wait show as
a `systemctl reload` that does not return."""
from __future__ import annotations

import os
import signal
import time

from support.load import Load, get
from support.systemd import exited, proc_cmdline
from test_faults import reload_in_background, wait_new_master

HANG_GUARD = 60          # seconds; the restart itself takes about one
SERVICE_EXTRA = "TimeoutStartSec=300\nTimeoutStopSec=5"


def assert_restarted_promptly(d, manager, thread, result):
    thread.join(HANG_GUARD)
    assert not thread.is_alive(), ("systemctl reload still waiting", d.state(), manager.journal_text()[-2000:])
    assert result["r"].returncode != 0
    st = manager.wait_for("app.service", timeout=HANG_GUARD, NRestarts="1", ActiveState="active",
                          SubState="running")
    assert (st["NRestarts"], st["ActiveState"], st["SubState"]) == ("1", "active", "running"), st
    # (a stop may time out: the new master hangs in its boot hook, deaf to the stop signal)
    assert not [line for line in manager.journal_text().splitlines()
                if "timed out" in line and "eload" in line]
    return d.assert_main_pid_is_live_master()


def test_shim_killed_mid_hand_over_restarts_the_unit_at_once(deploy, manager):
    d = deploy(service_extra=SERVICE_EXTRA)
    d.start()
    old = d.assert_main_pid_is_live_master()
    shim = [p for p in manager.unit_processes() if "unicorn-shim" in proc_cmdline(p)][0]
    with Load(d.port) as load:
        d.app.release(extra=d.app.never_ready())
        t, result = reload_in_background(d)
        wait_new_master(d, old)
        assert manager.main_pid() == shim
        name = d.app.release()         # what the restart boots
        os.kill(shim, signal.SIGKILL)
        master = assert_restarted_promptly(d, manager, t, result)
    assert master != old
    assert get(d.port).release == name
    assert "ConnectionRefusedError" not in load.failure_kinds()
    assert d.stop().returncode == 0 and manager.unit_processes() == []


def test_nothing_serving_after_a_failed_reload_restarts_the_unit_at_once(deploy, manager):
    """The old master is killed mid hand-over, then the new one dies too: nothing is left
    to roll back to, the shim exits (8) and the reload fails; systemd restarts the unit."""
    d = deploy(service_extra=SERVICE_EXTRA)
    d.start()
    old = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        d.app.release(extra=d.app.never_ready())
        t, result = reload_in_background(d)
        new = wait_new_master(d, old)
        os.kill(old, signal.SIGKILL)
        name = d.app.release()
        deadline = time.monotonic() + 10
        while not exited(old) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(new, signal.SIGKILL)
        master = assert_restarted_promptly(d, manager, t, result)
    assert master not in (old, new)
    assert get(d.port).release == name
    assert manager.events("reload-failed")[-1]["RESULT"] == "nothing-serving"
    assert "ConnectionRefusedError" not in load.failure_kinds()
    assert d.stop().returncode == 0 and manager.unit_processes() == []
