"""What the in-server hooks and failure reporters tell the shim, and the channel
they tell it on.

Each master gets a channel of its own at start: one end of a socketpair that it
inherits, and its workers with it (Unicorn's ready_pipe works the same way).
Nothing outside that tree can write to it, so the shim trusts the channel, not
the message: the sender's pid is the one the kernel attaches, and the masters a
report is about are the ones the channel was made for. Reports:

    hello                          a master loaded the readiness hook
    ready worker=N workers=M       a worker is ready to accept (the hook)
    error TEXT                     a master's or a worker's failure, in its own words
    exec                           a master's fork about to exec the next master (USR2)
"""
from __future__ import annotations

import os
import socket
import struct
import time

from shim.runtime import procs

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Set, Tuple

    from shim.runtime.loop import Loop

HOOK_ENV = "UNICORN_SHIM_CHANNEL"
MAX_ERRORS = 64      # remembered error lines; the oldest goes first
MAX_MASTERS = 64     # masters with remembered hook reports (two live at most)
MAX_WORKERS = 1024   # worker reports per master
MAX_FAMILY = 4       # masters on one channel: Unicorn's USR2 re-exec shares its parent's
MAX_CHANNELS = 16    # one per live master; a few more while a stray process holds one open
MAX_MESSAGE = 512
MAX_LINE = 480
ROUND = 32           # reports read from one channel per loop round
_CRED = struct.Struct("3i")   # struct ucred: pid, uid, gid
_ANCILLARY = socket.CMSG_SPACE(_CRED.size) + socket.CMSG_SPACE(4 * 4)


class HookReports:
    """What the in-server hooks said, by master pid. Every report arrives on a
    master's own channel (HookChannels), which names the masters it belongs to:
    the sender's pid is the kernel's, never the message's."""

    def __init__(self) -> None:
        self.hello: Set[int] = set()
        # the first error line of a master's workers, or the master's own last words, by master pid
        self.errors: Dict[int, str] = {}
        # masters whose error line came from a worker: the root cause, which the master's
        # own last words (Gunicorn: "HaltServer 'Worker failed to boot.'") must not replace
        self.worker_errors: Set[int] = set()
        # master -> worker key (Unicorn: worker nr; Gunicorn: pid) -> (worker pid, workers
        # expected, monotonic time of the report)
        self.ready: Dict[int, Dict[int, Tuple[int, int, float]]] = {}

    def record(self, sender: int, text: str, family: List[int]) -> None:
        """One report from `sender` (the kernel's pid) on the channel of the masters
        `family` (oldest first). Anything malformed is ignored."""
        kind, _, rest = text.partition(" ")
        if kind == "hello":
            if sender in family:
                if len(self.hello) >= MAX_MASTERS:
                    self.hello = {pid for pid in self.hello if procs.parent_of(pid) is not None}
                if len(self.hello) < MAX_MASTERS:
                    self.hello.add(sender)
        elif kind == "exec":
            # A master's fork about to exec the next master (Unicorn's USR2): that
            # generation shares its parent's channel. One gone already (a broken
            # release dies in a fraction of a second) proves itself by the channel.
            parent = procs.parent_of(sender)
            if sender not in family and (parent is None or parent in family):
                family[:] = [pid for pid in family if procs.parent_of(pid) is not None][-(MAX_FAMILY - 1):]
                family.append(sender)
        elif kind == "error":
            self._error(sender, rest.strip()[:MAX_LINE], family)
        elif kind == "ready":
            args = dict(w.split("=", 1) for w in rest.split() if "=" in w)
            key, of = _number(args.get("worker")), _number(args.get("workers"))
            master = procs.parent_of(sender)
            if key is None or of is None or master not in family:
                return
            if master not in self.ready and len(self.ready) >= MAX_MASTERS:
                return
            workers = self.ready.setdefault(master, {})
            if key in workers or len(workers) < MAX_WORKERS:
                workers[key] = (sender, of, time.monotonic())

    def _error(self, sender: int, line: str, family: List[int]) -> None:
        if not line or not family:
            return
        if sender in family:           # a master's own last words
            self._blame(sender, line, of_worker=False)
            at = family.index(sender)
            if at > 0:
                # A re-exec'd master that failed: the reason of the master it came from
                # too, whose reload it was (it may be gone before the shim could watch it).
                self._blame(family[at - 1], line, of_worker=True)
            return
        parent = procs.parent_of(sender)
        if parent is None:
            # Reaped before this was read (a failed worker often is): on a master's
            # own channel it was one of its workers, of the newest master there.
            self._blame(family[-1], line, of_worker=True)
        elif parent in family:
            self._blame(parent, line, of_worker=True)
        # else: a process the app started, not a worker

    def _blame(self, master: int, line: str, of_worker: bool) -> None:
        if master in self.worker_errors:
            return                     # the first worker's error is the cause; later ones its aftermath
        if master not in self.errors and len(self.errors) >= MAX_ERRORS:
            gone = next(iter(self.errors))
            self.errors.pop(gone)
            self.worker_errors.discard(gone)
        self.errors[master] = line
        if of_worker:
            self.worker_errors.add(master)

    def ready_pids(self, master: int) -> Set[int]:
        return {pid for pid, _of, _t in self.ready.get(master, {}).values()}

    def expected(self, master: int) -> Optional[int]:
        """How many workers the master's hook said to expect, if it said."""
        return max((of for _pid, of, _t in self.ready.get(master, {}).values()), default=None)

    def clear_errors(self, master: int) -> None:
        """Before a reload: what `master`'s workers said earlier is not about it."""
        self.errors.pop(master, None)
        self.worker_errors.discard(master)

    def error_of(self, master: int) -> Optional[str]:
        """The server's own error line for `master` (a worker's first, or its own last words)."""
        return self.errors.get(master)

    def forget(self, master: int) -> None:
        self.hello.discard(master)
        self.ready.pop(master, None)
        # errors stay (bounded): a master's last words are read after it exited


def _number(text: Optional[str]) -> Optional[int]:
    """A plain ASCII number ("²".isdigit() is True, and int() refuses it), or None."""
    if text and len(text) <= 9 and text.isascii() and text.isdigit():
        return int(text)
    return None


class Channel:
    """One master's report channel: a socketpair whose far end the master inherits
    (fd FD_START + number of held sockets), and so its workers. Nothing else can
    write to it: there is no path to connect to, the fd cannot be opened through
    /proc, and only root or the app's own user could take it from a process
    (pidfd_getfd). The kernel attaches each sender's pid (SO_PASSCRED).
    SOCK_SEQPACKET: one record per write, and end of file once every holder
    has exited, so a channel lives as long as its master's tree."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        # O_NONBLOCK on the writers' shared file description: a report never blocks the server
        self.peer.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.inode = os.fstat(self.peer.fileno()).st_ino
        self.family: List[int] = []      # the masters it belongs to, oldest first
        self.refused = 0

    def environment(self, fd: int) -> str:
        """HOOK_ENV's value for a master that gets the far end at `fd`; spawn appends
        ":<the master's pid>", so that only the master itself (and its forks) speak,
        not a program it or its workers exec."""
        return f"{fd}:{self.inode}"

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


class HookChannels:
    """Every master's channel, read from the loop: at most ROUND reports per channel
    per round, whatever is sent."""

    def __init__(self, loop: Loop, reports: HookReports, cgroup: Optional[str]) -> None:
        self.loop = loop
        self.reports = reports
        self.cgroup = cgroup
        self.channels: List[Channel] = []

    def open(self) -> Channel:
        """A channel for the next master; `started` or `discard` it once spawned."""
        if len(self.channels) >= MAX_CHANNELS:
            # masters gone and a stray process of theirs holds the channel on: the oldest goes
            self.discard(next((c for c in self.channels if not _alive(c.family)), self.channels[0]))
        channel = Channel()
        self.channels.append(channel)
        self.loop.add_reader(channel.fileno(), self._readable, channel)
        return channel

    def started(self, channel: Channel, master: int) -> None:
        channel.peer.close()             # the shim keeps no writer: end of file means the tree is gone
        channel.family.append(master)

    def discard(self, channel: Channel) -> None:
        if channel in self.channels:
            self.channels.remove(channel)
            self.loop.remove_reader(channel.fileno())
            channel.close()

    def drain(self) -> None:
        """Read what is there now (bounded), e.g. a master's last words before they are asked for."""
        for channel in list(self.channels):
            self._readable(channel)

    def _readable(self, channel: Channel) -> None:
        for _ in range(ROUND):
            try:
                data, ancdata, _flags, _addr = channel.sock.recvmsg(MAX_MESSAGE, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata = b"", []
            sender = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _CRED.size:
                    sender = _CRED.unpack(payload[:_CRED.size])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    _close_fds(payload)  # no one hands the shim descriptors to keep open
            if sender is None:
                if not data:             # end of file: every process holding the far end is gone
                    self.discard(channel)
                    return
                continue
            if not self._of_the_unit(sender):
                channel.refused += 1
                continue
            try:
                self.reports.record(sender, data.decode(errors="replace"), channel.family)
            except Exception:   # noqa: BLE001 - nothing a report says may reach the loop or the boot path
                channel.refused += 1

    def _of_the_unit(self, pid: int) -> bool:
        """A sender holds the channel, so it is of the master's tree; one that is still
        alive must also still be in the unit's cgroup (not handed the fd outside it).
        One gone by now (a master's last words, a failed worker) proves itself by the
        channel alone. In that order: a process that exits between the two looks
        shows the root cgroup in /proc once it is a zombie."""
        if procs.in_cgroup(pid, self.cgroup):
            return True
        return procs.is_zombie(pid) or procs.start_time(pid) is None

    def close(self) -> None:
        for channel in list(self.channels):
            self.discard(channel)


def _alive(pids: List[int]) -> bool:
    return any(procs.start_time(pid) is not None for pid in pids)


def _close_fds(payload: bytes) -> None:
    for fd in struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]):
        try:
            os.close(fd)
        except OSError:
            pass
