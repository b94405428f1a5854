"""The first generation: the deployed release, tried again (with pauses) when it
is the release that last served, since then the cause is likely outside it (a
database up a few seconds late after a reboot); else the last good release, when
one is recorded; else the start fails and says why."""
from __future__ import annotations

import os
import time

from shim.errors import EXIT_START, EXIT_START_RETRY, ReloadFailed, ShimError, Stopping
from shim.runtime import adopt, procs, release
from shim.runtime.journal import WARNING
from shim.runtime.loop import pause
from shim.runtime.masters import FAILED_MASTER_GRACE, Masters
from shim.runtime.state import fallback_refusal

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Callable, Optional, Tuple

    from shim.runtime.masters import Steps
    from shim.runtime.readiness import Verdict

# A release that served before and now fails to boot (after a reboot the database
# comes up a few seconds late) is tried again after these pauses, then the shim
# exits EXIT_START_RETRY, which the shipped units' Restart= retries (not 7).
BOOT_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)


class BootFailedTransiently(Exception):
    """The release that failed to boot is the one that last served: worth another try."""

    def __init__(self, error: ReloadFailed, release: Optional[str], also: str = "") -> None:
        super().__init__(str(error))
        self.error, self.release, self.also = error, release, also




class Boot(Masters):
    """The boot's steps; the Supervisor holds the state they set (master, degraded,
    fallback, remembered) and tells systemd."""

    # (record, pinned master): this shim adopts the master a dead shim left (shim/runtime/adopt.py)
    adopting: Optional[Tuple[adopt.Record, procs.Pinned]] = None

    def boot(self) -> Steps[None]:
        if self.adopting:
            return (yield from adopt.take_over(self, *self.adopting))
        self._clean_stale_pid_files()
        t0 = time.time()
        deployed = release.resolve(self.config.chdir)
        for attempt, delay in enumerate((*BOOT_RETRY_DELAYS, None), 1):
            try:
                master, ready = yield from self._boot_deployed_or_fallback(deployed)
                break
            except BootFailedTransiently as e:
                if delay is None:
                    self._start_failed(e.error, e.release, f"{e.also}; it served before and failed {attempt} "
                                       "times: exiting so that systemd may try again later", EXIT_START_RETRY)
                yield from self._boot_retry(e, attempt, delay)
        self.master, self.generation, self.state = master, 1, "serving"
        master.generation = 1
        self._remember(self.remembered.served, self.release(master))
        self.notifier.ready(master.pid, self.status_line(ready.workers))
        self.log.event("ready", f"master {master.pid} ready with {ready.workers} workers in "
                       f"{time.time() - t0:.2f} s (by {ready.detail})", MASTER_PID=master.pid, GENERATION=1,
                       RELEASE=self.release(master), DURATION_MS=int((time.time() - t0) * 1000))

    def _boot_deployed_or_fallback(self, deployed: Optional[str]) -> Steps[Tuple[procs.Pinned, Verdict]]:
        """The deployed release, or the last good one when the deployed one fails."""
        try:
            return (yield from self._boot_release(None))
        except ReloadFailed as e:
            if deployed and deployed == self.remembered.last_good:
                # It served before: a late database or network, not a bad deploy.
                raise BootFailedTransiently(e, deployed) from None
            fallback = self._fallback_for(deployed)
            self._remember(self.remembered.failed, deployed, str(e))
            if fallback is None:
                self._start_failed(e, deployed)
            self.log.error("fallback", f"{deployed} failed to start ({e}); starting the last good release "
                           f"{fallback} instead", RELEASE=fallback, FAILED_RELEASE=deployed, REASON=str(e),
                           SERVER_ERROR=self.reports.error_of(e.master) if e.master else None)
            self.notifier.status(f"starting: {deployed} failed; trying the last good release {fallback}")
            try:
                master_ready = yield from self._boot_release(fallback)
            except ReloadFailed as e2:
                raise BootFailedTransiently(e2, fallback, also=f"; before that, {deployed} failed: {e}") from None
            self.fallback = fallback
            self.degraded = (f"degraded: serving last good release {fallback} because {self.config.chdir} "
                             f"(-> {deployed}) failed: {e}")
            return master_ready

    def _boot_retry(self, e: BootFailedTransiently, attempt: int, delay: float) -> Steps[None]:
        """Wait `delay` before the next boot attempt, saying so; a stop ends the wait."""
        tries = len(BOOT_RETRY_DELAYS) + 1
        why = f"{e.release} failed to start ({e.error}{e.also}), but it served before"
        self.log.event("boot-retry", f"{why}: trying again in {delay:g} s (attempt {attempt + 1} of {tries})",
                       WARNING, RELEASE=e.release, REASON=str(e.error) + e.also, ATTEMPT=attempt,
                       SERVER_ERROR=self.reports.error_of(e.error.master) if e.error.master else None)
        self.notifier.status(f"starting: retrying in {delay:g} s (attempt {attempt + 1} of {tries}): {why}")
        self.notifier.extend_timeout(delay + self.config.ready_timeout + 10)
        yield pause(f"the next boot attempt ({attempt + 1} of {tries})", delay)

    def _boot_release(self, fallback: Optional[str]) -> Steps[Tuple[procs.Pinned, Verdict]]:
        """Start the first master, in --chdir as the strategy wants it or in the
        `fallback` release directory, and wait until it is ready."""
        self.notifier.extend_timeout(self.config.ready_timeout + 10)
        born_after = procs.now_ticks()
        deadline = time.monotonic() + self.config.ready_timeout
        master = None
        try:
            if fallback:
                master = self.start_master(born_after, fallback, link=fallback)
            else:
                master = self.start_master(born_after, self.strategy.release_to_pin())
            ready = yield from self.wait_ready(master, deadline, "master")
            # At boot as at a reload: a release that fails its check is not the last good one.
            failure = self.config.health_check and (yield from self.health_failure(master.probe))
            if failure:
                raise ReloadFailed(failure)
            return master, ready
        except ReloadFailed as e:
            if master is not None:
                yield from self.retire(master, grace=min(FAILED_MASTER_GRACE, self.config.retire_timeout))
                e.master = master.pid
            raise
        except Stopping:
            if master is not None:
                yield from self.retire(master)
            raise

    def _fallback_for(self, deployed: Optional[str]) -> Optional[str]:
        """The last good release, when there is one to fall back to, or None (and why, logged)."""
        last_good = self.remembered.last_good
        why = None
        if not self.config.fallback:
            why = "--no-fallback"
        elif not last_good:
            why = "no release has served here yet" if self.remembered.path else "no state directory"
        elif last_good == deployed:
            why = "it is the release that failed"
        else:
            why = fallback_refusal(last_good, deployed)
        if why:
            self.log.event("no-fallback", f"no fallback: {why}", WARNING, RELEASE=last_good)
            return None
        return last_good

    def _start_failed(self, e: ReloadFailed, failed: Optional[str], also: str = "",
                      status: int = EXIT_START) -> None:
        error = self.reports.error_of(e.master) if e.master else None
        self.log.error("start-failed", f"start failed: {e}{also}", REASON=str(e) + also, SERVER_ERROR=error,
                       RELEASE=failed)
        raise ShimError(f"start failed: {e}{also}", status) from None

    def _remember(self, record: Callable[..., None], *args: object) -> None:
        """Write down a served or failed release; a state directory that cannot be
        written costs the fallback, never the service."""
        try:
            record(*args)
        except OSError as e:
            self.log.event("state-error", f"cannot record the last good release in "
                           f"{self.remembered.path}: {e}", WARNING)

    def _clean_stale_pid_files(self) -> None:
        """A pid file naming no process of this unit would mislead the server and its hooks."""
        if not self.config.pid_file:
            return
        for path in (self.config.pid_file, self.config.pid_file + ".oldbin"):
            pid = procs.read_pid_file(path)
            if os.path.exists(path) and (pid is None or not procs.in_cgroup(pid, self.cgroup)):
                self.log.event("pid-file-removed", f"removed stale pid file {path} (named {pid})")
                os.unlink(path)

