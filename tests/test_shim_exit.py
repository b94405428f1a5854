"""The shim, main process during a hand-over, exits on its own while `systemctl
reload` runs (a failed reload left nothing serving): systemd must restart the unit
at once, on every systemd version tested (252, 257). The shim killed mid hand-over
is tests/test_faults.py.

systemd >= 253 leaves a unit that last said RELOADING=1 waiting for READY=1
after ExecReload= ends, even when its main process is dead: the unit hung in
"reloading" until TimeoutStartSec= with the old and the new master both serving
and nobody supervising. A long TimeoutStartSec= here makes such a wait show as
a `systemctl reload` that does not return."""
from __future__ import annotations

import os
import signal

from support.load import Load, get
from support.systemd import eventually, exited
from test_faults import SHIM_EXIT_TIMEOUTS, assert_restarted_promptly, reload_in_background, wait_new_master


def test_nothing_serving_after_a_failed_reload_restarts_the_unit_at_once(deploy, manager):
    """The old master is killed mid hand-over, then the new one dies too: nothing is left
    to roll back to, the shim exits (8) and the reload fails; systemd restarts the unit."""
    d = deploy(service_extra=SHIM_EXIT_TIMEOUTS)
    d.start()
    old = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        d.app.release(extra=d.app.never_ready())
        t, result = reload_in_background(d)
        new = wait_new_master(d, old)
        os.kill(old, signal.SIGKILL)
        name = d.app.release()
        eventually(lambda: exited(old), bool, interval=0.01)
        # the shim has seen it go: a master with threads shows as a zombie a moment before
        # its pidfd says it exited (the other threads are still ending)
        manager.wait_events("retired", OLD_MASTER_PID=old)
        os.kill(new, signal.SIGKILL)
        assert_restarted_promptly(d, manager, t)
    assert result["r"].returncode != 0
    assert d.assert_main_pid_is_live_master() not in (old, new)
    assert get(d.port).release == name
    assert manager.wait_events("reload-failed")[-1]["RESULT"] == "nothing-serving"
    assert "ConnectionRefusedError" not in load.failure_kinds()
    assert d.stop().returncode == 0 and manager.unit_processes() == []
