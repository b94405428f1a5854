"""Log-reopen signals (USR1 after logrotate) reach every live master, once.

`systemctl kill --kill-whom=main -s USR1` reaches MAINPID only: the master in
steady state, but the shim while a master boots or a hand-over runs (a new
master that opened its logs before the rotation would write to *.log.1 until
the next deploy). `systemctl kill -s USR1` (every process of the unit) reaches
every master directly, the shim too. The shim cannot tell the two apart from
the signal itself, so it looks at the effect: a master that still writes to a
file logrotate renamed away (`app.log.1`, `app.log-20261204`, or such a name
deleted after compression) has not reopened its logs, and gets the signal from
the shim; one that reopened, or writes no log file, gets nothing (no second
delivery). A master is looked at once it has workers (its signal handlers are
set and queued signals handled: Gunicorn's are not set while it preloads the
app, and USR1 would kill it) and REOPEN_GRACE has passed for it to act on a
signal of its own.
"""
from __future__ import annotations

import os
import re
import signal
import stat
import time

from shim.runtime import procs
from shim.runtime.journal import WARNING

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Dict, List

REOPEN_GRACE = 1.0       # s: a master that got the signal itself has reopened by then
LOOK_EVERY = 0.25        # s
GIVE_UP_AFTER = 600.0    # s: a master that never gets workers is not waited for
# logrotate's names for a rotated file: numbered (.1, .2) or dateext (-20261204, -2026120412)
ROTATED = re.compile(r"(\.\d{1,3}|-\d{8}(?:\d{2})?)$")
DELETED = " (deleted)"


def rotated_files(pid: int) -> List[str]:
    """Regular files `pid` has open for writing under a name logrotate gave them."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            name = target[:-len(DELETED)] if target.endswith(DELETED) else target
            match = ROTATED.search(name)
            if not name.startswith("/") or not match or not _writing(pid, fd):
                continue
            if not stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{fd}").st_mode):
                continue
        except (OSError, ValueError):
            continue
        stem = name[:match.start()]
        if stem.endswith(".log") or os.path.isfile(stem):
            found.append(target)
    return found


def _writing(pid: int, fd: str) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & (os.O_WRONLY | os.O_RDWR) != 0
    return False


class LogReopen:
    """Watches, after a log-reopen signal reached the shim, that each live master
    acts on it, and passes it on to those that did not get it."""

    def __init__(self, host: Any, sig: int) -> None:
        self.host, self.sig = host, sig
        self.pending: Dict[int, float] = {}    # master pid -> when it can be judged (0: once it has workers)
        self.since = 0.0

    def requested(self) -> None:
        now = time.monotonic()
        if not self.pending:
            self.host.loop.call_later(LOOK_EVERY, self._look)
        self.since = now
        for pid, master in list(self.host.masters.items()):
            if master.alive():
                self.pending[pid] = 0.0

    def _look(self) -> None:
        now = time.monotonic()
        for pid in list(self.pending):
            master = self.host.masters.get(pid)
            if master is None or not master.alive() or now - self.since > GIVE_UP_AFTER:
                del self.pending[pid]
            elif not self.pending[pid]:
                if procs.children(pid):
                    self.pending[pid] = max(now, self.since) + REOPEN_GRACE
            elif now >= self.pending[pid]:
                del self.pending[pid]
                self._judge(master)
        if self.pending:
            self.host.loop.call_later(LOOK_EVERY, self._look)

    def _judge(self, master: procs.Pinned) -> None:
        stale = rotated_files(master.pid)
        if not stale:
            return
        name = signal.Signals(self.sig).name
        master.signal(self.sig)
        self.host.log.event("log-reopen", f"{name} passed on to master {master.pid}: it did not get it and "
                            f"still writes to {', '.join(stale)}", WARNING, MASTER_PID=master.pid, SIGNAL=name,
                            FILES=" ".join(stale))
