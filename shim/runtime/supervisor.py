"""The supervisor: one event loop that owns all state.

States: booting -> serving -> reloading -> serving ...; stopping at the end.
Signals, control requests and pidfds reach it as calls from the loop (shim/runtime/loop.py)
that only record what happened or queue a request. The shim's life (`life`:
boot, then each reload, then the stop) is a generator of steps that the loop
drives; each step yields what it waits for and until when, and the loop decides
what ends the wait, asking `_interruption` first: a stop, or the reload's
client gone before the point of no return. So a status request is answered
during a hand-over, and reloads asked for meanwhile are merged into the next one.
"""
from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

from shim.runtime import deadline, procs, report
from shim.runtime.control import ControlServer, SignalledReload
from shim.errors import EXIT_MASTER_EXIT, Abandoned, Stopping
from shim.runtime.journal import ERR, WARNING, Log
from shim.runtime.logreopen import LogReopen
from shim.runtime.loop import Loop, Wait
from shim.runtime.notify import Notifier
from shim.runtime.probe import Request
from shim.runtime.boot import Boot
from shim.runtime.channel import HookChannels
from shim.runtime.servers import ServerProfile
from shim.runtime.sockets import HeldSocket
from shim.runtime.state import State
from shim.runtime.handover import Outcome, hand_over
from shim.runtime.upgrade import STRATEGIES

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

    from shim.runtime.control import Asker, Reply
    from shim.runtime.masters import Steps

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
ABANDON_GRACE = 0.5        # seconds every client of a hand-over must stay gone before it is rolled back
MAINPID_CONFIRM = 5.0      # seconds systemd gets to confirm MAINPID=<shim> before a hand-over
# The shim's own pid, for a trigger that costs next to no CPU: ExecReload= signals
# the shim (its MAINPID is the master) and then `reload --signalled` reports the outcome.
SHIM_PID_FILE = "shim.pid"
# Signals whose default action would end or freeze the shim. `systemctl kill -s SIG`
# signals every process of the unit: the master and its workers get them from
# systemd directly (USR1: reopen logs; TTIN/TTOU: one worker more or less), so the
# shim passes nothing on (that would deliver them twice) and only says so. Except the
# log-reopen signal: a master that did not get it (--kill-whom=main reaches the shim
# during a hand-over) gets it from the shim (shim/runtime/logreopen.py).
NOTED_SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGUSR1", "SIGTTIN", "SIGTTOU", "SIGTSTP", "SIGWINCH", "SIGALRM", "SIGVTALRM", "SIGPROF",
    "SIGPOLL", "SIGPWR", "SIGXCPU") if hasattr(signal, name))
class Config(SimpleNamespace):
    """What `run` was told (keyword arguments only)."""

    command: List[str]
    profile: ServerProfile
    upgrade: str
    pid_file: Optional[str]
    ready_timeout: float
    retire_timeout: float
    settle: float
    health_check: Optional[str]
    chdir: Optional[str]
    control_path: Optional[str]
    control_mode: int
    runtime_dir: str
    state_dir: Optional[str] = None
    fallback: bool = True
    # What each generation must answer over its probe socket before it counts as ready;
    # None: no probe (readiness is then the hook's or the heuristic's word alone)
    probe: Optional[Request] = None
    probation: float = 0.0       # seconds a new generation is watched before the old one is retired


class Supervisor(Boot):
    """The loop and the lifecycle state: which master serves, the generation, what
    systemd and the journal are told. Process operations come from Masters."""

    def __init__(self, config: Config, sockets: List[HeldSocket], notifier: Notifier, log: Log,
                 environ: Dict[str, str], loop: Optional[Loop] = None) -> None:
        super().__init__(config, sockets, log, environ, loop or Loop(self._on_loop_error))
        self.notifier = notifier
        self.strategies = {name: kind(self) for name, kind in STRATEGIES.items()}
        self.strategy = self.strategies[config.upgrade]
        self.state = "booting"
        self.master: Optional[procs.Pinned] = None       # the one serving, MAINPID in steady state
        self.generation = 0
        self.last_reload = ""
        self.remembered = State(config.state_dir)
        self.degraded = ""        # why what serves is not what was deployed (a fallback, a kept master)
        self.fallback: Optional[str] = None     # the last good release a boot fell back to
        self.started = time.time()
        self.reloads: List[Asker] = []     # who asked for the next reload: one hand-over answers them all
        self.askers: List[Asker] = []      # who asked for the hand-over running now
        self.committed = False             # the running hand-over is past its point of no return
        self.thrown: set = set()           # interruptions already raised in the steps (each once)
        self.clients_gone_at: Optional[float] = None    # when a hand-over's clients were all seen gone
        self.control: Optional[ControlServer] = None
        self.signalled: Optional[SignalledReload] = None   # the last reload a signal asked for, to report
        self.confirmed = False             # systemd took the last MAINPID= in (its barrier came back)
        self.reopen = LogReopen(self, config.profile.log_reopen) if config.profile.log_reopen else None
        self.deadlines = deadline.Watch(self.loop)     # the clients' deadlines, for the running hand-over
        notifier.on_extend = lambda until: self.deadlines.extended(self.askers + self.reloads, until)

    # -- the loop -----------------------------------------------------------

    def run(self) -> int:
        loop = self.loop
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGUSR2, self._on_reload_signal, signal.SIGUSR2)
        for sig in NOTED_SIGNALS:
            loop.add_signal_handler(sig, self._on_other_signal, sig)
        self.hook_socket = HookChannels(loop, self.reports, self.cgroup)
        if self.config.control_path:
            self.control = ControlServer(self.config.control_path, self.config.control_mode,
                                         self.handle_request, self._on_refused, loop)
        # With its start time: the kill line checks it, so that a pid reused after a crash is never signalled.
        procs.write_atomically(os.path.join(self.config.runtime_dir, SHIM_PID_FILE),
                               f"{os.getpid()} {procs.start_time(os.getpid())}\n", mode=0o644)
        if self.notifier.watchdog_usec:
            self._watchdog()
        try:
            return loop.run(self.life(), self._interruption)
        finally:
            for asker in self.reloads + self.askers:
                asker({"ok": False, "error": "the service is stopping"})
            self.reloads.clear()
            self._close()

    def life(self) -> Steps[int]:
        """Boot, serve (a reload at a time), stop: the shim's whole life, as steps."""
        try:
            yield from self.boot()
        except Stopping:
            yield from self.stop()
            return 0
        while True:
            if self.stop_requested:
                yield from self.stop()
                return 0
            if self.state == "serving" and self.gone(self.master):
                self.log.error("master-exit", f"master {self.master.pid} {self.master.exit_text}; "
                               "systemd sees its main process exit and decides on a restart",
                               MASTER_PID=self.master.pid, GENERATION=self.generation)
                return EXIT_MASTER_EXIT
            if self.state == "failed":
                return EXIT_MASTER_EXIT
            if self.reloads:
                # Every reload asked for until now is served by this one hand-over:
                # it deploys whatever `current` names when it starts.
                self.askers, self.reloads = self.reloads, []
                answer = yield from self.reload()
                askers, self.askers = self.askers, []
                for asker in askers:
                    asker(answer)
                continue
            yield Wait("a reload, a stop or the master's exit", self._has_work, interruptible=False)

    def _has_work(self, wait: Wait) -> Optional[bool]:
        if self.stop_requested or self.reloads or self.state == "failed" or \
                (self.state == "serving" and not self.master.alive()):
            return True
        return None

    def _interruption(self, wait: Wait) -> Optional[BaseException]:
        """What ends `wait` before its event or deadline, raised where the step waits
        (each at most once): a stop; during a hand-over, before its point of no
        return, every client that asked for it gone (systemd's job timeout killed
        ExecReload=, a Ctrl-C, a dropped SSH session)."""
        if not wait.interruptible:
            return None
        if self.stop_requested and "stop" not in self.thrown:
            self.thrown.add("stop")
            return Stopping()
        if self.state == "reloading" and not self.committed and "abandoned" not in self.thrown \
                and self._clients_gone_a_while():
            self.thrown.add("abandoned")
            return Abandoned("every client that asked for this reload went away (systemd's job timeout "
                             "ended ExecReload=, a Ctrl-C or a dropped connection) before the new "
                             "release took over")
        if self.state == "reloading" and not self.committed:       # a client's deadline too close
            return self.deadlines.too_late(self.askers, self.config.retire_timeout, f"while waiting for {wait.what}")
        return None

    def _clients_gone_a_while(self) -> bool:
        """Every client of the hand-over gone, for ABANDON_GRACE: `systemctl stop` kills the
        reload's client a moment before it signals the shim, and a stop is no rollback (its
        old master need not get its workers back to be stopped). A client asking meanwhile
        (merged into this hand-over) starts the count again."""
        if not (self.askers and all(asker.gone() for asker in self.askers)):
            self.clients_gone_at = None
            return False
        now = time.monotonic()
        if self.clients_gone_at is None:
            self.clients_gone_at = now
            self.loop.call_later(ABANDON_GRACE, lambda: None)     # look again then
        return now - self.clients_gone_at >= ABANDON_GRACE

    def checkpoint(self) -> None:
        """Between two steps: what would interrupt a wait ends the hand-over here."""
        error = self._interruption(Wait("the hand-over's next step"))
        if error is not None:
            raise error

    def commit(self) -> None:
        """The point of no return: never when a waiting client's deadline is too close (then: roll back)."""
        error = self.deadlines.too_late(self.askers, self.config.retire_timeout, "when the new master was ready")
        if error is not None:
            raise error
        self.committed = True

    def job_extension(self, wanted: float, moved: float) -> float:
        """During a reload, systemd's timer moves by the CPU wait alone: TimeoutStartSec= stays the bound."""
        return self.deadlines.extension(self.askers, moved) if self.state == "reloading" else wanted

    def _on_stop_signal(self, sig: int) -> None:
        self.stop_requested = True

    def _on_reload_signal(self, sig: int) -> None:
        self.log.event("signal", f"{signal.Signals(sig).name}: reload requested", SIGNAL=signal.Signals(sig).name)
        self.signalled = SignalledReload()
        self.request_reload(self.signalled)

    def request_reload(self, asker: Asker) -> None:
        """Ask for a reload; `asker` gets its answer. One asked for while the service
        starts or stops is answered at once; one asked for during a hand-over is
        served by the next, which all such askers share."""
        if self.stop_requested or self.state in ("stopping", "failed"):
            answer = {"ok": False, "error": "the service is stopping"}
        elif self.state == "booting":
            self.log.event("reload-refused", "reload asked for while the service is still starting: "
                           "refused; the master starting now reads the release current names", WARNING)
            answer = {"ok": False, "error": "the service is still starting"}
        else:
            if self.reloads:
                self.log.event("reload-merged", "a reload is already waiting to run: this request is "
                               "served by it")
            elif self.state == "reloading":
                self.log.event("reload-queued", "a reload is in progress; this one runs after it")
            self.reloads.append(asker)
            return
        asker(answer)

    def _on_other_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        master = self.master.pid if self.master else None
        if self.reopen and sig == self.reopen.sig:
            self.reopen.requested()
            self.log.event("signal", f"{name}: every live master reopens its logs; the shim passes it on to "
                           "any that did not get it (still writing to a rotated file)", SIGNAL=name)
            return
        self.log.event("signal", f"{name} ignored by the shim: it is the server's signal; "
                       f"`systemctl kill --kill-whom=main -s {name[3:]}` sends it to the master "
                       f"({master}), `systemctl kill -s {name[3:]}` to every process of the unit",
                       WARNING, SIGNAL=name)

    def _on_loop_error(self, where: str, e: Exception) -> None:
        self.log.error("internal-error", f"{where}: {type(e).__name__}: {e}")

    def _on_refused(self, uid: int) -> None:
        self.log.event("control-refused", f"control request from uid {uid} refused", WARNING, UID=uid)

    def _watchdog(self) -> None:
        """WATCHDOG=1 while any master serves: during a hand-over the old master may
        be gone already (the common before_fork hook QUITs it) while the new one boots."""
        if any(m.alive() and not procs.is_stopped(m.pid) for m in list(self.masters.values())):
            self.notifier.watchdog()
        self.loop.call_later(self.notifier.watchdog_usec / 2e6, self._watchdog)

    # -- lifecycle (the boot: shim/runtime/boot.py) -------------------------

    def reload(self) -> Steps[Dict[str, Any]]:
        """One hand-over; the answer for the clients that asked for it."""
        if self.stop_requested or self.state in ("stopping", "failed"):
            return {"ok": False, "error": "the service is stopping"}
        old, gen = self.master, self.generation + 1
        # A master of the fallback release was started there, not through --chdir:
        # Unicorn's own re-exec would come back to it. The shim starts the next one.
        strategy = self.strategies["spawn"] if self.fallback else self.strategy
        self.state, self.committed, self.confirmed = "reloading", False, False
        self.thrown.discard("abandoned")
        self.clients_gone_at = None
        self.deadlines.ended = False
        barrier = self.notifier.reloading(os.getpid(), f"reloading: starting generation {gen} beside master {old.pid}")
        if barrier is not None and not (yield from self._confirmed(barrier)):
            self.state = "serving"
            self.notifier.ready(old.pid, self.status_line())
            reason = ("systemd did not confirm MAINPID= moving to the shim within "
                      f"{MAINPID_CONFIRM:g} s: the old master could not be retired safely, nothing was changed")
            self.log.event("reload-failed", f"reload to generation {gen} not begun: {reason}", ERR,
                           RESULT="not-begun", OLD_MASTER_PID=old.pid, GENERATION=gen, REASON=reason)
            return {"ok": False, "error": f"{reason}; the old release keeps serving (master {old.pid})"}
        # No EXTEND_TIMEOUT_USEC= here: TimeoutStartSec= bounds the reload as the operator
        # set it (systemd re-arms it when it spawns each ExecReload= line anyway), and the
        # client's deadline ends the hand-over before it (shim/runtime/deadline.py).
        self.log.event("reload-start", f"reload to generation {gen} ({strategy.name}) from master {old.pid}",
                       OLD_MASTER_PID=old.pid, GENERATION=gen)
        self.reports.clear_errors(old.pid)
        return self._apply((yield from hand_over(self, old, gen, strategy)))

    def _confirmed(self, barrier: int) -> Steps[bool]:
        """Whether systemd processed every message sent before (sd_notify_barrier):
        it closes its end of `barrier` once it has. Until then it may still take
        the old master for the main process, and see it exit."""
        def closed() -> None:
            self.confirmed = True
            self.loop.remove_reader(barrier)
        self.loop.add_reader(barrier, closed)
        try:
            # Not interruptible: no rollback to raise into yet (a stop ends the hand-over's first wait)
            return bool((yield Wait("systemd to take MAINPID=<shim> in", lambda wait: self.confirmed or None,
                                    deadline=time.monotonic() + MAINPID_CONFIRM, expired=lambda wait: False,
                                    interruptible=False)))
        finally:
            self.loop.remove_reader(barrier)
            os.close(barrier)

    def _apply(self, out: Outcome) -> Dict[str, Any]:
        """The hand-over's outcome becomes the supervisor's state, systemd's view,
        the journal's event and the reload client's answer."""
        old, new, gen, took = out.old, out.new, out.generation, f"{out.duration:.1f}s"
        if out.result == "stopped":
            self.state = "stopping"
            self.log.event("reload-failed", f"reload to generation {gen} aborted: the service is stopping",
                           ERR, RESULT="stopped", OLD_MASTER_PID=old.pid, MASTER_PID=new.pid if new else None,
                           GENERATION=gen, REASON=out.reason)
            return {"ok": False, "error": "reload aborted: the service is stopping"}
        if out.result == "done":
            self.master, self.generation, self.state, self.degraded, self.fallback = new, gen, "serving", "", None
            serving = self.release(new)
            self._remember(self.remembered.served, out.intended or serving)
            self.last_reload = f"ok in {took}"
            self.notifier.ready(new.pid, self.status_line(out.workers))
            self.log.event("reload-done", f"generation {gen}: master {new.pid} serving {serving}; "
                           f"old master {old.pid} retired; {out.duration:.2f} s",
                           MASTER_PID=new.pid, OLD_MASTER_PID=old.pid, GENERATION=gen, RELEASE=serving,
                           DURATION_MS=int(out.duration * 1000), RESULT="done",
                           **{k.upper(): v for k, v in out.timings.items()})
            return {"ok": True, "master_pid": new.pid, "old_master_pid": old.pid, "generation": gen,
                    "release": serving, "duration_ms": int(out.duration * 1000), "timings": out.timings}
        if not ("abandoned" in self.thrown or self.deadlines.ended):
            # A release is recorded as failed only for what it did, not for its clients' patience.
            self._remember(self.remembered.failed, out.intended, out.reason)
        self.last_reload = f"failed after {took}: {out.reason}"
        fields = dict(OLD_MASTER_PID=old.pid, GENERATION=gen, REASON=out.reason,
                      DURATION_MS=int(out.duration * 1000), MASTER_PID=new.pid if new else None,
                      SERVER_ERROR=self.reports.error_of(new.pid if new else old.pid), RESULT=out.result)
        if out.result == "not-deployed":
            # What serves is not what was deployed: say so wherever the state shows.
            self.master, self.generation, self.state = new, gen, "serving"
            self.degraded = f"degraded: reload to generation {gen} failed and its master serves on: {out.reason}"
            kept = (f"the config's own hook had already retired the old master {old.pid}, so master "
                    f"{new.pid} serves on as it is: fix the config, then reload or restart")
            self.notifier.ready(new.pid, self.status_line())
            self.log.event("reload-failed", f"reload to generation {gen} failed: {out.reason}; {kept}", ERR,
                           **fields)
            return {"ok": False, "error": f"{out.reason}; {kept}"}
        if out.result == "rolled-back":
            old.role, self.state = "master", "serving"
            if out.checked:
                # Said as seen, never "keeps serving": its own probe did not answer.
                kept = told = f"master {old.pid} is back in charge but did not answer its probe ({out.checked})"
                self.degraded = f"degraded: after a failed reload, {kept}"
            else:
                kept = f"master {old.pid} keeps serving the old release" + (
                    " (answered its probe)" if out.checked == "" else "")
                told = f"the old release keeps serving (master {old.pid})"
            if not self.stop_requested:      # a stop came meanwhile: STOPPING=1 is the next word, not READY=1
                self.notifier.ready(old.pid, self.status_line())
            self.log.event("reload-failed", f"reload to generation {gen} failed: {out.reason}; {kept}", ERR,
                           **fields)
            return {"ok": False, "error": f"{out.reason}; {told}"}
        self.state = "failed"          # nothing-serving: the run loop exits, systemd restarts
        self.log.event("reload-failed", f"reload to generation {gen} failed: {out.reason}; the old master is "
                       "gone too, nothing serves: exiting so that systemd restarts the service", ERR, **fields)
        return {"ok": False, "error": f"{out.reason}; the old master is gone too: the service will restart"}

    def stop(self) -> Steps[None]:
        self.state = "stopping"
        self.notifier.stopping("stopping")
        live = [m for m in self.masters.values() if m.alive()]
        self.log.event("stopping", f"stopping masters {', '.join(str(m.pid) for m in live) or '(none)'}",
                       MASTER_PID=self.master.pid if self.master else None)
        serving = next((m for m in live if m.role != "old"), None) if self.committed else self.master
        if serving is not None and serving.standing_by:
            # its workers stopped for a new generation's probation: that one is what serves
            serving = next((m for m in live if m is not serving), serving)
        yield from self.stop_all(live, serving)     # past the point of no return, the new master serves

    def handle_request(self, request: Dict[str, Any], reply: Reply) -> None:
        command = request["command"]
        if command in ("reload", "reload-wait"):
            try:
                reply.deadlines = deadline.from_request(request)
            except ValueError as e:
                reply({"ok": False, "error": f"malformed request: {e}"})
                return
        if command == "reload":
            self.request_reload(reply)
        elif command == "status":
            reply({"ok": True, **self.status()})
        elif command == "reload-wait":
            # The outcome of the last signalled reload, for one client: it may still run or be over.
            # The kill came before the client connected: its signal is taken first.
            self.loop.pending_signals()
            signalled, self.signalled = self.signalled, None
            if signalled is None:
                reply({"ok": False, "error": "no signalled reload to report", "no_signalled_reload": True})
            else:
                signalled.report_to(reply)
        else:
            reply({"ok": False, "error": f"unknown command {command!r}"})

    # -- what the operator sees (shim/runtime/report.py) --------------------

    def release(self, master: Optional[procs.Pinned]) -> Optional[str]:
        return procs.cwd(master.pid) if master else None

    def status_line(self, workers: Optional[int] = None) -> str:
        return report.status_line(self, workers)

    def status(self) -> Dict[str, Any]:
        return report.status(self)

    def _close(self) -> None:
        for m in list(self.masters.values()):
            self.loop.remove_reader(m.pidfd)
            m.close()
        if self.control:
            self.control.close()
        try:
            os.unlink(os.path.join(self.config.runtime_dir, SHIM_PID_FILE))
        except OSError:
            pass
        if self.hook_socket:
            self.hook_socket.close()
        self.loop.close()
