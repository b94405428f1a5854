"""Issue 7: each lifecycle step is one journal event whose fields match reality."""
from __future__ import annotations

import os
import select
import signal
import time

from support.load import get


def one(manager, event, **fields):
    found = manager.wait_events(event, **fields)
    entries = [e for e in found if all(e.get(k) == str(v) for k, v in fields.items())]
    assert len(entries) == 1, (event, fields, found)
    return entries[0]


def test_events_of_boot_reloads_crash_and_stop(deploy, manager):
    d = deploy()
    d.start()
    first = d.assert_main_pid_is_live_master()
    ready = one(manager, "ready", MASTER_PID=first, GENERATION=1)
    assert ready["RELEASE"].endswith("/releases/r1") and ready["PRIORITY"] == "6"

    name = d.app.release()
    assert d.reload().returncode == 0
    second = d.assert_main_pid_is_live_master()
    one(manager, "reload-start", OLD_MASTER_PID=first, GENERATION=2)
    done = one(manager, "reload-done", MASTER_PID=second, OLD_MASTER_PID=first, GENERATION=2, RESULT="done")
    assert done["RELEASE"] == os.path.realpath(d.app.current) and done["RELEASE"].endswith(name)
    assert int(done["DURATION_MS"]) > 0 and int(done["SHIM_OVERHEAD_MS"]) >= 0
    one(manager, "retired", OLD_MASTER_PID=first, GENERATION=1)

    d.app.release(broken=True)
    assert d.reload().returncode != 0
    failed = one(manager, "reload-failed", OLD_MASTER_PID=second, GENERATION=3, RESULT="rolled-back")
    assert failed["PRIORITY"] == "3" and "exited" in failed["REASON"]
    assert int(failed["MASTER_PID"]) != second and failed["MESSAGE"].startswith("reload to generation 3 failed")
    assert d.m.main_pid() == second

    d.app.release()            # a good release under `current` for the restart below
    os.kill(second, signal.SIGKILL)
    st = manager.wait_for("app.service", timeout=30, NRestarts="1", ActiveState="active", SubState="running")
    assert st["SubState"] == "running", st
    exited = one(manager, "master-exit", MASTER_PID=second, GENERATION=2)
    assert exited["PRIORITY"] == "3"
    assert "killed by SIGKILL" in exited["MESSAGE"] or "exited" in exited["MESSAGE"]

    third = d.assert_main_pid_is_live_master()
    d.stop()
    assert int(one(manager, "stopping")["MASTER_PID"]) == third
    assert all(e["_SYSTEMD_USER_UNIT"] == "app.service" for e in manager.journal("SYSLOG_IDENTIFIER=unicorn-shim"))


def test_plain_stderr_without_journald(tmp_path):
    """Not under journald: the same events as readable lines on stderr."""
    import subprocess
    from support.apps import App, free_port
    from support.deploy import SHIM
    app = App(str(tmp_path / "app"), str(tmp_path / "unicorn.pid"))
    app.release()
    port = free_port()
    p = subprocess.Popen([SHIM, "run", "--listen", f"127.0.0.1:{port}", "--control", str(tmp_path / "c.sock"),
                          "--chdir", app.current, "--", *app.command().split()],
                         cwd=app.current, stderr=subprocess.PIPE, text=True,
                         env={k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")})
    seen = []
    try:
        # The first request can be answered a moment before the shim has seen the
        # last worker's report: wait for the shim's own line, then for the app.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and " ready: " not in "".join(seen):
            if select.select([p.stderr], [], [], 1)[0]:
                seen.append(os.read(p.stderr.fileno(), 65536).decode(errors="replace"))
        assert get(port).release == "r1"
    finally:
        p.send_signal(signal.SIGQUIT)
        err = "".join(seen) + p.communicate(timeout=30)[1]
    assert p.returncode == 0
    lines = [line for line in err.splitlines() if line.startswith("unicorn-shim: ")]
    assert any(line.startswith("unicorn-shim: ready: master ") and "generation=1" in line for line in lines), err
    assert any(line.startswith("unicorn-shim: stopping: ") for line in lines)
