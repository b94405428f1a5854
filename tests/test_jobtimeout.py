"""Issue 22, case 2, at small scale: a reload that cannot finish within the unit's
TimeoutStartSec= (which bounds ExecReload=) is rolled back by the shim *before*
systemd's timer fires, and `systemctl reload` fails with the shim's reason, not
systemd's "Reload operation timed out"; the new release never goes live afterwards.
Real systemd (a private user manager: `systemctl --user`), real Unicorn, load running.
The system manager with the packaged unit: tests/test_jobtimeout_packaged.py."""
from __future__ import annotations

import os
import time

from support.load import Load, get
from support.systemd import WAIT, eventually

TIMEOUT_START = 6        # the unit's TimeoutStartSec=
BOOT = 12                # the new release takes this long to read its config
SHIM_ARGS = "--ready-timeout 20 --retire-timeout 1"     # 20 s: the shim alone would wait for it


def test_a_reload_longer_than_timeoutstartsec_fails_before_systemd_kills_it(unicorn_deploy, manager):
    d = unicorn_deploy(shim_args=SHIM_ARGS, service_extra=f"TimeoutStartSec={TIMEOUT_START}")
    d.start()
    good = f"r{d.app.count}"
    old_master = d.assert_main_pid_is_live_master()
    with Load(d.port, clients=3) as load:
        d.app.release(extra=d.app.slow_boot(BOOT))
        slow = os.path.realpath(d.app.current)
        t = time.monotonic()
        r = d.reload()
        took = time.monotonic() - t
        assert r.returncode != 0, r.stderr
        # before systemd's timer (which a CPU wait of the new master may move, by as
        # much: the journal below has no "Reload operation timed out"), long before the boot
        assert took < BOOT - 2, (took, manager.journal_text()[-2000:])
        failed = manager.wait_events("reload-failed")
        assert failed, manager.journal_text()[-3000:]
        reason = failed[0]["REASON"]
        assert reason.startswith(f"systemd's reload timeout (TimeoutStartSec={TIMEOUT_START} s) ends in "), reason
        assert "raise TimeoutStartSec= or lower --ready-timeout" in reason, reason
        # the client said it where ExecReload='s errors go: the unit's journal
        manager.wait_journal(f"reload failed: systemd's reload timeout (TimeoutStartSec={TIMEOUT_START} s)")
        # the old release serves past the moment the slow one would have been ready
        while time.monotonic() < t + BOOT + 3:
            assert get(d.port, timeout=5).release == good
            time.sleep(0.5)
        assert manager.events("reload-done") == []
        assert "Reload operation timed out" not in manager.journal_text()
    assert load.failures() == [], load.failure_kinds()
    assert load.ok_count() > 20
    assert d.assert_main_pid_is_live_master() == old_master
    st = eventually(d.state, lambda s: s["SubState"] == "running")
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert "TimeoutStartSec" in st["StatusText"] or "failed" in st["StatusText"], st
    left = eventually(lambda: [p for p in manager.unit_processes() if _cwd(p) == slow], lambda p: p == [],
                      timeout=WAIT)
    assert left == [], f"processes of the rolled-back release left: {left}"
    # the same release deploys once the unit allows the time it takes
    d.service_extra = f"TimeoutStartSec={BOOT + 20}"
    d.write_units()
    r = d.reload()
    assert r.returncode == 0, r.stderr + manager.journal_text()[-2000:]
    assert get(d.port).release == f"r{d.app.count}"


def _cwd(pid: int) -> str:
    try:
        return os.path.realpath(f"/proc/{pid}/cwd")
    except OSError:
        return ""
