"""One reload: start the next generation, wait until it serves, retire the old.

The hand-over acts on processes only; it returns an Outcome, and the
supervisor alone changes its state and tells systemd and the journal
(MAINPID stays on the shim for the whole hand-over, so the old master may
exit at any moment, the common `before_fork` hook QUITs it, without systemd
seeing its main process die; MAINPID moves to the new master only once the
old one is gone and the new one has been reparented to the manager).
"""
from __future__ import annotations

import os
import signal
import time
from collections import namedtuple

from shim.runtime import health, procs, release
from shim.errors import ReloadFailed, Stopping, WrongRelease
from shim.runtime.loop import Wait
from shim.runtime.masters import FAILED_MASTER_GRACE, SAMPLE

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Optional, Tuple

    from shim.runtime.masters import Steps
    from shim.runtime.upgrade import Host, Strategy

OLD_MASTER_GOING = 3.0     # seconds an old master, maybe QUIT by a hook, gets to exit on its own


class Outcome(namedtuple("Outcome", "result old new generation intended duration reason workers timings",
                         defaults=("", None, None))):
    """What a hand-over did. result: done (the new master serves, the old one is
    gone), rolled-back (the old one serves on), not-deployed (the new master serves
    the old release: the old one was gone already), nothing-serving, stopped.
    old, new: the masters (new may be None); intended: the release deployed;
    workers: the new master's, when done; timings: where the time went (ms)."""

    __slots__ = ()


def hand_over(host: "Host", old: procs.Pinned, gen: int, strategy: "Strategy") -> Steps[Outcome]:
    """The hand-over's steps (the loop drives them, shim/runtime/loop.py)."""
    t0, started = time.monotonic(), procs.now_ticks()
    deadline = t0 + host.config.ready_timeout
    new: Optional[procs.Pinned] = None
    workers_stopped = False      # the old master's, for a health check; undone on rollback
    old.role = "old"
    intended = release.resolve(host.config.chdir)

    def outcome(result: str, reason: str = "", **kw: object) -> Outcome:
        return Outcome(result, old, new, gen, intended, time.monotonic() - t0, reason, **kw)
    try:
        new = yield from strategy.start_next(old, started, deadline, intended)
        new.generation = gen
        if new.pid not in host.masters:
            host.watch(new)
        host.checkpoint()
        host.notifier.status(f"reloading: new master {new.pid} booting, old master {old.pid} serving")
        found_ms = int((time.monotonic() - t0) * 1000)
        ready = yield from host.wait_ready(new, deadline, "new master")
        ready_ms = int((time.monotonic() - t0) * 1000)
        wrong_release = intended and release.mismatch(new.pid, intended)
        if wrong_release:
            raise WrongRelease(wrong_release)
        host.checkpoint()
        if host.config.health_check:
            reason, workers_stopped = yield from _health_check(host, old, new)
            if reason:
                raise ReloadFailed(reason)
            host.checkpoint()
        host.commit()       # from here on the old master goes: no client leaving can undo it
        retire_start = time.monotonic()
        yield from host.retire(old, keep=new.pid, interruptible=True)
        retire_end = time.monotonic()
        host.checkpoint()
    except WrongRelease as e:
        if old.alive() and new is not None and new.alive():
            # The config's before_fork hook may have QUIT the old master a moment ago
            # (it is finishing its requests): rolling back now would stop the only
            # master left. Give it the time to go if it is going.
            yield from host.wait_exit(old, OLD_MASTER_GOING)
        if not old.alive() and new is not None and new.alive():
            # The config's own hook already retired the old master; the new one
            # serves the old release as well as it did: keep it, fail the deploy.
            strategy.finish(new)
            return outcome("not-deployed", str(e))
        return outcome((yield from _roll_back(host, old, new, workers_stopped, strategy)), str(e))
    except ReloadFailed as e:
        return outcome((yield from _roll_back(host, old, new, workers_stopped, strategy)), str(e))
    except Stopping:
        if workers_stopped and old.alive():
            old.signal(host.profile.respawn_workers)    # serve on while the stop drains it
        return outcome("stopped", "the service is stopping")
    except Exception as e:   # a bug must not leave MAINPID on the shim and the state "reloading"
        host.log.error("internal-error", f"reload: {type(e).__name__}: {e}")
        return outcome((yield from _roll_back(host, old, new, workers_stopped, strategy)),
                       f"internal error: {type(e).__name__}: {e}")

    strategy.finish(new)
    duration = time.monotonic() - t0
    server_boot, retire = ready.since - t0, retire_end - retire_start
    # where the time went: the server's own boot and the old master's drain are
    # the server's; the rest is the shim's
    timings = {"new_master_found_ms": found_ms, "server_boot_ms": int(server_boot * 1000),
               "ready_seen_ms": ready_ms, "retire_ms": int(retire * 1000),
               "shim_overhead_ms": int((duration - server_boot - retire) * 1000)}
    return outcome("done", workers=ready.workers, timings=timings)


def _health_check(host: "Host", old: procs.Pinned,
                  new: procs.Pinned) -> Steps[Tuple[Optional[str], bool]]:
    """Check the new release alone: the old master's workers must not answer.

    Unicorn: WINCH stops them gracefully (HUP brings them back on a rollback).
    A server without such a signal (Gunicorn: WINCH only acts when daemonized):
    its workers are paused with SIGSTOP for the check's few milliseconds, so the
    shared socket's queue goes to the new workers; requests in flight on the old
    ones wait, none fails. Returns the failure (or None) and whether the old
    workers were stopped (to be brought back on a rollback).
    """
    paused, stopped = [], False
    if old.alive() and host.profile.stop_workers is not None:
        old.signal(host.profile.stop_workers)
        stopped = True
        yield Wait(f"the old master {old.pid}'s workers to stop",
                   lambda wait: None if [p for p in procs.children(old.pid) if p != new.pid] else True,
                   deadline=time.monotonic() + host.config.retire_timeout, every=SAMPLE)
    elif old.alive():
        for pid in procs.children(old.pid):
            try:
                worker = procs.pin(pid, host.cgroup, parent=old.pid, role="worker")
            except procs.UntrustedPid:
                continue
            worker.signal(signal.SIGSTOP)
            paused.append(worker)
        # SIGSTOP takes effect thread by thread, when each next runs: a Puma worker's
        # accept thread was seen taking the check's connection after it was sent.
        yield Wait(f"the old master {old.pid}'s workers to pause",
                   lambda wait: True if all(_all_threads_stopped(w.pid) for w in paused) else None,
                   deadline=time.monotonic() + 1.0, every=0.002)
    try:
        return (health.check(host.config.health_check) or None), stopped
    finally:
        for worker in paused:
            worker.signal(signal.SIGCONT)
            worker.close()


def _all_threads_stopped(pid: int) -> bool:
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X"):   # stopped or gone
                    return False
    except (OSError, IndexError):
        pass      # gone: nothing of it runs
    return True


def _roll_back(host: "Host", old: procs.Pinned, new: Optional[procs.Pinned],
               workers_stopped: bool, strategy: "Strategy") -> Steps[str]:
    """Put the old master back in charge; "rolled-back", or "nothing-serving"
    when it is gone too."""
    if workers_stopped and old.alive():
        old.signal(host.profile.respawn_workers)
        try:
            yield from host.wait_ready(old, time.monotonic() + host.config.ready_timeout, "old master")
        except ReloadFailed as e:
            host.log.error("rollback-error", f"old master did not get its workers back: {e}")
        except Stopping:
            pass              # the stop that follows retires every master anyway
    if new is not None and new.alive():
        yield from host.retire(new, grace=min(FAILED_MASTER_GRACE, host.config.retire_timeout))
    strategy.restore(old)
    return "rolled-back" if old.alive() else "nothing-serving"
