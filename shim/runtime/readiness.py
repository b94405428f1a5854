"""When is a master ready to serve?

Exactly, when the server loads the shipped hook (`require "unicorn_shim"` in
the Unicorn config, or shim.hooks.gunicorn in Gunicorn's): the master says
hello when its config loads, each worker reports once it is ready to accept.
Otherwise by a heuristic: the master has workers (by process title), each of
them has been seen waiting for connections (asleep in poll/select/accept, as
the kernel reports it), and their set has not changed for a short settle
window (0.1 s). Under load a serving worker still passes through its wait
between requests; a worker loading the app does not.

Either way worker births and deaths are counted from samples, so a release
whose workers crash-loop, or whose master stops reaping its dead workers, is
rejected in seconds rather than at the timeout.
"""
from __future__ import annotations

import os
import re
from collections import namedtuple

from shim.runtime import procs
from shim.runtime.channel import HookReports
from shim.runtime.servers import ServerProfile

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Dict, Optional, Set, Tuple

HOOKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hooks")
CRASH_LOOP_DEATHS = 3
# A master that leaves its only (dead) workers unreaped this long is not running
# its loop: Gunicorn 20.1 halting after "Worker failed to boot" does this for
# graceful_timeout when two workers die at once (it reaps one, waits for the other).
UNREAPED_LIMIT = 1.5
# Where a worker that has loaded the app sleeps: in its accept loop.
WAITING = re.compile(r"poll|select|accept|wait_for_connect")
# With the hook loaded, how long workers may all wait for connections without
# their reports arriving before the heuristic is trusted instead.
HOOK_SILENCE = 2.0
# Without the hook, the same workers alive this long count as booted even when
# none was seen waiting (each one busy serving whenever it was looked at).
STEADY = 1.2


def hook_environment(environ: Dict[str, str]) -> Dict[str, str]:
    """Lets a Unicorn config `require "unicorn_shim"` and a Gunicorn config
    `from unicorn_shim_gunicorn import post_worker_init` wherever the shim is installed."""
    env = {}
    for var, lang in (("RUBYLIB", "ruby"), ("PYTHONPATH", "python")):
        path = os.path.join(HOOKS_DIR, lang)
        env[var] = f"{path}:{environ[var]}" if environ.get(var) else path
    # Each directory also carries the failure reporter, which the interpreter
    # loads at start by itself: Python's sitecustomize.py, and for Ruby the
    # rubygems/defaults/operating_system.rb that RubyGems loads before any -r.
    return env


class Verdict(namedtuple("Verdict", "state workers detail since probe_wait", defaults=("", 0.0, 0.0))):
    """state: "ready", "booting" or "failed"; workers counted; detail: by what it was
    judged; since: when the server became ready, as far as can be known (monotonic);
    probe_wait: seconds from then until its probe was answered (the probe's cost)."""

    __slots__ = ()


class WorkerWatch:
    """Follows one master's workers from its birth until it is ready."""

    def __init__(self, master: int, profile: ServerProfile, reports: HookReports,
                 settle: float, now: float) -> None:
        self.master = master
        self.profile = profile
        self.reports = reports
        self.settle = settle
        self.alive: Set[int] = set()
        self.births = 0
        self.deaths = 0
        self.unreaped = 0
        self.unreaped_since: Optional[float] = None
        self.activity: Dict[int, Tuple[str, int]] = {}
        self.waited: Set[int] = set()               # workers ever seen waiting for connections
        self.peak = 0                               # most workers alive at once so far
        self.changed = now                          # when that peak last grew
        self.set_changed = now                      # last birth or death of any worker
        self.all_waiting_since: Optional[float] = None

    def sample(self, now: float) -> None:
        current: Set[int] = set()
        unreaped = 0
        for pid in procs.children(self.master):
            if procs.is_zombie(pid):          # a dead worker, whatever its title pattern matches
                unreaped += 1
            elif self.profile.worker_title.search(procs.title(pid)):
                current.add(pid)
        born, died = current - self.alive, self.alive - current
        self.births += len(born)
        self.deaths += len(died)
        if born or died:
            self.set_changed = now
        if len(current) > self.peak:
            # Forking its workers (a respawn after a recycled one keeps the count)
            self.peak, self.changed = len(current), now
        self.alive = current
        self._look_for_waiting(current, now)
        self.unreaped = unreaped
        if unreaped and not current:
            if self.unreaped_since is None:
                self.unreaped_since = now
        else:
            self.unreaped_since = None

    def _look_for_waiting(self, workers: Set[int], now: float) -> None:
        """A worker that has loaded the app waits for connections: the kernel shows
        it asleep in poll/select/epoll/accept. Where /proc/PID/wchan cannot be read
        (a worker of another user), asleep without using a clock tick since the
        last look means the same. A worker still loading the app runs, or waits on
        the disk; one that sleeps on something else (a database in after_fork)
        counts too early: requests then wait in the socket's queue, none fails."""
        seen = {}
        for pid in workers:
            now_activity = procs.activity(pid)
            if now_activity is None:
                continue
            seen[pid] = now_activity
            if pid in self.waited:
                continue
            state, ticks = now_activity
            if WAITING.search(procs.wchan(pid, self.profile.accept_thread)) or (
                    state == "S" and self.activity.get(pid, ("", -1))[1] == ticks):
                self.waited.add(pid)
        self.activity = seen
        # As many workers as the master runs have reached their accept loop (under
        # churn, a respawned one may still be booting beside them).
        if not (workers and len(self.waited) >= self.peak):
            self.all_waiting_since = None
        elif self.all_waiting_since is None:
            self.all_waiting_since = now

    def verdict(self, now: float) -> Verdict:
        n = len(self.alive)
        booted = self.waited | self.reports.ready_pids(self.master)
        # Deaths with not one worker ever booted: the release cannot serve. Once one
        # has (seen waiting, or reported by the hook), later deaths are recycles
        # (max_requests, a memory limit) or luck.
        if self.deaths >= CRASH_LOOP_DEATHS and not booted:
            return Verdict("failed", n, f"workers crash-looping: {self.deaths} workers died during boot "
                                        f"({self.births} started)")
        if self.unreaped_since is not None and now - self.unreaped_since >= UNREAPED_LIMIT:
            return Verdict("failed", 0, f"its workers died during boot and it left {self.unreaped} unreaped "
                                        f"for {UNREAPED_LIMIT:g} s: it is shutting down, not booting")
        heuristic_ready = bool(n and self.all_waiting_since is not None and now - self.changed >= self.settle)
        if self.master in self.reports.hello:
            live = [t for pid, _of, t in self.reports.ready.get(self.master, {}).values() if pid in self.alive]
            expected = self.reports.expected(self.master)
            if expected and len(live) >= expected:
                return Verdict("ready", expected, "the readiness hook", max(live))
            # Every worker waits for connections, yet their reports do not come: the
            # channel did not reach them (a server or app that closes inherited fds).
            if heuristic_ready and now - self.all_waiting_since >= HOOK_SILENCE:
                return Verdict("ready", n, f"heuristic: {n} workers waiting for connections; the hook's "
                                           f"worker reports never arrived ({len(live)} of {n})",
                               self.all_waiting_since)
            return Verdict("booting", n, self._seen() + f", {len(live)} of {expected or n} reported ready "
                                                        "by the readiness hook")
        if heuristic_ready:
            return Verdict("ready", n, f"heuristic: {n} workers waiting for connections",
                           max(self.changed, self.all_waiting_since))
        if n and now - self.set_changed >= STEADY:
            # Workers too busy to be seen waiting (a saturated host, every worker
            # serving): the same workers alive for STEADY seconds have booted.
            return Verdict("ready", n, f"heuristic: {n} workers unchanged for {STEADY:g} s", self.set_changed)
        return Verdict("booting", n, self._seen())

    def _seen(self) -> str:
        """While booting, what was seen of the workers, for a reason: '2 workers up, 0 seen
        waiting for connections' (a hang at import looks like that), '0 workers up, 1 died'."""
        n = len(self.alive)
        seen = f"{n} worker{'' if n == 1 else 's'} up"
        if self.deaths:
            seen += f", {self.deaths} died"
        if n:
            seen += f", {len(self.waited & self.alive)} seen waiting for connections"
        return seen
