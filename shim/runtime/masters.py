"""The masters: starting one from the held sockets, watching it with a pidfd,
waiting until its workers serve, retiring it. What a hand-over and an upgrade
strategy may do (the Host they see); which master serves, and what systemd is
told, is the supervisor's alone.
"""
from __future__ import annotations

import os
import signal
import time

from shim.runtime import health, probe, procs, sockets, spawn
from shim.errors import ReloadFailed, Stopping
from shim.runtime.journal import WARNING, Log
from shim.runtime.loop import Loop, Wait
from shim.runtime.readiness import Verdict, WorkerWatch, hook_environment
from shim.runtime.channel import HOOK_ENV, HookChannels, HookReports
from shim.runtime.release import config_through
from shim.runtime.sockets import HeldSocket

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Dict, Generator, List, Optional, TypeVar

    T = TypeVar("T")
    Steps = Generator[Wait, object, T]     # a step of the lifecycle: the loop drives it (loop.run)

SAMPLE = 0.05           # how often workers are looked at while a master boots
WORKERLESS_GRACE = 2.0  # how long a master with no live worker gets to stop gracefully
# A master that failed to become ready serves little or nothing: it gets this
# long to finish what it may have accepted, not the full --retire-timeout.
FAILED_MASTER_GRACE = 10.0
STOP_CUT_GRACE = 2.0        # seconds a stop gives a hand-over's master that does not serve
# --ready-timeout counts a booting master's own time: seconds it spent waiting for a
# CPU (many apps reloaded at once on a few cores) extend it, up to this many times.
CPU_WAIT_LIMIT = 4
# During --probation: a probe every this often, each to be answered within the timeout.
PROBATION_PROBE_INTERVAL = 0.25
PROBATION_PROBE_TIMEOUT = 1.0


class Masters:
    def __init__(self, config: "object", sockets: List[HeldSocket], log: Log, environ: Dict[str, str],
                 loop: Loop) -> None:
        self.config = config
        self.loop = loop
        self.profile = config.profile
        self.sockets = sockets
        self.log = log
        self.environ = environ                   # the shim's own, for every master: never a stale one
        self.cgroup = procs.cgroup_of(os.getpid())
        self.reports = HookReports()
        self.masters: Dict[int, procs.Pinned] = {}       # every master alive and pinned
        self.stop_requested = False
        self.hook_socket: Optional[HookChannels] = None     # every master's report channel
        self.notifier = None                     # the supervisor's: systemd's timeouts follow ours
        self.probes_made = 0                     # each master's probe socket has a name of its own

    def _on_master_exit(self, master: procs.Pinned) -> None:
        self.loop.remove_reader(master.pidfd)
        master.exit_text = procs.exit_description(master.pid)
        if master.role == "old":
            # Logged the moment it happens: the old master may go on its own
            # (the common before_fork hook QUITs it) long before the hand-over ends.
            self.log.event("retired", f"old master {master.pid} {master.exit_text}",
                           OLD_MASTER_PID=master.pid, GENERATION=master.generation)
        self.masters.pop(master.pid, None)
        if self.hook_socket:
            self.hook_socket.drain()     # its last words, and its workers', before it is forgotten
        self.reports.forget(master.pid)
        sockets.unlink_probe(master.probe)
        master.close()     # one pidfd per generation: a long-lived shim must not collect them

    def gone(self, master: procs.Pinned) -> bool:
        """Whether `master` exited; if the loop has not dispatched its pidfd yet,
        its exit is recorded now, so that what follows can say how it ended."""
        if master.alive():
            return False
        if self.masters.get(master.pid) is master:
            self._on_master_exit(master)
        return True

    def start_master(self, not_before: int, release: Optional[str] = None,
                     link: Optional[str] = None) -> procs.Pinned:
        """Spawn a master from the held sockets and pin it.

        With `release` (the real directory behind --chdir) the master starts there
        with PWD naming it, so code it loads later (Gunicorn puts PWD on sys.path)
        comes from that release, never from the one `current` names later.
        Without, PWD names --chdir itself, which Unicorn's own re-exec follows.
        A relative config path is named through `link` (default --chdir), and a
        path through --chdir through `link` when that is another release."""
        self.probes_made += 1
        probe_socket = sockets.bind_probe(self.config.runtime_dir, self.probes_made)
        held = self.sockets + [probe_socket]     # the probe socket last, after the public ones
        fds = [s.fileno() for s in held]
        fd_numbers = list(range(spawn.FD_START, spawn.FD_START + len(fds)))
        # The master's report channel comes after the held sockets, which the server counts.
        channel = self.hook_socket.open()
        env = spawn.server_environment(self.environ, {**self.profile.socket_env(fd_numbers),
                                                      **hook_environment(self.environ),
                                                      HOOK_ENV: channel.environment(spawn.FD_START + len(fds))})
        argv = config_through(self.config.command, self.profile.config_flags, link or self.config.chdir,
                              self.config.chdir)
        argv += self.profile.listen_args([s.name for s in held])
        try:
            pid = spawn.spawn(argv, env, fds + [channel.peer.fileno()], chdir=release or self.config.chdir,
                              set_listen_pid=self.profile.sets_listen_pid, pid_env=(HOOK_ENV,))
        except BaseException:
            self.hook_socket.discard(channel)
            sockets.release([probe_socket])
            raise
        self.hook_socket.started(channel, pid)
        probe_socket.sock.close()    # the master holds it now: once the master is gone, a probe is refused
        try:
            master = procs.pin(pid, self.cgroup, not_before=not_before)
        except procs.UntrustedPid as e:
            sockets.unlink_probe(probe_socket.unlink_path)
            try:
                os.kill(pid, signal.SIGKILL)   # our own grandchild, a moment old: no reuse possible
            except ProcessLookupError:
                pass
            raise ReloadFailed(f"master {pid} cannot be watched: {e} (see the server's log)") from None
        master.probe = probe_socket.unlink_path
        self.watch(master)
        return master

    def watch(self, master: procs.Pinned) -> None:
        self.masters[master.pid] = master
        self.loop.add_reader(master.pidfd, self._on_master_exit, master)

    def wait_ready(self, master: procs.Pinned, deadline: float, what: str) -> Steps[Verdict]:
        """Wait until `master`'s workers are ready and it answers a probe over its own
        socket, or raise ReloadFailed. The hook and the heuristic say when its workers
        are up and how many; only an answer proves they serve (a worker hung importing
        the app sleeps like one waiting for connections)."""
        prober = self.prober(master)
        try:
            return (yield from self._wait_ready(master, deadline, what, prober))
        finally:
            if prober is not None:
                prober.stop()

    def prober(self, master: procs.Pinned) -> Optional[probe.Prober]:
        """Probing `master` from now on; None without a probe socket of its own (a master
        re-exec'd by usr2 shares its parent's) or with no probe configured."""
        if not (master.probe and self.config.probe):
            return None
        return probe.Prober(self.loop, master.probe, self.config.probe).start()

    def _wait_ready(self, master: procs.Pinned, deadline: float, what: str,
                    prober: Optional[probe.Prober]) -> Steps[Verdict]:
        watch = WorkerWatch(master.pid, self.profile, self.reports, self.config.settle, time.monotonic())
        waits = CpuWait(master.pid)
        extended = [0.0, 0.0]      # seconds of CPU wait counted, and told to systemd
        workers_ready: List[float] = []      # when the hook or the heuristic said so

        def ready(wait: Wait) -> Optional[Verdict]:
            if self.gone(master):
                raise ReloadFailed(f"{what} {master.pid} {master.exit_text or 'exited'} before it was ready"
                                   + self.server_error(master.pid))
            now = time.monotonic()
            watch.sample(now)
            verdict = watch.verdict(now)
            if verdict.state == "ready":
                workers_ready[:] = workers_ready or [now]
                if prober is None or prober.answer is not None:
                    return verdict._replace(probe_wait=now - workers_ready[0])
            if verdict.state == "failed":
                raise ReloadFailed(f"{what} {master.pid}: {verdict.detail}" + self.server_error(master.pid))
            waited = min(waits.seconds(), CPU_WAIT_LIMIT * self.config.ready_timeout)
            wait.deadline = deadline + waited
            if waited - extended[1] >= 1.0 and self.notifier:
                # systemd's job timeout moves with ours (its reload job is bounded too)
                self.notifier.extend_timeout(self.job_extension(
                    wait.deadline - now + self.config.retire_timeout + 10, waited - extended[1]))
                extended[1] = waited
            extended[0] = waited
            return None

        def too_late(wait: Wait) -> None:
            waited = extended[0]
            lost = f", and {waited:.0f} s more it spent waiting for a CPU" if waited >= 1 else ""
            # What was seen: a master that hangs loading the app logs nothing to point at.
            verdict = watch.verdict(time.monotonic())
            seen = (f"{verdict.workers} workers ready by {verdict.detail}" if verdict.state == "ready"
                    else verdict.detail) + (f"; {prober.describe()}" if prober else "")
            raise ReloadFailed(f"{what} {master.pid} not ready within {self.config.ready_timeout:g} s"
                               f"{lost} ({seen})" + self.server_error(master.pid, pointer=False))
        return (yield Wait(f"{what} {master.pid} ready", ready, deadline=deadline, every=SAMPLE,
                           expired=too_late))

    def job_extension(self, wanted: float, moved: float) -> float:
        """EXTEND_TIMEOUT_USEC= for a ready timeout moved by `moved` s of CPU wait:
        `wanted` (what the rest of the job may take), unless a reload's deadline says
        otherwise (the supervisor's)."""
        return wanted

    def server_error(self, pid: int, pointer: bool = True) -> str:
        """': <the server's own error line>' for `pid` or its workers, as its
        reporter sent it (read now: it may still sit in the socket), or (with
        `pointer`) a pointer to the server's log."""
        if self.hook_socket:
            self.hook_socket.drain()
        error = self.reports.error_of(pid)
        if error:
            return f": {error}"
        return " (the server's own log in the journal says why)" if pointer else ""

    def health_failure(self, socket_path: Optional[str]) -> Steps[Optional[str]]:
        """The --health-check asked of the generation listening on `socket_path`: None
        when it passes, else the reason."""
        if not socket_path:
            return f"health check {self.config.health_check}: no probe socket to ask it over"
        return (yield from health.check(self.loop, socket_path, self.config.health_check)) or None

    def verify_serving(self, master: procs.Pinned, release: Optional[str]) -> Steps[Optional[str]]:
        """After a rollback: '' when `master` still runs in `release` (its working
        directory before the hand-over) and answers a probe over its own socket now,
        else what was seen; None when no probe is configured."""
        if not self.config.probe:
            return None
        now_in = procs.cwd(master.pid)
        if release and now_in != release:
            return f"it now runs in {now_in}, not in {release}"
        if not master.probe:
            return "it has no probe socket of its own"
        result = yield from probe.attempt(self.loop, master.probe, self.config.probe)
        return "" if result.ok else result.seen

    def probation(self, master: procs.Pinned, seconds: float) -> Steps[Optional[str]]:
        """Watch `master` for `seconds` after it was found ready, while the old generation
        stands by (shim/runtime/standby.py): None when nothing went wrong, else what was seen. Wrong:
        the master exits, a worker dies with an error its reporter sends (a worker recycled
        by max_requests exits cleanly, says nothing, and is replaced), or a probe over its
        socket is not answered in PROBATION_PROBE_TIMEOUT or not accepted (a stalled or
        timed-out worker)."""
        self.reports.clear_errors(master.pid)      # what its boot tolerated is not this window's
        watch = WorkerWatch(master.pid, self.profile, self.reports, self.config.settle, time.monotonic())
        watch.sample(time.monotonic())
        watcher = None
        if master.probe and self.config.probe:
            watcher = probe.Watcher(self.loop, master.probe, self.config.probe, PROBATION_PROBE_TIMEOUT,
                                    PROBATION_PROBE_INTERVAL).start()

        def failed(wait: Wait) -> Optional[str]:
            if self.gone(master):
                return f"new master {master.pid} {master.exit_text or 'exited'} during probation" + \
                    self.server_error(master.pid)
            watch.sample(time.monotonic())
            error = self.server_error(master.pid, pointer=False) if watch.deaths else ""
            if error:
                return (f"{watch.deaths} worker{'s' if watch.deaths > 1 else ''} of new master "
                        f"{master.pid} died during probation{error}")
            if watcher is not None and watcher.failure is not None:
                return (f"new master {master.pid} failed a probe during probation "
                        f"(GET {self.config.probe.path}: {watcher.failure.seen}; "
                        f"{watcher.answered} answered before)")
            return None
        try:
            return (yield Wait(f"new master {master.pid} on probation", failed,
                               deadline=time.monotonic() + seconds, every=SAMPLE))
        finally:
            if watcher is not None:
                watcher.stop()

    def wait_exit(self, proc: procs.Pinned, timeout: float, interruptible: bool = False) -> Steps[bool]:
        """True once `proc` exited, False after `timeout` seconds."""
        exited = yield Wait(f"{proc.role} {proc.pid} to exit", lambda wait: True if not proc.alive() else None,
                            deadline=time.monotonic() + timeout, every=SAMPLE, expired=lambda wait: False,
                            interruptible=interruptible)
        return bool(exited)

    def retire(self, master: procs.Pinned, keep: Optional[int] = None,
               grace: Optional[float] = None, interruptible: bool = False) -> Steps[None]:
        """Graceful stop of `master`; KILL it and its workers after `grace`
        (default --retire-timeout). `interruptible`: a stop or the reload's client
        going away ends the wait at once (the drain goes on; a stop retires every
        master)."""
        yield from self.retire_all([master], keep, grace, interruptible)

    def stop_all(self, masters: List[procs.Pinned], serving: Optional[procs.Pinned]) -> Steps[None]:
        """The stop: the master that serves stops gracefully, as in steady state; a hand-over's
        other one (the old one draining, a new one booting or being checked) is not waited for."""
        yield from self.retire_all([m for m in masters if m is not serving], grace=STOP_CUT_GRACE)
        yield from self.retire_all([m for m in masters if m is serving])

    def retire_all(self, masters: List[procs.Pinned], keep: Optional[int] = None,
                   grace: Optional[float] = None, interruptible: bool = False) -> Steps[None]:
        """`retire` for several masters at once: all are asked to stop, then waited for."""
        grace = self.config.retire_timeout if grace is None else grace
        going = []
        for master in masters:
            if not master.alive():
                continue
            workers = []
            for pid in procs.children(master.pid):
                if pid != keep:
                    try:
                        workers.append(procs.pin(pid, self.cgroup, parent=master.pid, role="worker"))
                    except procs.UntrustedPid:
                        pass
            # Without a live worker nothing is in flight, so a master that ignores its
            # graceful stop (Gunicorn halting on a boot error) is not waited for.
            own_grace = grace if any(worker.alive() for worker in workers) else min(grace, WORKERLESS_GRACE)
            master.signal(self.profile.graceful_stop)
            going.append((master, workers, time.monotonic() + own_grace, own_grace))
        try:
            for master, _workers, deadline, own_grace in going:
                if not (yield from self.wait_exit(master, deadline - time.monotonic(), interruptible)):
                    self.log.event("retire-timeout", f"master {master.pid} still running after "
                                   f"{own_grace:g} s; killing it", WARNING, MASTER_PID=master.pid)
                    master.signal(signal.SIGKILL)
                    yield from self.wait_exit(master, 5)
        except (Stopping, ReloadFailed):
            for _master, workers, _deadline, _grace in going:
                for worker in workers:
                    worker.close()       # they drain on: the stop that follows retires their master
            raise
        for _master, workers, _deadline, _grace in going:
            for worker in workers:
                if worker.alive():
                    worker.signal(signal.SIGKILL)
                worker.close()


class CpuWait:
    """How long a booting master was held back by a busy host: the time its own
    thread waited for a CPU, plus the longest such wait of one of its workers
    (they boot side by side). A hung master waits for nothing, so it still times
    out on time; one that spins gets its CPU share and uses up its timeout."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.start = procs.cpu_wait(master)
        self.workers: Dict[int, float] = {}     # last value seen: a worker's count ends with it

    def seconds(self) -> float:
        for pid in procs.children(self.master):
            self.workers[pid] = max(self.workers.get(pid, 0.0), procs.cpu_wait(pid))
        own = max(0.0, procs.cpu_wait(self.master) - self.start)
        return own + max(self.workers.values(), default=0.0)

