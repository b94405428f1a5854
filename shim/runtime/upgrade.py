"""The two ways to start the next generation of masters.

usr2:  the server re-execs itself; the new master is the old one's child
       until the old one exits. What Unicorn configs and hooks expect.
spawn: the shim starts the next master exactly as at boot, from the sockets
       it holds. The new master is the manager's child from the start.

Both move the pid file the same way Unicorn's own USR2 does (to .oldbin), so
the common `before_fork` hook that QUITs the `.oldbin` master keeps working.
"""
from __future__ import annotations

import os
import time
from shim.runtime import procs, release
from shim.runtime.loop import Wait
from shim.errors import ReloadFailed, ShimError

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Protocol, Set

    from shim.runtime.masters import Steps

    class Host(Protocol):
        """What a strategy and a hand-over may use of the supervisor: acting on
        processes and waiting. Its state (which master serves, the generation, what
        systemd is told) is the supervisor's alone to change."""

        config: Any
        profile: Any
        cgroup: Optional[str]
        masters: Dict[int, procs.Pinned]
        log: Any
        notifier: Any

        def start_master(self, not_before: int, release: Optional[str] = None,
                         link: Optional[str] = None) -> procs.Pinned: ...
        def watch(self, master: procs.Pinned) -> None: ...
        def wait_ready(self, master: procs.Pinned, deadline: float, what: str) -> Steps[Any]: ...
        def retire(self, master: procs.Pinned, keep: Optional[int] = None, grace: Optional[float] = None,
                   interruptible: bool = False) -> Steps[None]: ...
        def wait_exit(self, proc: procs.Pinned, timeout: float, interruptible: bool = False) -> Steps[bool]: ...
        def checkpoint(self) -> None:
            """Between two steps: a stop, or the reload's client gone, ends the hand-over here."""
        def commit(self) -> None:
            """The point of no return: the old master is about to be retired."""
        def server_error(self, pid: int) -> str: ...


OLDBIN = ".oldbin"


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Strategy:
    name = ""
    pins_release = False     # does each master start pinned to the real release directory?

    def __init__(self, host: "Host") -> None:
        self.host = host
        self.pid_file = host.config.pid_file
        self.oldbin = self.pid_file + OLDBIN if self.pid_file else None

    def prepare_pid_files(self, old: procs.Pinned) -> None:
        """The server and the common hook trust these files blindly: make them
        name the master the shim knows, and nothing else, before anything reads them."""
        if not self.pid_file:
            return
        try:
            found = procs.read_pid_file(self.pid_file)
            if found is not None and found != old.pid:     # a missing or empty file names no one to report
                self.host.log.event("pid-file-repaired", f"pid file {self.pid_file} named {found} instead "
                                   f"of master {old.pid}; rewritten", MASTER_PID=old.pid)
            # Written even when right: the server is about to write beside it, and a
            # full or read-only directory is better found now than by its USR2 failing.
            procs.write_pid_file(self.pid_file, old.pid)
            _remove(self.oldbin)   # steady state has no .oldbin: any is stale
        except OSError as e:
            raise ReloadFailed(f"cannot repair pid file {self.pid_file}: {e.strerror or e}") from None

    def start_next(self, old: procs.Pinned, started: int, deadline: float,
                   intended: Optional[str]) -> Steps[procs.Pinned]:
        """Start the next master; `intended` is the real release directory the
        deploy put behind --chdir when the hand-over began."""
        raise NotImplementedError

    def release_to_pin(self) -> Optional[str]:
        """The real release directory a new master is started in, if this strategy pins it."""
        return release.resolve(self.host.config.chdir) if self.pins_release else None

    def restore(self, old: procs.Pinned) -> None:
        """After a rollback: the pid file names the old master again."""
        if not self.pid_file or not old.alive():
            return
        try:
            procs.write_pid_file(self.pid_file, old.pid)
            _remove(self.oldbin)
        except OSError as e:
            self.host.log.error("pid-file-error", f"cannot restore pid file {self.pid_file}: {e}")

    def finish(self, new: procs.Pinned) -> None:
        """After a hand-over: no .oldbin is left to mislead the next one."""
        if self.oldbin and procs.read_pid_file(self.oldbin) != new.pid:
            _remove(self.oldbin)


class Usr2(Strategy):
    name = "usr2"

    def restore(self, old: procs.Pinned) -> None:
        # Unicorn renames .oldbin back itself when it reaps the failed master;
        # writing the file under it makes its rename fail ("Already running").
        pass

    def start_next(self, old: procs.Pinned, started: int, deadline: float,
                   intended: Optional[str]) -> Steps[procs.Pinned]:
        known: Set[int] = set(procs.children(old.pid))   # the old master's workers
        self.prepare_pid_files(old)
        if not old.signal(self.host.profile.reexec):
            raise ReloadFailed(f"old master {old.pid} exited before the upgrade began")
        seen = {"oldbin": False, "orphaned_at": None}

        def found(wait: Wait) -> Optional[procs.Pinned]:
            new = self._find(old, known, started)
            if new is not None:
                return new
            if self.oldbin and os.path.exists(self.oldbin):
                seen["oldbin"] = True
            elif seen["oldbin"] and procs.read_pid_file(self.pid_file) == old.pid:
                # Unicorn reaped its re-exec'd child and put its own pid file back.
                raise ReloadFailed("new master exited during boot, before it could be watched"
                                   + self.host.server_error(old.pid))
            if not old.alive():
                # Its child, if it forked one, now belongs to the manager: _find looks
                # there too, for a moment, before giving up.
                seen["orphaned_at"] = seen["orphaned_at"] or time.monotonic()
                if time.monotonic() > seen["orphaned_at"] + 0.5:
                    raise ReloadFailed(f"old master {old.pid} exited before a new master appeared")
            return None

        def none_appeared(wait: Wait) -> None:
            raise ReloadFailed(f"no new master appeared within {self.host.config.ready_timeout:g} s "
                               f"of {self.host.profile.reexec.name} to {old.pid} (see the server's log)")
        return (yield Wait(f"the re-exec'd child of {old.pid}", found, deadline=deadline, every=0.02,
                           expired=none_appeared))

    def _find(self, old: procs.Pinned, known: Set[int], started: int) -> Optional[procs.Pinned]:
        """The old master's re-exec'd child; if the old master is already gone
        (killed, or QUIT by a hook), a process of the unit born since the
        reload began and reparented away from it."""
        orphaned = not old.alive()
        candidates = procs.children(old.pid)
        if orphaned:
            # (not the shim, nor a `unicorn-shim reload` waiting in ExecReload=)
            candidates += [p for p in procs.cgroup_members(self.host.cgroup)
                           if p not in self.host.masters and "unicorn-shim" not in procs.title(p)]
        parent_title = procs.title(old.pid)
        for pid in candidates:
            if pid in known or self.host.profile.worker_title.search(procs.title(pid)):
                known.add(pid)
                continue
            if not orphaned and procs.title(pid) == parent_title:
                # A fork that has not exec'd or renamed itself yet: a respawned
                # worker looks like this for a moment, and so does the re-exec'd
                # master before its exec. Look again next time.
                continue
            try:
                return procs.pin(pid, self.host.cgroup, parent=None if orphaned else old.pid,
                                 not_before=started)
            except procs.UntrustedPid as e:
                self.host.log.event("untrusted-pid", str(e))
                known.add(pid)
        return None


class Spawn(Strategy):
    name = "spawn"
    pins_release = True

    def start_next(self, old: procs.Pinned, started: int, deadline: float,
                   intended: Optional[str]) -> Steps[procs.Pinned]:
        self.prepare_pid_files(old)
        if self.pid_file:
            try:
                os.rename(self.pid_file, self.oldbin)   # both servers refuse a pid file naming a live master
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ReloadFailed(f"cannot move pid file {self.pid_file} aside: {e.strerror}") from None
        try:
            return self.host.start_master(started, intended)
        except ShimError as e:       # e.g. the release's own bin/unicorn is missing
            raise ReloadFailed(str(e)) from None
        yield  # noqa: unreachable: a generator like every strategy's start_next, though it never waits


STRATEGIES = {"usr2": Usr2, "spawn": Spawn}
