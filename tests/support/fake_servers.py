"""A fake process layer for fast tests of the supervisor: masters and workers
that answer signals the way Unicorn 6, Gunicorn 20 and Puma 5 (cluster mode)
do, with no real process, on the supervisor's own event loop.

Each master reads its "config" from the release directory its `-c` path names
(through the `current` symlink unless the path is pinned), when it starts and
again whenever the real server would re-read it, so a test can assert which
release serves (`FakeOS.serving()`), as a user would with curl.

What each server does on each signal is in the three classes below, each with
where it comes from: the server's source as shipped by Debian (Unicorn 6.0
http_server.rb, Gunicorn 20.1 arbiter.py, Puma 5.6 launcher.rb/cluster.rb) and
what was seen running Debian's packages. What the fake leaves out: time
(a master boots in `boot_delay`, a graceful drain takes `drain`), the app's code
(a release's behaviour is one word), logs.

Process identities are above the kernel's PID_MAX_LIMIT (2**22): a stray signal
or /proc read by the code under test can never reach a real process.
"""
from __future__ import annotations

import inspect
import os
import signal
import socket
from typing import Callable, Dict, List, Optional

from shim.runtime import health, procs, spawn
from shim.runtime.loop import Loop

PID_BASE = 5_000_000

# What a release does once a master has read its config from it.
HEALTHY = "healthy"         # workers boot and answer 200
UNHEALTHY = "unhealthy"     # workers boot and answer 500 (a failing --health-check)
DIES = "dies"               # the master exits while loading the config/app
HANGS = "hangs"             # the master never forks a worker
CRASH_LOOP = "crash-loop"   # every worker dies right after it is forked (preload_app false, broken app)


class Process:
    def __init__(self, fos: "FakeOS", pid: int, parent: int, title: str, kind: str) -> None:
        self.fos, self.pid, self.parent, self.title, self.kind = fos, pid, parent, title, kind
        self.r, self.w = os.pipe()       # the "pidfd": readable (EOF) once the process exits
        self.signals: List[int] = []
        self.zombie = False              # exited, not yet waited for by its parent
        self.deaf = False                # ignores every signal but KILL
        self.drain = 0.0                 # seconds a graceful stop takes (requests in flight)
        self.stopped = False             # SIGSTOP'd: runs nothing, accepts nothing
        self.pending: List[int] = []     # signals sent while stopped: handled on SIGCONT
        self.release: Optional[str] = None   # master: where its config was read; worker: what it serves
        self.draining = False            # asked to stop gracefully: accepts no new connection
        self.booted = False              # a worker that loaded the app and waits for connections
        self.ticks = 0                   # CPU clock ticks used (a worker loading the app uses them)
        # a master's own state
        self.argv: List[str] = []
        self.restart_dir: Optional[str] = None   # $PWD at exec (Unicorn's re-exec and Puma's restarts go there)
        self.wanted = 0                  # workers it keeps (worker_processes, num_workers, workers)
        self.respawn = True              # Unicorn: false after WINCH until HUP or TTIN
        self.stopping = False
        self.reexec_pid = 0
        self.behaviour = HEALTHY
        self.next_nr = 0
        self.nr = 0                      # a worker's number
        self.listeners: List[socket.socket] = []   # a master's inherited listening sockets

    @property
    def alive(self) -> bool:
        return self.w >= 0

    def exit(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1
            self.fos.exited(self)

    def workers(self) -> List["Process"]:
        return [p for p in self.fos.procs.values() if p.parent == self.pid and p.kind == "worker" and p.alive]


class Server:
    """Signal semantics shared by the three servers; each subclass says what differs."""

    name = ""
    master_title = ""
    # the graceful stop and the quick stop, on a master and on a worker
    master_graceful: tuple = ()
    master_quick: tuple = ()
    worker_graceful: tuple = ()
    worker_quick: tuple = ()

    def __init__(self, fos: "FakeOS") -> None:
        self.fos = fos

    def worker_title(self, master: Process, nr: int) -> str:
        raise NotImplementedError

    def master_signal(self, p: Process, sig: int) -> None:
        """What the master does on `sig` (KILL, STOP and CONT are the kernel's, handled before)."""
        if sig in self.master_graceful:
            self.fos.stop_master(p, graceful=True)
        elif sig in self.master_quick:
            self.fos.stop_master(p, graceful=False)
        else:
            self.other_signal(p, sig)

    def other_signal(self, p: Process, sig: int) -> None:
        raise NotImplementedError

    def worker_signal(self, w: Process, sig: int) -> None:
        if sig in self.worker_graceful:
            self.fos.stop_worker(w, graceful=True)
        elif sig in self.worker_quick:
            self.fos.stop_worker(w, graceful=False)

    def usr2_child_lives(self, child: Process) -> bool:
        return True


class Unicorn(Server):
    """Unicorn 6.0 (lib/unicorn/http_server.rb, the master's `case @sig_queue.shift`):

    QUIT    graceful: workers get QUIT (finish the request in flight), then the master exits.
    TERM, INT  immediate: workers get TERM and die at once, the master exits.
    USR2    re-exec: renames itself "master (old)" and forks a new master that runs
            the same command line (so reads its config anew) — refused while a
            re-exec'd child lives; when that child dies the old master reaps it and
            takes back its title.
    WINCH   gracefully stops every worker and keeps the master (respawn off,
            worker_processes = 0) — *unless $stdin is a tty* ("SIGWINCH ignored because
            we're not daemonized"). Under systemd stdin is /dev/null: it is honoured
            (older Unicorns honoured it only in a daemonized master).
    TTIN    respawn on, one worker more.  TTOU: one fewer (never below 0); the
            extra worker is QUIT.
    HUP     respawn on; with a config file, re-reads it (load_config!): every worker is
            QUIT and new ones are forked from what the config says *now* — a config
            named through `current` moves the master into the release `current` names.
    USR1    reopens logs, passes USR1 to the workers: nothing else changes.
    Workers die with their master (they watch their ppid).

    Seen with Debian's unicorn 6.0.0 (stdin /dev/null, `-c current/config/unicorn.rb`
    with `working_directory` from __FILE__, 2 workers): WINCH logged "gracefully
    stopping all workers", no worker left, the master alive, nothing answered; TTIN
    then gave one worker serving r1; `current` -> r2 and HUP gave two workers answering
    r2 and the master's cwd became releases/r2; TTOU left one worker; QUIT let the
    workers finish, then "master complete".
    """

    name = "unicorn"
    master_title = "unicorn master"
    master_graceful = worker_graceful = (signal.SIGQUIT,)
    master_quick = worker_quick = (signal.SIGTERM, signal.SIGINT)

    def worker_title(self, master: Process, nr: int) -> str:
        return f"unicorn worker[{nr}]"

    def other_signal(self, p: Process, sig: int) -> None:
        fos = self.fos
        if sig == signal.SIGUSR2:
            if p.reexec_pid and fos.procs[p.reexec_pid].alive:
                return                                    # "reexec-ed child already running"
            p.title = self.master_title + " (old)"
            fos.reexec(p)
        elif sig == signal.SIGWINCH:
            if fos.tty:
                return
            p.respawn, p.wanted = False, 0
            for w in p.workers():
                fos.stop_worker(w, graceful=True)
        elif sig == signal.SIGTTIN:
            p.respawn = True
            p.wanted += 1
            fos.maintain(p)
        elif sig == signal.SIGTTOU:
            p.wanted = max(0, p.wanted - 1)
            fos.maintain(p)
        elif sig == signal.SIGHUP:
            p.respawn = True
            fos.read_config(p)
            for w in p.workers():
                fos.stop_worker(w, graceful=True)
            fos.maintain(p)

    def reaped_reexec(self, p: Process) -> None:
        p.title = self.master_title


class Gunicorn(Server):
    """Gunicorn 20.1 (gunicorn/arbiter.py, one handle_* per signal):

    TERM    graceful (handle_term -> halt -> stop(graceful=True)): workers get TERM,
            finish their requests, the master exits.
    QUIT, INT  quick (stop(False)): workers get QUIT, die at once.
    HUP     reload(): re-reads the config, forks the configured number of new workers
            from it (preload_app false: they import the app from the release the config
            names now), TERMs the old ones.
    TTIN    one worker more.  TTOU: one fewer, never below 1 (the oldest gets TERM).
    WINCH   only when daemonized (cfg.daemon): the shim refuses -D, so always
            "SIGWINCH ignored. Not daemonized".
    USR2    reexec(): forks a new master with the same command line — ignored while a
            child or a parent exists. With sockets it inherited (LISTEN_FDS, as the
            shim hands them) the new master dies at once (OSError ENOTSOCK,
            benoitc/gunicorn#2856, seen with Debian's 20.1).
    USR1    reopens logs, USR1 to the workers.
    A worker: TERM graceful, QUIT and INT immediate.

    Seen with Debian's gunicorn 20.1 (`chdir` computed from the config's __file__,
    config named through `current`, 2 sync workers, not daemonized): WINCH changed
    nothing; two TTOUs left one worker; `current` -> r2 and HUP booted two new
    workers answering r2 and the master's cwd became releases/r2; QUIT: the
    workers exited at once, "Shutting down: Master".
    """

    name = "gunicorn"
    master_title = "gunicorn: master [app]"
    master_graceful = worker_graceful = (signal.SIGTERM,)
    master_quick = worker_quick = (signal.SIGQUIT, signal.SIGINT)

    def worker_title(self, master: Process, nr: int) -> str:
        return "gunicorn: worker [app]"

    def other_signal(self, p: Process, sig: int) -> None:
        fos = self.fos
        if sig == signal.SIGHUP:
            old = p.workers()
            fos.read_config(p)
            for _ in range(p.wanted):
                fos.fork_worker(p)
            for w in old:
                fos.stop_worker(w, graceful=True)
        elif sig == signal.SIGTTIN:
            p.wanted += 1
            fos.maintain(p)
        elif sig == signal.SIGTTOU:
            if p.wanted > 1:
                p.wanted -= 1
                fos.maintain(p)
        elif sig == signal.SIGUSR2:
            if p.reexec_pid and fos.procs[p.reexec_pid].alive:
                return                                    # "USR2 signal ignored. Child exists."
            fos.reexec(p)

    def usr2_child_lives(self, child: Process) -> bool:
        return False          # ENOTSOCK on the inherited socket: the new master dies


class Puma(Server):
    """Puma 5.6 in cluster mode (lib/puma/launcher.rb setup_signals, cluster.rb):

    TERM    graceful stop: listeners closed, workers get TERM and finish, the master exits.
    INT     stop: the same.
    QUIT    no handler: Ruby's default, the master dies at once; its workers see
            their parent gone ("Detected parent died, dying") and exit without draining.
    HUP     reopens the logs when stdout_redirect is set; otherwise stops like INT
            (the shim's units do not redirect: a HUP stops Puma).
    USR2    hot restart: workers stopped, the same pid re-execs into its restart
            directory ($PWD at start) and reads its config anew.
    USR1    phased restart: workers replaced one by one from the restart directory;
            with preload_app it is refused and becomes a hot restart (USR2).
    TTIN    one worker more.  TTOU: one fewer, never below 1.
    WINCH   no handler: Ruby ignores it.
    A worker: TERM graceful (INT is ignored in a worker).

    Seen with Debian's puma 5.6.5 (`workers 2`, started with PWD=current): QUIT
    killed the master at once ("Quit") and both workers logged "Detected parent
    died, dying"; WINCH changed nothing; two TTOUs left one worker; `current` -> r2
    and USR1 logged "Changing to .../current", replaced the worker, which answered
    r2, and the master's cwd became releases/r2; HUP without stdout_redirect:
    "Goodbye!", the master exited.
    """

    name = "puma"
    master_title = "puma 5.6.5 (tcp://127.0.0.1:8080) [app]"
    master_graceful = (signal.SIGTERM, signal.SIGINT)
    master_quick = (signal.SIGQUIT,)
    worker_graceful = (signal.SIGTERM,)

    def worker_title(self, master: Process, nr: int) -> str:
        return f"puma: cluster worker {nr}: {master.pid} [app]"

    def other_signal(self, p: Process, sig: int) -> None:
        fos = self.fos
        if sig == signal.SIGHUP:
            if not fos.redirected_io:
                fos.stop_master(p, graceful=True)
        elif sig == signal.SIGUSR2 or (sig == signal.SIGUSR1 and fos.preload_app):
            for w in p.workers():
                fos.stop_worker(w, graceful=True)
            fos.boot(p, reread=True)
        elif sig == signal.SIGUSR1:
            p.release = fos.realpath(p.restart_dir)
            fos.phase(p, list(p.workers()))
        elif sig == signal.SIGTTIN:
            p.wanted += 1
            fos.maintain(p)
        elif sig == signal.SIGTTOU:
            if p.wanted >= 2:
                p.wanted -= 1
                fos.maintain(p)


SERVERS = {cls.name: cls for cls in (Unicorn, Gunicorn, Puma)}


class FakeOS:
    """The processes of one unit, for the supervisor under test.

    `current` is a real symlink into `releases/` under `root`; `deploy(name)`
    makes a release and flips it. `behaviours` says what each release does
    (by name; HEALTHY when absent). `next_behaviour` forces what the next
    master started (by spawn or re-exec) does, for races a release cannot
    express: healthy | dies | hangs | quits-old | halts | respawn-first |
    slow-fork | old-killed-at-once."""

    def __init__(self, root: str, server: str = "unicorn", workers: int = 2, boot_delay: float = 0.05) -> None:
        self.loop = Loop()                    # the supervisor's: the fake's events happen on it
        self.server: Server = SERVERS[server](self)
        self.procs: Dict[int, Process] = {}
        self.next_pid = PID_BASE
        self.workers, self.boot_delay = workers, boot_delay
        self.boot_delays: List[float] = []     # for the next masters, in turn; then boot_delay
        self.next_behaviour = ""
        self.behaviours: Dict[str, str] = {}
        self.manager = PID_BASE               # the service manager: the parent of spawned masters
        self.cpu_wait: Dict[int, float] = {}  # seconds a process waited for a CPU, by pid
        self.tty = False                      # Unicorn's $stdin.tty? (never under systemd)
        self.redirected_io = False            # Puma's stdout_redirect
        self.preload_app = False
        self.cut_requests = 0                 # requests in flight lost to a quick stop
        self.on_signal: List[Callable[[Process, int], None]] = []   # called after each signal
        self.on_start: List[Callable[[Process], None]] = []         # called for each new master
        self.health_checks: List[str] = []    # what each health check was answered ("HTTP 500")
        self.on_health: List[Callable[[], None]] = []                # called as each check begins
        self.started: List[Process] = []      # every master, in the order they were started
        self.root = root
        os.makedirs(os.path.join(root, "releases"), exist_ok=True)
        self.current = os.path.join(root, "current")
        self.deploy("r1")

    # -- the deploy tool's side ------------------------------------------------

    def deploy(self, name: str, behaviour: str = HEALTHY) -> str:
        path = os.path.join(self.root, "releases", name)
        os.makedirs(path, exist_ok=True)
        self.behaviours[name] = behaviour
        tmp = self.current + ".new"
        os.symlink(path, tmp)
        os.replace(tmp, self.current)
        return path

    @staticmethod
    def realpath(path: Optional[str]) -> Optional[str]:
        return os.path.realpath(path) if path else None

    # -- what a user checks ----------------------------------------------------

    def accepting(self) -> List[Process]:
        """Workers that take a connection from the shared socket now."""
        return [w for w in self.procs.values() if w.kind == "worker" and w.alive and w.booted
                and not w.stopped and not w.draining and self.procs[w.parent].alive
                and not self.procs[w.parent].stopped]

    def serving(self) -> set:
        """The releases (by name) whose workers take connections: what curl would see."""
        return {os.path.basename(w.release) for w in self.accepting()}

    def health(self, url: str, timeout: float = 5.0) -> str:
        """health.check's answer: a request to the shared socket may reach any worker that
        accepts, so it fails when any of them answers 500 (and times out when none accepts)."""
        for hook in list(self.on_health):
            hook()
        answers = {self.behaviours.get(os.path.basename(w.release), HEALTHY) for w in self.accepting()}
        result = (f"health check {url}: no answer: timed out" if not answers
                  else f"health check {url}: HTTP 500" if UNHEALTHY in answers else "")
        self.health_checks.append(result.rsplit(": ", 1)[-1] if result else "HTTP 200")
        return result

    # -- a master's own listening sockets (the shim's probe socket) ----------------

    def listen(self, master: Process, fd: int) -> None:
        """The master holds a listening socket (inherited): its workers answer HTTP there."""
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        master.listeners.append(sock)
        self.loop.add_reader(sock.fileno(), self._accept, master, sock)

    def _accept(self, master: Process, sock: socket.socket) -> None:
        try:
            conn, _addr = sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        self._answer(master, conn, b"")

    def _answer(self, master: Process, conn: socket.socket, head: bytes, asked: bool = False) -> None:
        """Once the request is read and one of the master's workers accepts: 200 with the
        release (500 for a health page of an UNHEALTHY release); nothing while no worker
        accepts (the connection waits, as in a listen queue); closed with the master.
        A health page asked for is a health check beginning (on_health)."""
        try:
            head += conn.recv(8192)
        except BlockingIOError:
            pass
        except OSError:
            conn.close()
            return
        complete = b"\r\n\r\n" in head
        path = head.split(b" ", 2)[1].decode(errors="replace") if complete and head.count(b" ") >= 2 else "/"
        if complete and "health" in path and not asked:
            asked = True
            for hook in list(self.on_health):
                hook()
        workers = [w for w in self.accepting() if w.parent == master.pid]
        if not master.alive:
            conn.close()
        elif not complete or not workers:
            self.loop.call_later(0.01, self._answer, master, conn, head, asked)
        else:
            name = os.path.basename(workers[0].release)
            status = 500 if "health" in path and self.behaviours.get(name) == UNHEALTHY else 200
            body = f"release={name}\n".encode()
            try:
                conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                             "Connection: close\r\n\r\n".encode() + body)
            except OSError:
                pass
            conn.close()
            if asked:
                self.health_checks.append(f"HTTP {status}")

    def masters(self) -> List[Process]:
        return [p for p in self.procs.values() if p.kind == "master" and p.alive]

    # -- processes -------------------------------------------------------------

    def new(self, parent: int, title: str, kind: str) -> Process:
        self.next_pid += 1
        p = Process(self, self.next_pid, parent, title, kind)
        self.procs[p.pid] = p
        return p

    def spawn(self, argv: List[str], env: Dict[str, str], fds: List[int], *, chdir: Optional[str] = None,
              pwd: Optional[str] = None, **kw: object) -> int:
        """spawn.spawn: a master whose parent is the manager, holding the listening
        sockets `fds` (the tests give the shim no public socket: any is a probe socket)."""
        return self.start_master(self.manager, list(argv), pwd or chdir, fds).pid

    def start_master(self, parent: int, argv: List[str], restart_dir: Optional[str],
                     fds: List[int] = ()) -> Process:
        master = self.new(parent, self.server.master_title, "master")
        master.argv, master.restart_dir = argv, restart_dir
        for fd in fds:
            self.listen(master, fd)
        master.behaviour, self.next_behaviour = self.next_behaviour, ""
        self.started.append(master)
        for hook in list(self.on_start):
            hook(master)
        self.boot(master)
        return master

    def read_config(self, master: Process) -> None:
        """The release the master's `-c` names now (through `current` unless pinned)."""
        config = None
        for flag, value in zip(master.argv, master.argv[1:]):
            if flag in ("-c", "-C", "--config", "--config-file"):
                config = value
        config_dir = os.path.dirname(os.path.dirname(config)) if config else master.restart_dir
        master.release = self.realpath(config_dir or self.current)
        master.wanted = self.workers

    def behaviour_of(self, master: Process) -> str:
        return master.behaviour or self.behaviours.get(os.path.basename(master.release or ""), HEALTHY)

    def boot(self, master: Process, reread: bool = True) -> None:
        delay = self.boot_delays.pop(0) if self.boot_delays else self.boot_delay
        if reread:
            self.read_config(master)
        behaviour = self.behaviour_of(master)
        if behaviour == DIES:
            self.loop.call_later(delay, master.exit)
        elif behaviour != HANGS:
            self.loop.call_later(delay, self._booted, master, behaviour)

    def _booted(self, master: Process, behaviour: str) -> None:
        if not master.alive or master.stopping:
            return
        if behaviour == "halts":       # Gunicorn's boot error: one worker reaped, one left
            for nr in range(self.workers):
                worker = self.fork_worker(master)
                worker.exit()
                worker.zombie = nr == 0
            master.deaf = True
            return
        self.maintain(master)
        if behaviour == "quits-old":      # the common before_fork hook QUITs the old master
            self.signal(master.parent, signal.SIGQUIT)

    def fork_worker(self, master: Process) -> Process:
        nr = min(set(range(len(master.workers()) + 1)) - {w.nr for w in master.workers()})
        w = self.new(master.pid, self.server.worker_title(master, nr), "worker")
        w.nr, w.release = nr, master.release
        if self.behaviour_of(master) == CRASH_LOOP:
            self.loop.call_later(0.02, w.exit)          # dies loading the app
        else:
            w.booted = True
        return w

    def maintain(self, master: Process) -> None:
        """The master's loop: fork missing workers, stop extra ones."""
        if not master.alive or master.stopping or not master.respawn or master.deaf:
            return
        live = [w for w in master.workers() if not w.draining]
        for _ in range(master.wanted - len(live)):
            self.fork_worker(master)
        for w in sorted(live, key=lambda w: w.nr)[master.wanted:]:
            self.stop_worker(w, graceful=True)

    def phase(self, master: Process, old: List[Process]) -> None:
        """Puma's phased restart: one old worker at a time is replaced."""
        if not old or not master.alive:
            return
        w = old.pop(0)
        self.stop_worker(w, graceful=True)
        self.loop.call_later(self.boot_delay, self.phase, master, old)

    def reexec(self, old: Process) -> None:
        child = self.start_master(old.pid, old.argv, old.restart_dir, [s.fileno() for s in old.listeners])
        old.reexec_pid = child.pid
        if not self.server.usr2_child_lives(child):
            child.exit()

    def stop_worker(self, w: Process, graceful: bool) -> None:
        if not w.alive:
            return
        w.draining = True
        if graceful and w.drain:
            self.loop.call_later(w.drain, w.exit)
        else:
            if w.drain:
                self.cut_requests += 1
            w.exit()

    def stop_master(self, p: Process, graceful: bool) -> None:
        p.stopping, p.respawn = True, False
        drain = p.drain
        for w in p.workers():
            w.drain = w.drain or drain
            self.stop_worker(w, graceful)
        if graceful and drain:
            self.loop.call_later(drain, self._master_exits, p)
        else:
            self._master_exits(p)

    def _master_exits(self, p: Process) -> None:
        for w in p.workers():
            w.exit()
        p.exit()

    def exited(self, p: Process) -> None:
        """The kernel's side of an exit: its sockets close, orphans go to the manager,
        the parent reaps."""
        for sock in p.listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        p.listeners = []
        for child in self.procs.values():
            if child.parent == p.pid and child.kind == "master":
                child.parent = self.manager      # the new master is reparented to the manager
            elif child.parent == p.pid and child.alive:
                child.exit()                      # workers die with their master
        parent = self.procs.get(p.parent)
        if parent is not None and parent.alive and parent.kind == "master" and not p.zombie:
            if p.pid == parent.reexec_pid:
                parent.reexec_pid = 0
                if isinstance(self.server, Unicorn):
                    self.server.reaped_reexec(parent)
            elif p.kind == "worker":
                self.loop.call_later(0.01, self.maintain, parent)

    def signal(self, pid: int, sig: int) -> bool:
        """kill(pid, sig): False when there is no such process (any more)."""
        p = self.procs.get(pid)
        if p is None or not p.alive:
            return False
        p.signals.append(sig)
        if sig == signal.SIGKILL:
            p.exit()
        elif sig == signal.SIGSTOP:
            p.stopped = True
        elif sig == signal.SIGCONT:
            p.stopped = False
            pending, p.pending = p.pending, []
            for later in pending:          # what it was sent while stopped, it handles now
                if p.alive:
                    self._handle(p, later)
        elif p.stopped:
            p.pending.append(sig)
        else:
            self._handle(p, sig)
        for hook in list(self.on_signal):
            hook(p, sig)
        return True

    def _handle(self, p: Process, sig: int) -> None:
        """What the process itself does on a signal it catches."""
        if p.deaf:
            pass
        elif p.kind == "worker":
            self.server.worker_signal(p, sig)
        elif sig == signal.SIGUSR2 and self.next_behaviour == "respawn-first":
            # A worker respawned just now, not yet renamed: it bears the master's title.
            respawned = self.new(p.pid, p.title + " (old)", "worker")
            self.next_behaviour = ""
            p.title += " (old)"
            self.loop.call_later(0.3, setattr, respawned, "title", "unicorn worker[9]")
            self.loop.call_later(0.1, self.reexec, p)
        elif sig == signal.SIGUSR2 and self.next_behaviour == "slow-fork":   # found only later
            self.next_behaviour = ""
            p.title = self.server.master_title + " (old)"
            self.loop.call_later(0.5, self.reexec, p)
        elif sig == signal.SIGUSR2 and self.next_behaviour == "old-killed-at-once":
            self.next_behaviour = ""
            self.server.master_signal(p, sig)
            p.exit()                       # before the shim could look at its children
        else:
            self.server.master_signal(p, sig)

    def close(self) -> None:
        for p in list(self.procs.values()):
            p.exit()
            os.close(p.r)
        self.procs.clear()

    def children(self, pid: int) -> List[int]:
        return [p.pid for p in self.procs.values() if p.parent == pid and (p.alive or p.zombie)]

    def pin(self, pid: int, cgroup: Optional[str], *, parent: Optional[int] = None,
            not_before: Optional[int] = None, role: str = "master") -> procs.Pinned:
        p = self.procs.get(pid)
        if p is None or not p.alive or (parent is not None and p.parent != parent):
            raise procs.UntrustedPid(f"pid {pid} is not what it should be")
        return procs.Pinned(pid, os.dup(p.r), 0, role=role)

    def title(self, pid: int) -> str:
        p = self.procs.get(pid)
        return p.title if p is not None and p.alive else ""

    def wchan(self, pid: int, thread: Optional[str] = None) -> str:
        """A booted worker waits for connections; a stopped process sleeps in do_signal_stop;
        one loading the app runs."""
        p = self.procs.get(pid)
        if p is None or not p.alive or not (p.booted or p.stopped):
            return ""
        return "do_signal_stop" if p.stopped else "poll_schedule_timeout"

    def activity(self, pid: int) -> Optional[tuple]:
        """(state, CPU ticks): a worker loading the app runs and uses ticks."""
        p = self.procs.get(pid)
        if p is None or not p.alive:
            return None
        if p.stopped:
            return "T", p.ticks
        if p.kind == "worker" and not p.booted:
            p.ticks += 1
            return "R", p.ticks
        return "S", p.ticks


def install(monkeypatch, fos: FakeOS) -> None:
    """Point the shim's process layer (procs, spawn, signals through pidfds) at `fos`."""
    monkeypatch.setattr(procs, "children", fos.children)
    monkeypatch.setattr(procs, "title", fos.title)
    monkeypatch.setattr(procs, "activity", fos.activity)
    monkeypatch.setattr(procs, "wchan", fos.wchan)
    monkeypatch.setattr(procs, "cpu_wait", lambda pid: fos.cpu_wait.get(pid, 0.0))
    monkeypatch.setattr(procs, "is_zombie", lambda pid: pid in fos.procs and fos.procs[pid].zombie)
    monkeypatch.setattr(procs, "is_stopped", lambda pid: pid in fos.procs and fos.procs[pid].stopped)
    monkeypatch.setattr(procs, "parent_of", lambda pid: fos.procs[pid].parent if pid in fos.procs else None)
    monkeypatch.setattr(procs, "cwd", lambda pid: fos.procs[pid].release if pid in fos.procs else None)
    monkeypatch.setattr(procs, "exit_description", lambda pid: "exited with status 1")
    monkeypatch.setattr(procs, "pin", fos.pin)
    monkeypatch.setattr(procs, "cgroup_members", lambda cg: [p.pid for p in fos.procs.values() if p.alive])
    monkeypatch.setattr(procs.Pinned, "signal", lambda self, sig: fos.signal(self.pid, sig))
    monkeypatch.setattr(spawn, "spawn", fos.spawn)
    if list(inspect.signature(health.check).parameters)[:1] == ["url"]:
        # A check that asks the URL's own address (the shared socket): any worker may answer
        # it. A check that asks one generation's probe socket reaches the fake's workers there.
        monkeypatch.setattr(health, "check", fos.health)
