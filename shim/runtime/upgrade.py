"""The two ways to start the next generation of masters.

usr2:  the server re-execs itself; the new master is the old one's child
       until the old one exits. What Unicorn configs and hooks expect.
spawn: the shim starts the next master exactly as at boot, from the sockets
       it holds. The new master is the manager's child from the start.

usr2 moves the pid file to .oldbin (Unicorn does it), so the common
`before_fork` hook QUITs the old master; spawn removes it, so that hook finds no
.oldbin and the old master serves until the shim retires it.
"""
from __future__ import annotations

import os
import signal
import time
from shim.runtime import procs, release
from shim.runtime.loop import Wait
from shim.errors import ReloadFailed, ShimError, WrongRelease

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Protocol, Set, Tuple

    from shim.runtime.masters import Steps

    class Host(Protocol):
        """What a strategy and a hand-over may use of the supervisor: acting on
        processes and waiting. Its state (which master serves, the generation, what
        systemd is told) is the supervisor's alone to change."""

        config: Any
        profile: Any
        loop: Any
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
        def health_failure(self, socket_path: Optional[str]) -> Steps[Optional[str]]: ...
        def verify_serving(self, master: procs.Pinned, release: Optional[str]) -> Steps[Optional[str]]: ...
        def probation(self, master: procs.Pinned, seconds: float) -> Steps[Optional[str]]: ...


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

    def check_exec(self, new: procs.Pinned, deadline: float, intended: Optional[str]) -> Steps[None]:
        """Refuse a new master pinned to another release as early as that shows (raises
        WrongRelease); a master started by the shim shows it only once ready."""
        return
        yield  # noqa: unreachable: a generator like every strategy's

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
    forked_from: Optional[Tuple[str, Optional[bytes]]] = None

    def restore(self, old: procs.Pinned) -> None:
        # Unicorn renames .oldbin back itself when it reaps the failed master;
        # writing the file under it makes its rename fail ("Already running").
        pass

    def start_next(self, old: procs.Pinned, started: int, deadline: float,
                   intended: Optional[str]) -> Steps[procs.Pinned]:
        known: Set[int] = set(procs.children(old.pid))   # the old master's workers
        self.prepare_pid_files(old)
        # What /proc shows of the re-exec'd child until its exec: the old master's copies
        self.forked_from = (procs.title(old.pid), release.environ_bytes(old.pid))
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

    def check_exec(self, new: procs.Pinned, deadline: float, intended: Optional[str]) -> Steps[None]:
        """The re-exec'd master's environment is final from its exec on, a few ms after
        its fork and a second or more before its first worker answers (Ruby, Bundler,
        the app are still to load): a Gemfile of another release is refused then. Before
        its exec it is a copy of the old master, old Gemfile and all: never read then."""
        title, environ = self.forked_from or ("", None)
        if not intended or not new.alive() or environ is None:
            return

        def execd(wait: Wait) -> Optional[bool]:
            if not new.alive() or procs.children(new.pid):
                return False     # one that forked has long exec'd: the ready check reads it then
            seen = release.exec_seen(new.pid, title, environ)
            return False if seen is None else seen or None
        if (yield Wait(f"new master {new.pid} to exec", execd, deadline=deadline, every=0.005,
                       expired=lambda wait: False)):
            reason = release.gemfile_mismatch(new.pid, intended)
            if reason:
                if not procs.children(new.pid):
                    # Nothing of it serves yet and nothing is in flight: killed, not asked to
                    # quit. Unicorn queues a QUIT that arrives once its traps are set until
                    # it has spawned its workers, and they would answer meanwhile.
                    new.signal(signal.SIGKILL)
                raise WrongRelease(reason)

    def _find(self, old: procs.Pinned, known: Set[int], started: int) -> Optional[procs.Pinned]:
        """The old master's re-exec'd child; if the old master is already gone
        (killed, or QUIT by a hook), a process of the unit born since the
        reload began and reparented away from it."""
        orphaned = not old.alive()
        candidates = procs.children(old.pid)
        if orphaned:
            # (not the shim, nor a `unicorn-shim reload` waiting in ExecReload=, told by the
            # command, interpreter and script: a master's arguments name its probe socket,
            # in a runtime directory that may be called unicorn-shim too)
            candidates += [p for p in procs.cgroup_members(self.host.cgroup) if p not in self.host.masters
                           and not any(os.path.basename(w) == "unicorn-shim" for w in procs.title(p).split()[:2])]
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
            # Unicorn and Gunicorn refuse to start over a pid file naming a live master.
            # Removed, not moved to .oldbin as Unicorn's USR2 does: the common before_fork
            # hook QUITs whatever .oldbin names as the new master forks its first worker,
            # and then nothing accepts until that worker runs (a 1 s stall with the hook's
            # sleep 1). The shim retires the old master itself, once the new one is proven;
            # a rollback writes the old master's pid back.
            try:
                os.unlink(self.pid_file)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ReloadFailed(f"cannot remove pid file {self.pid_file}: {e.strerror}") from None
        try:
            return self.host.start_master(started, intended)
        except ShimError as e:       # e.g. the release's own bin/unicorn is missing
            raise ReloadFailed(str(e)) from None
        yield  # noqa: unreachable: a generator like every strategy's start_next, though it never waits


STRATEGIES = {"usr2": Usr2, "spawn": Spawn}
