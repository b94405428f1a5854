"""The shim's own death: said at once, and a new shim adopts what serves.

In steady state systemd's MainPID is the master, so a shim that dies (kill -9,
the OOM killer, a crash) leaves the unit active and the master serving with
nothing supervising it. So at start the shim leaves a watcher in the unit's
cgroup: /bin/sh reading a pipe only the shim writes, holding copies of the
listening sockets. Each time systemd is told MAINPID=<a master>, the shim
writes one line naming that master; before MAINPID=<the shim> (a hand-over:
systemd then watches the shim itself and restarts the unit if it dies) it
writes "hold"; before a stop, and when it exits, "exit" (the watcher leaves).

EOF after a master's line: the shim died while a master was the main process.
The watcher execs a new shim, with the shim's own command line, environment and
credentials, that adopts that master (`take_record`, `pin`, `take_over`). A
watcher killed with the unit (KillMode=control-group) never acts: a stop's
signal ends it like the shim, and SIGKILL ends it at once.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import sys
import time

from shim.errors import EXIT_CONTROL, ShimError
from shim.runtime import procs, sockets
from shim.runtime.journal import ERR, WARNING, Log
from shim.runtime.notify import Notifier

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

    from shim.runtime.masters import Steps

ADOPT_ENV = "UNICORN_SHIM_ADOPT"        # the dead shim's last record, set by its watcher
SOCKETS_ENV = "UNICORN_SHIM_SOCKETS"    # the held sockets' fds in the watcher, and where they came from
EXEC_ENV = "UNICORN_SHIM_EXEC"          # the command line the watcher execs (read and unset by it)
MAX_RECORD = 16 * 1024
# A watcher that dies (killed on its own) is replaced, at most this often per window:
# without one, the shim's next death would go unsaid.
WATCHER_RESTARTS, WATCHER_WINDOW = 3, 60.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)     # what ends it with a stop
# A shim that dies the same way each time must not be adopted for ever: after this
# many adoptions within ADOPTION_WINDOW seconds the next death is only said.
MAX_ADOPTIONS, ADOPTION_WINDOW = 3, 60.0
MAX_TEXT = 4096
# Signals `systemctl kill -s SIG` may send to every process of the unit that are not
# a stop: the watcher must outlive them. TERM, INT and QUIT (the stop signals) end it.
IGNORED = "HUP USR1 USR2 ALRM WINCH TTIN TTOU TSTP VTALRM PROF XCPU PWR"
WATCHER = f"""
cmd=${EXEC_ENV}; unset {EXEC_ENV}
trap '' {IGNORED}
last=hold
while IFS= read -r line; do
    case $line in exit) exit 0 ;; *) last=$line ;; esac
done
case $last in '{{'*) ;; *) exit 0 ;; esac
trap - {IGNORED}
exec </dev/null
if [ -n "${{WATCHDOG_PID-}}" ]; then WATCHDOG_PID=$$; fi
{ADOPT_ENV}=$last; export {ADOPT_ENV}
eval "exec $cmd"
"""


class Watcher:
    """The watcher left in the unit's cgroup, and what the shim tells it."""

    def __init__(self, held: List[sockets.HeldSocket], log: Log) -> None:
        self.log = log
        self.held = held
        self.loop: Any = None         # the shim's loop, once it follows the watcher's end of the pipe
        me = os.getpid()
        self.shim = (me, procs.start_time(me))
        self.pid = -1
        fds = [h.fileno() for h in held]
        described = [[h.fileno(), h.origin, h.unlink_path] for h in held]
        env = dict(os.environ, **{EXEC_ENV: shlex.join([sys.executable, *sys.orig_argv[1:]]),
                                  SOCKETS_ENV: json.dumps(described)})
        r, self.fd = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = os.fork()
        except OSError:
            os.close(self.fd)
            raise
        finally:
            if self.pid == 0:
                _exec_watcher(r, fds, env)
            os.close(r)
        os.set_blocking(self.fd, False)

    def tell(self, line: str) -> None:
        if self.fd < 0:
            return
        data = (line + "\n").encode()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except BlockingIOError:
            self.log.event("watcher-error", "the watcher reads nothing (stopped?): it may adopt from a "
                           "record one step old", ERR)
        except OSError as e:
            if line == "exit":      # a stop's signal reached it first, as it does the shim
                return self.close(clean=False)
            if self.loop is not None:
                return              # the loop sees the pipe's error too, and replaces the watcher
            self.log.event("watcher-gone", f"the watcher (pid {self.pid}) is gone ({e.strerror}): "
                           "if the shim dies now, nothing says so until the next reload", ERR)
            self.close(clean=False)
        if line == "exit":
            self.close(clean=False)

    def record(self, sup: Any, pid: int) -> str:
        """The line naming master `pid`, now systemd's main process: what a new shim needs."""
        master = sup.masters.get(pid)
        if master is None:
            return "hold"
        return json.dumps({
            "shim": self.shim[0], "shim_start": self.shim[1], "master": pid, "start": master.created,
            "generation": sup.generation if master is sup.master else master.generation,
            "probe": master.probe, "probes": sup.probes_made, "fallback": sup.fallback,
            "degraded": sup.degraded[:1000] or None,
            "adoptions": getattr(sup, "adoptions", [])}, separators=(",", ":"))

    def close(self, clean: bool = True) -> None:
        """`clean`: the shim ends normally, the watcher leaves without a word."""
        if clean:
            self.tell("exit")
        if self.fd >= 0:
            if self.loop is not None:
                self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


def _exec_watcher(stdin: int, fds: List[int], env: Dict[str, str]) -> None:
    """In the forked child: the pipe on stdin, the held sockets kept open (every other fd
    of the shim is close-on-exec). No "unicorn-shim" in its command line: it is not the
    shim until it execs one."""
    try:
        os.dup2(stdin, 0)
        for fd in fds:
            os.set_inheritable(fd, True)
        os.execve("/bin/sh", ["/bin/sh", "-c", WATCHER, "shim-watcher"], env)
    finally:
        os._exit(127)


class WatchedNotifier(Notifier):
    """Tells the watcher who systemd's main process is, as systemd is told."""

    def __init__(self, watcher: Watcher) -> None:
        super().__init__()
        self.watcher = watcher
        self.supervisor: Any = None
        self.mainpid: Optional[int] = None       # the last MAINPID= systemd was told
        self.restarts: List[float] = []          # when watchers were replaced

    def send(self, **fields: object) -> None:
        mainpid = fields.get("MAINPID")
        if "STOPPING" in fields:
            self.watcher.tell("exit")
        elif mainpid == os.getpid():
            self.watcher.tell("hold")      # before: systemd watches the shim itself from now on
        super().send(**fields)
        if isinstance(mainpid, int):
            self.mainpid = mainpid
        if isinstance(mainpid, int) and mainpid != os.getpid() and self.supervisor is not None:
            self.watcher.tell(self.watcher.record(self.supervisor, mainpid))

    def follow_watcher(self, loop: Any) -> None:
        """The loop learns at once when the watcher is gone: the pipe's write end reports an
        error once nothing reads it (epoll's EPOLLERR, reported as readable)."""
        self.watcher.loop = loop
        if self.watcher.fd >= 0:
            loop.add_reader(self.watcher.fd, self._watcher_gone)

    def _watcher_gone(self) -> None:
        gone, loop = self.watcher, self.watcher.loop
        gone.close(clean=False)
        _pid, status = 0, 0
        try:
            _pid, status = os.waitpid(gone.pid, os.WNOHANG)     # the shim's own child: no zombie left
            how = f"exit status {os.waitstatus_to_exitcode(status)}" if _pid else "still exiting"
        except ChildProcessError:
            how = "reaped"
        stopping = getattr(self.supervisor, "stop_requested", False)
        if stopping or (_pid and os.WIFSIGNALED(status) and os.WTERMSIG(status) in STOP_SIGNALS):
            return            # a stop's signal reaches every process of the unit: the shim's end follows
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < WATCHER_WINDOW] + [now]
        if len(self.restarts) > WATCHER_RESTARTS:
            gone.log.event("watcher-gone", f"the watcher (pid {gone.pid}) ended ({how}) for the "
                           f"{len(self.restarts)}th time in {WATCHER_WINDOW:g} s: not started again; if the "
                           "shim dies now, nothing says so until the next reload", ERR)
            return
        try:
            self.watcher = Watcher(gone.held, gone.log)
        except OSError as e:
            gone.log.event("watcher-gone", f"the watcher (pid {gone.pid}) ended ({how}) and no new one could "
                           f"start ({e}): if the shim dies now, nothing says so until the next reload", ERR)
            return
        gone.log.event("watcher-gone", f"the watcher (pid {gone.pid}) ended ({how}): a new one (pid "
                       f"{self.watcher.pid}) follows the shim", WARNING, WATCHER_PID=self.watcher.pid)
        if self.mainpid and self.mainpid != os.getpid() and self.supervisor is not None:
            self.watcher.tell(self.watcher.record(self.supervisor, self.mainpid))
        self.follow_watcher(loop)


def watching(held: List[sockets.HeldSocket], environ: Dict[str, str], log: Log) -> Notifier:
    """The notifier for a shim under systemd with a runtime directory (where the control
    socket a new shim re-creates lives): a watcher follows what it tells systemd."""
    if not (environ.get("NOTIFY_SOCKET") and environ.get("RUNTIME_DIRECTORY")):
        return Notifier()
    try:
        return WatchedNotifier(Watcher(held, log))
    except OSError as e:
        log.event("watcher-error", f"cannot start the watcher ({e}): the shim's death would go unnoticed "
                  "until the next reload", ERR)
        return Notifier()


def follow(notifier: Notifier, supervisor: Any, adopting: Optional[Tuple[Record, procs.Pinned]]) -> None:
    """The watcher follows `supervisor`'s masters; it boots by adopting when it was started so."""
    if isinstance(notifier, WatchedNotifier):
        notifier.supervisor = supervisor
        notifier.follow_watcher(supervisor.loop)
    supervisor.adopting = adopting or None


def ended(notifier: Notifier, held: List[sockets.HeldSocket], crashed: bool) -> None:
    """The shim's run is over. Normally the watcher leaves quietly and the sockets are let go.
    After a crash it is told nothing (the pipe's EOF is the word) and a socket file the
    shim bound stays: a new shim may adopt the master that serves on it."""
    watcher = notifier.watcher if isinstance(notifier, WatchedNotifier) else None
    if watcher is not None and crashed:
        watcher.close(clean=False)
        for one in held:
            one.sock.close()
        return
    if watcher is not None:
        watcher.close()
    sockets.release(held)


# -- the new shim ----------------------------------------------------------------

class Record:
    """The dead shim's last word, checked: every field of the expected type and range."""

    def __init__(self, text: str, held_text: str) -> None:
        if len(text) > MAX_RECORD or len(held_text) > MAX_RECORD:
            raise ValueError("too long")
        data, held = json.loads(text), json.loads(held_text)
        if not isinstance(data, dict) or not isinstance(held, list):
            raise ValueError("not an object")
        self.shim = _number(data, "shim")
        self.shim_start = _number(data, "shim_start")
        self.master = _number(data, "master", minimum=2)
        self.start = _number(data, "start")
        self.generation = _number(data, "generation", minimum=1)
        self.probes = _number(data, "probes")
        self.probe = _text(data, "probe")
        self.fallback = _text(data, "fallback")
        self.degraded = _text(data, "degraded") or ""
        adoptions = data.get("adoptions", [])
        if not (isinstance(adoptions, list) and len(adoptions) <= MAX_ADOPTIONS
                and all(type(t) is float and 0 <= t < 1e12 for t in adoptions)):
            raise ValueError("adoptions: not a short list of times")
        now = time.monotonic()      # CLOCK_MONOTONIC: the same for every process of the host
        self.adoptions = [t for t in adoptions if now - ADOPTION_WINDOW < t <= now]
        self.held = []
        for item in held:
            if not (isinstance(item, list) and len(item) == 3 and type(item[0]) is int
                    and sockets.LISTEN_FDS_START <= item[0] < 1024 and isinstance(item[1], str)
                    and (item[2] is None or isinstance(item[2], str))):
                raise ValueError(f"bad socket entry {item!r:.100}")
            self.held.append((item[0], item[1][:MAX_TEXT], item[2]))
        if not self.held:
            raise ValueError("no socket")

    def sockets(self) -> List[sockets.HeldSocket]:
        """The watcher's copies of the held sockets, each checked as a .socket unit's would be."""
        held = []
        try:
            for fd, origin, unlink in self.held:
                one = sockets._adopt(fd, origin)
                one.origin, one.unlink_path = origin, unlink if origin == "listen" else None
                held.append(one)
        except ShimError:
            for one in held:
                one.sock.close()      # never unlinked: the master serves on them
            raise
        return held

    def pin(self, cgroup: Optional[str], runtime_dir: str) -> procs.Pinned:
        """The master the record names, if it is still that very process (its start time) and
        one of this unit's; with its probe socket when that is the one the shim made for it."""
        try:
            master = procs.pin(self.master, cgroup)
        except procs.UntrustedPid as e:
            raise ShimError(f"master {self.master} cannot be adopted: {e}", EXIT_CONTROL) from None
        if master.created != self.start:
            master.close()
            raise ShimError(f"pid {self.master} is no longer the master the shim recorded (another start "
                            "time)", EXIT_CONTROL)
        master.generation = self.generation
        master.probe = self.probe if _own_probe(self.probe, runtime_dir, self.probes) else None
        return master


def pin(record: Record, runtime_dir: str, log: Log) -> procs.Pinned:
    """The master `record` names, pinned, or this shim says why not and exits."""
    try:
        return record.pin(procs.cgroup_of(os.getpid()), runtime_dir)
    except ShimError as e:
        refuse(Notifier(), log, record.shim, record.master, str(e))
        raise


def take_record(environ: Dict[str, str], notifier: Notifier, log: Log) -> Optional[Record]:
    """The record a watcher passed on, or None when this shim was not started by one. Says at
    once (STATUS=, the journal) that the shim died; a record that does not hold up ends here."""
    text, held = environ.pop(ADOPT_ENV, None), environ.pop(SOCKETS_ENV, None)
    os.environ.pop(ADOPT_ENV, None)
    os.environ.pop(SOCKETS_ENV, None)
    if text is None:
        return None
    try:
        record = Record(text, held or "")
    except (ValueError, RecursionError) as e:
        refuse(notifier, log, None, None, f"its watcher passed on an unreadable record ({e})")
    if len(record.adoptions) >= MAX_ADOPTIONS:
        refuse(notifier, log, record.shim, record.master,
               f"the shim died again after {len(record.adoptions)} adoptions within {ADOPTION_WINDOW:g} s: "
               "adopting again would only repeat it")
    notifier.status(f"supervision lost: the shim (pid {record.shim}) died; adopting master {record.master}")
    log.event("supervision-lost", f"the shim (pid {record.shim}) died while master {record.master} "
              f"served generation {record.generation}: shim {os.getpid()} adopts it", ERR,
              OLD_SHIM_PID=record.shim, MASTER_PID=record.master, GENERATION=record.generation)
    return record


class NotAdopted(ShimError):
    """The adopting shim gave up, and said so."""


def not_adopted(record: Optional[Record], error: ShimError, log: Log) -> None:
    """An adopting shim ending before it supervises (a check of its command line failing
    now, the control socket taken) must not leave STATUS= saying "adopting"."""
    if record is not None and not isinstance(error, NotAdopted):
        refuse(Notifier(), log, record.shim, record.master, str(error))


def refuse(notifier: Notifier, log: Log, shim: Optional[int], master: Optional[int], why: str) -> None:
    """No adoption: the master (if any) serves on unsupervised. Said, then this shim exits."""
    unit = (procs.cgroup_of(os.getpid()) or "").rsplit("/", 1)[-1]
    restart = f"systemctl restart {unit}" if unit.endswith(".service") else "restart the service"
    who = f"the shim (pid {shim})" if shim else "the shim"
    serving = f"master {master} serves on" if master else "the master serves on"
    notifier.status(f"supervision lost: {who} died; {serving} unsupervised: no new shim could take over "
                    f"({why}); reloads fail until a restart ({restart})")
    log.error("adopt-failed", f"{who} died; {serving}, but no new shim could take over: {why}",
              OLD_SHIM_PID=shim, MASTER_PID=master, REASON=why)
    raise NotAdopted(f"cannot adopt: {why}", EXIT_CONTROL)


def take_over(sup: Any, record: Record, master: procs.Pinned) -> Steps[None]:
    """The first generation of an adopting shim: the master it pinned, asked over its own
    probe socket whether it serves (its report channel died with the old shim: what the
    hook said of its readiness is lost, the probe's answer is new)."""
    sup.watch(master)
    sup.probes_made = max(sup.probes_made, record.probes)
    checked = (yield from sup.verify_serving(master, None)) if master.probe else None
    sup.master, sup.generation, sup.state = master, record.generation, "serving"
    sup.fallback, sup.degraded = record.fallback, record.degraded
    sup.adoptions = record.adoptions + [time.monotonic()]
    told = "it answered its probe" if checked == "" else (
        f"it did not answer its probe ({checked})" if checked else "no probe to ask it")
    if checked:
        sup.degraded = f"degraded: adopted master {master.pid} did not answer its probe ({checked})"
    master.adopted = f"adopted after the shim (pid {record.shim}) died"
    sup.notifier.ready(master.pid, sup.status_line())
    sup.log.event("adopted", f"master {master.pid} (generation {record.generation}, {sup.release(master)}) "
                  f"adopted after the shim (pid {record.shim}) died: {told}; reloads work again",
                  MASTER_PID=master.pid, OLD_SHIM_PID=record.shim, GENERATION=record.generation,
                  RELEASE=sup.release(master))


def _number(data: Dict[str, Any], key: str, minimum: int = 0) -> int:
    value = data.get(key)
    if type(value) is not int or not minimum <= value < 1 << 62:
        raise ValueError(f"{key}: {value!r:.40}")
    return value


def _text(data: Dict[str, Any], key: str) -> Optional[str]:
    value = data.get(key)
    if value is not None and not (isinstance(value, str) and 0 < len(value) <= MAX_TEXT and "\0" not in value):
        raise ValueError(f"{key}: not a short text")
    return value


def _own_probe(path: Optional[str], runtime_dir: str, made: int) -> bool:
    """Whether `path` is a probe socket the dead shim made in this runtime directory."""
    if not path or os.path.dirname(path) != runtime_dir:
        return False
    name = os.path.basename(path)
    number = name[len("probe."):-len(".sock")] if name.startswith("probe.") and name.endswith(".sock") else ""
    if not (number.isascii() and number.isdigit() and 0 < int(number) <= made):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()
