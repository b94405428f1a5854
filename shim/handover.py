"""One reload: start the next generation, wait until it serves, retire the old.

The order matters to systemd (DESIGN.md, point 3 and 5): MAINPID points at
the shim itself for the whole hand-over, so the old master may exit at any
moment (the common `before_fork` hook QUITs it) without systemd seeing its
main process die; MAINPID moves to the new master only once the old one is
gone and the new one has been reparented to the manager.
"""
from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from shim import health, procs
from shim.journal import ERR
from shim.upgrade import FAILED_MASTER_GRACE, ReloadFailed, Stopping

if TYPE_CHECKING:
    from shim.supervisor import Supervisor


async def hand_over(sup: "Supervisor") -> Dict[str, Any]:
    old = sup.master
    t0, started = time.monotonic(), procs.now_ticks()
    gen = sup.generation + 1
    deadline = t0 + sup.config.ready_timeout
    sup.state = "reloading"
    sup.notifier.reloading(os.getpid(), f"reloading: starting generation {gen} beside master {old.pid}")
    sup.log.event("reload-start", f"reload to generation {gen} ({sup.strategy.name}) from master {old.pid}",
                  OLD_MASTER_PID=old.pid, GENERATION=gen)
    new: Optional[procs.Pinned] = None
    workers_stopped = False      # the old master's, for a health check; undone on rollback
    old.role = "old"
    try:
        new = await sup.strategy.start_next(old, started, deadline)
        new.generation = gen
        if new.pid not in sup.masters:
            sup.watch(new)
        sup.notifier.status(f"reloading: new master {new.pid} booting, old master {old.pid} serving")
        found_ms = int((time.monotonic() - t0) * 1000)
        ready = await sup.wait_ready(new, deadline, "new master")
        ready_ms = int((time.monotonic() - t0) * 1000)
        if sup.config.health_check:
            reason, workers_stopped = await _health_check(sup, old, new)
            if reason:
                raise ReloadFailed(reason)
        retire_start = time.monotonic()
        await sup.retire(old, keep=new.pid)
        retire_end = time.monotonic()
    except ReloadFailed as e:
        return await _roll_back(sup, old, new, workers_stopped, str(e), t0, gen)
    except Stopping:
        return {"ok": False, "error": "reload aborted: the service is stopping"}
    except Exception as e:   # a bug must not leave MAINPID on the shim and the state "reloading"
        sup.log.error("internal-error", f"reload: {type(e).__name__}: {e}")
        return await _roll_back(sup, old, new, workers_stopped,
                                f"internal error: {type(e).__name__}: {e}", t0, gen)

    sup.strategy.finish(new)
    sup.master, sup.generation, sup.state = new, gen, "serving"
    duration = time.monotonic() - t0
    server_boot, retire = ready.since - t0, retire_end - retire_start
    timings = {"new_master_found_ms": found_ms, "server_boot_ms": int(server_boot * 1000),
               "ready_seen_ms": ready_ms, "retire_ms": int(retire * 1000),
               "shim_overhead_ms": int((duration - server_boot - retire) * 1000)}
    sup.last_reload = f"ok in {duration:.1f}s"
    release = sup.release(new)
    sup.notifier.ready(new.pid, sup.status_line(ready.workers))
    sup.log.event("reload-done", f"generation {gen}: master {new.pid} serving {release}; "
                  f"old master {old.pid} retired; {duration:.2f} s",
                  MASTER_PID=new.pid, OLD_MASTER_PID=old.pid, GENERATION=gen, RELEASE=release,
                  DURATION_MS=int(duration * 1000), RESULT="done",
                  # where the time went: the server's own boot and the old master's drain
                  # are the server's; the rest is the shim's
                  **{k.upper(): v for k, v in timings.items()})
    sup.wake()
    return {"ok": True, "master_pid": new.pid, "old_master_pid": old.pid, "generation": gen,
            "release": release, "duration_ms": int(duration * 1000),
            "timings": timings}


async def _health_check(sup: "Supervisor", old: procs.Pinned,
                        new: procs.Pinned) -> Tuple[Optional[str], bool]:
    """Check the new release alone: the old master's workers must not answer.

    Unicorn: WINCH stops them gracefully (HUP brings them back on a rollback).
    A server without such a signal (Gunicorn: WINCH only acts when daemonized):
    its workers are paused with SIGSTOP for the check's few milliseconds, so the
    shared socket's queue goes to the new workers; requests in flight on the old
    ones wait, none fails. Returns the failure (or None) and whether the old
    workers were stopped (to be brought back on a rollback).
    """
    paused, stopped = [], False
    if old.alive() and sup.profile.stop_workers is not None:
        old.signal(sup.profile.stop_workers)
        stopped = True
        deadline = time.monotonic() + sup.config.retire_timeout
        while [p for p in procs.children(old.pid) if p != new.pid] and time.monotonic() < deadline:
            await sup.tick()
    elif old.alive():
        for pid in procs.children(old.pid):
            try:
                worker = procs.pin(pid, sup.cgroup, parent=old.pid, role="worker")
            except procs.UntrustedPid:
                continue
            worker.signal(signal.SIGSTOP)
            paused.append(worker)
        # SIGSTOP takes effect thread by thread, when each next runs: a Puma worker's
        # accept thread was seen taking the check's connection after it was sent.
        deadline = time.monotonic() + 1.0
        while not all(_all_threads_stopped(w.pid) for w in paused) and time.monotonic() < deadline:
            await sup.tick(0.002)
    try:
        return (await health.check(sup.config.health_check) or None), stopped
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


async def _roll_back(sup: "Supervisor", old: procs.Pinned, new: Optional[procs.Pinned],
                     workers_stopped: bool, reason: str, t0: float, gen: int) -> Dict[str, Any]:
    if workers_stopped and old.alive():
        old.signal(sup.profile.respawn_workers)
        try:
            await sup.wait_ready(old, time.monotonic() + sup.config.ready_timeout, "old master")
        except ReloadFailed as e:
            sup.log.error("rollback-error", f"old master did not get its workers back: {e}")
    if new is not None and new.alive():
        await sup.retire(new, grace=min(FAILED_MASTER_GRACE, sup.config.retire_timeout))
    sup.strategy.restore(old)
    duration = time.monotonic() - t0
    sup.last_reload = f"failed after {duration:.1f}s: {reason}"
    fields = dict(OLD_MASTER_PID=old.pid, GENERATION=gen, REASON=reason,
                  DURATION_MS=int(duration * 1000),
                  MASTER_PID=new.pid if new else None)
    if old.alive():
        old.role = "master"
        sup.state = "serving"
        sup.notifier.ready(old.pid, sup.status_line())
        sup.log.event("reload-failed", f"reload to generation {gen} failed: {reason}; "
                      f"master {old.pid} keeps serving the old release", ERR, RESULT="rolled-back", **fields)
        return {"ok": False, "error": f"{reason}; the old release keeps serving (master {old.pid})"}
    sup.state = "failed"
    sup.log.event("reload-failed", f"reload to generation {gen} failed: {reason}; the old master is gone "
                  "too, nothing serves: exiting so that systemd restarts the service", ERR,
                  RESULT="nothing-serving", **fields)
    sup.wake()
    return {"ok": False, "error": f"{reason}; the old master is gone too: the service will restart"}
