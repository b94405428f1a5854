"""The masters: starting one from the held sockets, watching it with a pidfd,
waiting until its workers serve, retiring it. What a hand-over and an upgrade
strategy may do (the Host they see); which master serves, and what systemd is
told, is the supervisor's alone.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Dict, List, Optional

from shim import procs, spawn
from shim.errors import ReloadFailed, Stopping
from shim.journal import WARNING, Log
from shim.readiness import HOOK_ENV, HookReports, HookSocket, Verdict, WorkerWatch, hook_environment
from shim.release import config_through
from shim.sockets import HeldSocket

SAMPLE = 0.05           # how often workers are looked at while a master boots
WORKERLESS_GRACE = 2.0  # how long a master with no live worker gets to stop gracefully
# A master that failed to become ready serves little or nothing: it gets this
# long to finish what it may have accepted, not the full --retire-timeout.
FAILED_MASTER_GRACE = 10.0


class Masters:
    def __init__(self, config: "object", sockets: List[HeldSocket], log: Log, environ: Dict[str, str]) -> None:
        self.config = config
        self.profile = config.profile
        self.sockets = sockets
        self.log = log
        self.environ = environ                   # the shim's own, for every master: never a stale one
        self.cgroup = procs.cgroup_of(os.getpid())
        self.reports = HookReports()
        self.masters: Dict[int, procs.Pinned] = {}       # every master alive and pinned
        self.stop_requested = False
        self.hook_socket: Optional[HookSocket] = None
        self._wake = asyncio.Event()      # for the run loop
        self._hook = asyncio.Event()      # for whoever waits on a booting master

    def _on_hook_message(self) -> None:
        self.hook_socket.drain(self.reports, self._of_the_unit)
        self._hook.set()

    def _of_the_unit(self, pid: int) -> bool:
        """A sender of the unit's own. One already gone (a master's last words are sent
        right before it exits, and may be read after it was reaped) cannot be checked:
        its report is kept; only a live process outside the unit is refused."""
        return procs.cgroup_of(pid) is None or procs.in_cgroup(pid, self.cgroup)

    def _on_master_exit(self, master: procs.Pinned) -> None:
        asyncio.get_running_loop().remove_reader(master.pidfd)
        master.exit_text = procs.exit_description(master.pid)
        if master.role == "old":
            # Logged the moment it happens: the old master may go on its own
            # (the common before_fork hook QUITs it) long before the hand-over ends.
            self.log.event("retired", f"old master {master.pid} {master.exit_text}",
                           OLD_MASTER_PID=master.pid, GENERATION=master.generation)
        self.masters.pop(master.pid, None)
        self.reports.forget(master.pid)
        master.close()     # one pidfd per generation: a long-lived shim must not collect them
        self.wake()

    def wake(self) -> None:
        """Something changed: the run loop and any waiting hand-over look again."""
        self._wake.set()
        self._hook.set()

    async def tick(self, seconds: float = SAMPLE) -> None:
        """Sleep until the next look, or sooner when a hook or a master has news."""
        try:
            await asyncio.wait_for(self._hook.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._hook.clear()

    def start_master(self, not_before: int, release: Optional[str] = None,
                     link: Optional[str] = None) -> procs.Pinned:
        """Spawn a master from the held sockets and pin it.

        With `release` (the real directory behind --chdir) the master starts there
        with PWD naming it, so code it loads later (Gunicorn puts PWD on sys.path)
        comes from that release, never from the one `current` names later.
        Without, PWD names --chdir itself, which Unicorn's own re-exec follows.
        A relative config path is named through `link` (default --chdir)."""
        fds = [s.fileno() for s in self.sockets]
        fd_numbers = list(range(spawn.FD_START, spawn.FD_START + len(fds)))
        env = spawn.server_environment(self.environ, {**self.profile.socket_env(fd_numbers),
                                                      **hook_environment(self.environ),
                                                      HOOK_ENV: self.hook_socket.path})
        argv = config_through(self.config.command, self.profile.config_flags, link or self.config.chdir)
        argv += self.profile.listen_args([s.name for s in self.sockets])
        pid = spawn.spawn(argv, env, fds, chdir=release or self.config.chdir,
                          set_listen_pid=self.profile.sets_listen_pid)
        try:
            master = procs.pin(pid, self.cgroup, not_before=not_before)
        except procs.UntrustedPid as e:
            try:
                os.kill(pid, signal.SIGKILL)   # our own grandchild, a moment old: no reuse possible
            except ProcessLookupError:
                pass
            raise ReloadFailed(f"master {pid} cannot be watched: {e} (see the server's log)") from None
        self.watch(master)
        return master

    def watch(self, master: procs.Pinned) -> None:
        self.masters[master.pid] = master
        asyncio.get_running_loop().add_reader(master.pidfd, self._on_master_exit, master)

    async def wait_ready(self, master: procs.Pinned, deadline: float, what: str) -> Verdict:
        """Wait until `master`'s workers are ready, or raise ReloadFailed."""
        watch = WorkerWatch(master.pid, self.profile, self.reports, self.config.settle, time.monotonic())
        while True:
            if self.stop_requested:
                raise Stopping()
            if not master.alive():
                raise ReloadFailed(f"{what} {master.pid} {master.exit_text or 'exited'} before it was ready"
                                   + self.server_error(master.pid))
            now = time.monotonic()
            watch.sample(now)
            verdict = watch.verdict(now)
            if verdict.state == "ready":
                return verdict
            if verdict.state == "failed":
                raise ReloadFailed(f"{what} {master.pid}: {verdict.detail}" + self.server_error(master.pid))
            if now > deadline:
                raise ReloadFailed(f"{what} {master.pid} not ready within {self.config.ready_timeout:g} s "
                                   f"({verdict.workers} workers up)" + self.server_error(master.pid))
            await self.tick()

    def server_error(self, pid: int) -> str:
        """': <the server's own error line>' for `pid` or its workers, as its
        reporter sent it (read now: it may still sit in the socket), or a
        pointer to the server's log."""
        if self.hook_socket:
            self.hook_socket.drain(self.reports, self._of_the_unit)
        error = self.reports.error_of(pid)
        return f": {error}" if error else " (the server's own log in the journal says why)"

    async def wait_exit(self, proc: procs.Pinned, timeout: float, stoppable: bool = False) -> bool:
        deadline = time.monotonic() + timeout
        while proc.alive():
            if stoppable and self.stop_requested:
                raise Stopping()
            if time.monotonic() > deadline:
                return False
            await self.tick(min(SAMPLE, timeout))
        return True

    def checkpoint(self) -> None:
        """Between two steps of a hand-over: a stop requested meanwhile ends it here."""
        if self.stop_requested:
            raise Stopping()

    async def retire(self, master: procs.Pinned, keep: Optional[int] = None,
                     grace: Optional[float] = None, stoppable: bool = False) -> None:
        """Graceful stop of `master`; KILL it and its workers after `grace`
        (default --retire-timeout). `stoppable`: a stop requested meanwhile raises
        Stopping at once (the drain goes on; the stop retires every master)."""
        grace = self.config.retire_timeout if grace is None else grace
        if not master.alive():
            return
        workers = []
        for pid in procs.children(master.pid):
            if pid != keep:
                try:
                    workers.append(procs.pin(pid, self.cgroup, parent=master.pid, role="worker"))
                except procs.UntrustedPid:
                    pass
        if not any(worker.alive() for worker in workers):
            # Without a live worker nothing is in flight, so a master that ignores its
            # graceful stop (Gunicorn halting on a boot error) is not waited for.
            grace = min(grace, WORKERLESS_GRACE)
        master.signal(self.profile.graceful_stop)
        if not await self.wait_exit(master, grace, stoppable):
            self.log.event("retire-timeout", f"master {master.pid} still running after "
                           f"{grace:g} s; killing it", WARNING, MASTER_PID=master.pid)
            master.signal(signal.SIGKILL)
            await self.wait_exit(master, 5)
        for worker in workers:
            if worker.alive():
                worker.signal(signal.SIGKILL)
            worker.close()

