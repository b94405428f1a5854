"""The old generation standing by while the new one is checked or on probation:
its workers stopped gracefully, its master kept, ready to come back exactly.

Unicorn's WINCH stops every worker and keeps the master (it honours it when
its stdin is not a tty, as under systemd); TTIN brings one worker back, forked
from that very master, in its own release. Never HUP: Unicorn would re-read its
config, which names the new release when it is read through `current`.
Gunicorn's WINCH acts only when it daemonized itself and its and Puma's TTOU
never go below one worker, so their profiles have no standby: their old
generation serves on beside the new one (servers.py says which).
"""
from __future__ import annotations

import os
import time

from shim.runtime import procs
from shim.runtime.loop import Wait
from shim.runtime.masters import SAMPLE

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import List, Optional

    from shim.runtime.masters import Steps
    from shim.runtime.upgrade import Host

WORKER_BACK = 10.0       # seconds each worker brought back gets to appear


def workers(host: "Host", master: procs.Pinned) -> List[int]:
    return [p for p in procs.children(master.pid) if host.profile.worker_title.search(procs.title(p))]


def _stdin_is_tty(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/0").startswith(("/dev/pts/", "/dev/tty"))
    except OSError:
        return False


class Standby:
    """The old master with its workers stopped; `bring_back` forks as many as it had.
    `serve_on_stop`: a stop during the hand-over gives it one worker back to serve
    while the stop drains it (a usr2 health check, where the new master is its child)."""

    def __init__(self, host: "Host", old: procs.Pinned, serve_on_stop: bool) -> None:
        self.host, self.old, self.serve_on_stop = host, old, serve_on_stop
        self.stopped: List[int] = []       # the workers it had, asked to stop

    def __len__(self) -> int:
        return len(self.stopped)

    def stop(self) -> None:
        """Ask the old master's workers to finish their requests and exit (the master stays)."""
        profile = self.host.profile
        if not self.old.alive() or profile.stop_workers is None or \
                (profile.stop_workers_needs_no_tty and _stdin_is_tty(self.old.pid)):
            return
        self.stopped = workers(self.host, self.old)
        self.old.signal(self.host.profile.stop_workers)
        self.old.standing_by = True

    def gone(self, keep: int) -> Steps[None]:
        """Wait (up to --retire-timeout) until the old master has no child but `keep`."""
        yield Wait(f"the old master {self.old.pid}'s workers to stop",
                   lambda wait: None if [p for p in procs.children(self.old.pid) if p != keep] else True,
                   deadline=time.monotonic() + self.host.config.retire_timeout, every=SAMPLE)

    def bring_back(self) -> Steps[None]:
        """As many workers as it had, one signal at a time, each waited for (signals of
        one kind sent at once may merge into one). A worker still finishing its last
        request keeps its number until it exits: the master forks its successor then."""
        old, host, draining = self.old, self.host, set(self.stopped)
        old.standing_by = False
        for n in range(1, len(self.stopped) + 1):
            old.signal(host.profile.respawn_workers)
            yield Wait(f"old master {old.pid}'s worker {n} back",
                       lambda wait: True if len(set(workers(host, old)) - draining) >= n or not old.alive()
                       else None, deadline=time.monotonic() + WORKER_BACK, every=SAMPLE)

    def on_stop(self) -> None:
        if self.serve_on_stop and self.stopped and self.old.alive():
            self.old.signal(self.host.profile.respawn_workers)
            self.old.standing_by = False


def for_probation(host: "Host", old: procs.Pinned, new: procs.Pinned) -> Steps[Optional[Standby]]:
    """The old generation during the new one's probation: its workers stopped, so only the
    new release answers public requests (None: it serves on beside). They are stopped once
    the new master runs as many: a readiness heuristic may have seen the first of them
    only (a before_fork hook that sleeps). If the new one runs fewer within the probation's
    length (its config asks for fewer), the old one serves beside."""
    if host.profile.probation_standby != "stopped":
        return None
    wanted = len(workers(host, old))
    enough = yield Wait(f"new master {new.pid} to run {wanted} workers",
                        lambda wait: True if len(workers(host, new)) >= wanted or not new.alive() else None,
                        deadline=time.monotonic() + host.config.probation, every=SAMPLE)
    if not enough or not new.alive():
        return None
    standby = Standby(host, old, serve_on_stop=False)
    standby.stop()
    return standby
