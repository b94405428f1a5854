"""One reload: start the next generation, wait until it serves, retire the old.

The hand-over acts on processes only; it returns an Outcome, and the
supervisor alone changes its state and tells systemd and the journal
(MAINPID stays on the shim for the whole hand-over, so the old master may
exit at any moment, the common `before_fork` hook QUITs it, without systemd
seeing its main process die; MAINPID moves to the new master only once the
old one is gone and the new one has been reparented to the manager).
"""
from __future__ import annotations

import signal
import time
from collections import namedtuple

from shim.runtime import procs, release, standby as standbys
from shim.errors import ReloadFailed, Stopping, WrongRelease
from shim.runtime.masters import FAILED_MASTER_GRACE

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Optional, Tuple

    from shim.runtime.masters import Steps
    from shim.runtime.standby import Standby
    from shim.runtime.upgrade import Host, Strategy

OLD_MASTER_GOING = 3.0     # seconds an old master, maybe QUIT by a hook, gets to exit on its own


class Outcome(namedtuple("Outcome", "result old new generation intended duration reason workers timings checked",
                         defaults=("", None, None, None))):
    """What a hand-over did. result: done (the new master serves, the old one is
    gone), rolled-back (the old one serves on), not-deployed (the new master serves
    the old release: the old one was gone already), nothing-serving, stopped.
    old, new: the masters (new may be None); intended: the release deployed;
    workers: the new master's, when done; timings: where the time went (ms);
    checked: after a rollback, what the old master's own probe saw ('' when it
    answered; None when no probe is configured)."""

    __slots__ = ()


def hand_over(host: "Host", old: procs.Pinned, gen: int, strategy: "Strategy") -> Steps[Outcome]:
    """The hand-over's steps (the loop drives them, shim/runtime/loop.py)."""
    t0, started = time.monotonic(), procs.now_ticks()
    deadline = t0 + host.config.ready_timeout
    new: Optional[procs.Pinned] = None
    standby: Optional[Standby] = None    # the old master's workers stopped; undone on rollback
    old.role = "old"
    intended = release.resolve(host.config.chdir)
    old_release = procs.cwd(old.pid)     # what a rollback must find it serving again

    def outcome(result: str, reason: str = "", **kw: object) -> Outcome:
        return Outcome(result, old, new, gen, intended, time.monotonic() - t0, reason, **kw)
    try:
        new = yield from strategy.start_next(old, started, deadline, intended)
        new.generation = gen
        if new.pid not in host.masters:
            host.watch(new)
        host.checkpoint()
        yield from strategy.check_exec(new, deadline, intended)    # usr2: a pinned Gemfile, before any worker
        host.notifier.status(f"reloading: new master {new.pid} booting, old master {old.pid} serving")
        found_ms = int((time.monotonic() - t0) * 1000)
        ready = yield from host.wait_ready(new, deadline, "new master")
        ready_ms = int((time.monotonic() - t0) * 1000)
        wrong_release = intended and release.mismatch(new.pid, intended)
        if wrong_release:
            raise WrongRelease(wrong_release)
        host.checkpoint()
        if host.config.health_check:
            reason, standby = yield from _health_check(host, old, new)
            if reason:
                raise ReloadFailed(reason)
            host.checkpoint()
        if host.config.probation:
            standby = standby or (yield from standbys.for_probation(host, old, new))
            host.notifier.status(f"reloading: new master {new.pid} on probation for {host.config.probation:g} s, "
                                 + (f"old master {old.pid} standing by with its workers stopped" if standby
                                    else f"old master {old.pid} serving beside it"))
            failure = yield from host.probation(new, host.config.probation)
            if failure:
                raise ReloadFailed(failure)
            host.checkpoint()
        if new.probe is None:
            # usr2: the new master serves on the old one's probe socket, its only one: the
            # file must outlive the old master
            new.probe, old.probe = old.probe, None
        host.commit()       # from here on the old master goes: no client leaving can undo it
        retire_start = time.monotonic()
        yield from host.retire(old, keep=new.pid, interruptible=True)
        retire_end = time.monotonic()
        host.checkpoint()
    except WrongRelease as e:
        if old.alive() and new is not None and new.alive() and procs.children(new.pid):
            # The config's before_fork hook may have QUIT the old master a moment ago
            # (it is finishing its requests): rolling back now would stop the only
            # master left. Give it the time to go if it is going. (A new master that
            # never forked ran no before_fork.)
            yield from host.wait_exit(old, OLD_MASTER_GOING)
        if not old.alive() and new is not None and new.alive():
            # The config's own hook already retired the old master; the new one
            # serves the old release as well as it did: keep it, fail the deploy.
            strategy.finish(new)
            return outcome("not-deployed", str(e))
        result, checked = yield from _roll_back(host, old, new, standby, strategy, old_release)
        return outcome(result, str(e), checked=checked)
    except ReloadFailed as e:
        result, checked = yield from _roll_back(host, old, new, standby, strategy, old_release)
        return outcome(result, str(e), checked=checked)
    except Stopping:
        if standby is not None:
            standby.on_stop()
        return outcome("stopped", "the service is stopping")
    except Exception as e:   # a bug must not leave MAINPID on the shim and the state "reloading"
        host.log.error("internal-error", f"reload: {type(e).__name__}: {e}")
        result, checked = yield from _roll_back(host, old, new, standby, strategy, old_release)
        return outcome(result, f"internal error: {type(e).__name__}: {e}", checked=checked)

    strategy.finish(new)
    duration = time.monotonic() - t0
    server_boot, retire = ready.since - t0, retire_end - retire_start
    # where the time went: the server's own boot and the old master's drain are
    # the server's; the rest is the shim's
    timings = {"new_master_found_ms": found_ms, "server_boot_ms": int(server_boot * 1000),
               "ready_seen_ms": ready_ms, "probe_wait_ms": int(ready.probe_wait * 1000),
               "retire_ms": int(retire * 1000),
               "shim_overhead_ms": int((duration - server_boot - retire) * 1000)}
    return outcome("done", workers=ready.workers, timings=timings)


def _health_check(host: "Host", old: procs.Pinned,
                  new: procs.Pinned) -> Steps[Tuple[Optional[str], Optional[Standby]]]:
    """Check the new release alone. Returns the failure (or None) and the old master's
    workers stopped for it (to be brought back on a rollback), if any.

    A new master of its own (spawn) is asked over its own probe socket: the old
    workers serve on, untouched, so a rollback needs nothing of the old master (a
    HUP would make Unicorn re-read its config, now the new release's, and move the
    old master into the release that failed). A usr2 master shares the old one's
    probe socket: the old workers are stopped gracefully first (WINCH) and brought
    back one by one on a rollback (TTIN; usr2 is Unicorn's alone).
    """
    if new.probe:
        return (yield from host.health_failure(new.probe)), None
    standby = standbys.Standby(host, old, serve_on_stop=True)
    standby.stop()
    if len(standby):
        yield from standby.gone(keep=new.pid)
    return (yield from host.health_failure(old.probe)), standby


def _roll_back(host: "Host", old: procs.Pinned, new: Optional[procs.Pinned], standby: Optional[Standby],
               strategy: "Strategy", old_release: Optional[str]) -> Steps[Tuple[str, Optional[str]]]:
    """Put the old master back in charge: ("rolled-back", what its own probe saw:
    '' when it answered, None when no probe is configured), or ("nothing-serving",
    None) when it is gone too."""
    if standby is not None and len(standby) and old.alive():
        try:
            yield from standby.bring_back()
            yield from host.wait_ready(old, time.monotonic() + host.config.ready_timeout, "old master")
        except ReloadFailed as e:
            host.log.error("rollback-error", f"old master did not get its workers back: {e}")
        except Stopping:
            pass              # the stop that follows retires every master anyway
    if new is not None and new.alive():
        try:
            yield from host.retire(new, grace=min(FAILED_MASTER_GRACE, host.config.retire_timeout),
                                   interruptible=True)
        except Stopping:
            pass              # the stop cuts it short: it was not serving (masters.stop_all)
        except ReloadFailed:
            new.signal(signal.SIGKILL)    # a client's deadline came: the failed master is not waited for
    strategy.restore(old)
    if not old.alive():
        return "nothing-serving", None
    try:
        return "rolled-back", (yield from host.verify_serving(old, old_release))
    except (Stopping, ReloadFailed):
        return "rolled-back", None       # a stop (or the client gone) ended the check: no claim either way
