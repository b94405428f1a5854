"""Log rotation during a hand-over: the README's logrotate file signals MAINPID
(`systemctl kill --kill-whom=main -s USR1`), which is the shim while a new master
boots. Both masters must reopen their logs, and each once, also when the signal
reaches every process of the unit (`systemctl kill -s USR1`).
Real systemd (a private user manager), real Unicorn writing its own log file."""
from __future__ import annotations

import os
import re
import threading
import time

import pytest

from support.load import Load


def open_logs(pid: int) -> set:
    """What `pid` has open (nothing once it is gone)."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


# The server's own log file, and (second) workers that take 4 s to come up: the hand-over is in flight meanwhile.
LOG_CONFIG = {
    "unicorn": ('stderr_path "{log}"', "after_fork {{ |s, w| sleep 4 }}"),
    "gunicorn": ('errorlog = "{log}"', "def post_fork(server, worker):\n    time.sleep(4)\n"),
}


@pytest.mark.parametrize("server", ["unicorn", "gunicorn"])
@pytest.mark.parametrize("whom", ["main", "all"])
def test_rotation_during_a_hand_over_reopens_both_masters_logs(deploy, manager, tmp_path, whom, server):
    log = str(tmp_path / "server.log")
    logging, slow = (line.format(log=log) for line in LOG_CONFIG[server])
    d = deploy()
    d.app.release(extra=logging)
    d.start()
    old = d.assert_main_pid_is_live_master()
    d.app.release(extra=f"{logging}\n{'import time' if server == 'gunicorn' else ''}\n{slow}")
    with Load(d.port) as load:
        reload = {}
        t = threading.Thread(target=lambda: reload.update(r=d.reload()))
        t.start()
        deadline = time.monotonic() + 20
        while not (new := [p for p in d.master_pids() if p != old and os.path.exists(f"/proc/{p}")]) \
                or log not in open_logs(new[0]) or not d.app_workers(new[0]):
            assert time.monotonic() < deadline, d.master_pids()
            time.sleep(0.05)
        new = new[0]
        assert int(manager.show("app.service", "MainPID")["MainPID"]) != old     # the shim, mid hand-over
        os.rename(log, log + ".1")                                            # logrotate
        kill = ["kill", "-s", "USR1", "app.service"]
        r = manager.systemctl(*(kill[:1] + [f"--kill-whom={whom}"] + kill[1:]))
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 10
        while any(log + ".1" in open_logs(p) for p in (old, new)):
            assert time.monotonic() < deadline, {p: open_logs(p) for p in (old, new)}
            time.sleep(0.05)
        assert os.path.exists(f"/proc/{old}") and t.is_alive()    # both reopened while both served
        t.join(60)
        assert reload["r"].returncode == 0, reload["r"].stderr
    assert load.failures() == [], load.failure_kinds()
    time.sleep(1.5)                  # a second delivery would come within the shim's grace
    if server == "gunicorn":
        return                       # it does not log its reopening
    text = open(log).read()
    for pid in (old, new):
        assert len(re.findall(rf"#{pid}\]  INFO -- : master done reopening logs", text)) == 1, (pid, text[-3000:])
    assert manager.main_pid() == new
