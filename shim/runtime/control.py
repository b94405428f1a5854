"""The control socket, the shim's side: `unicorn-shim reload` and `status`
(shim/client.py) talk to the running shim through it.

One JSON object per line each way. The server runs in the shim's event loop; a
request carries its own reply (a reload's is sent when the hand-over is over). Admitted
(SO_PEERCRED): root, the shim's own user, and, when --control-mode gives the
group write access (0660), any peer whose group or supplementary groups hold
the socket's group.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time

from shim.errors import EXIT_CONTROL, ShimError
from shim.runtime.loop import Loop, Timer

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, FrozenSet, Optional

    from typing import Protocol

    Handler = Callable[[Dict[str, Any], "Reply"], None]

    class Asker(Protocol):
        """Who asked for a reload: called with its answer; gone() once nobody waits for it."""

        def __call__(self, answer: Dict[str, Any]) -> None: ...
        def gone(self) -> bool: ...

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0
MAX_READING = 128       # connections whose request is still coming; beyond, the oldest is answered at once
ACCEPT_ROUND = 64       # connections accepted per loop round
REFUSED_EVERY = 1.0     # at most one control-refused event a second: another user cannot flood the journal
_UCRED = struct.Struct("3i")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)   # Linux >= 4.13; Python does not name it
_MAX_GROUPS = 65536



def peer_credentials(sock: socket.socket) -> "tuple[int, FrozenSet[int]]":
    """(uid, every gid) of the connected peer, as the kernel recorded them at connect()."""
    _pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            break
        except OSError as e:
            if e.errno == errno.ERANGE and size < _MAX_GROUPS * 4:
                size *= 16
                continue
            raw = b""      # an old kernel: the primary group only
            break
    groups = struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
    return uid, frozenset((gid, *groups))


def admitted(uid: int, gids: FrozenSet[int], mode: int) -> bool:
    """Root and the shim's user; the socket's group too when the mode lets it write (connect)."""
    return uid in (0, os.getuid()) or bool(mode & 0o020 and os.getgid() in gids)


def bind_control_socket(path: str, mode: int) -> socket.socket:
    """Bind the control socket, replacing a stale file a previous run left (never a live one)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ShimError(f"control socket path {path} exists and is not a socket", EXIT_CONTROL)
        _refuse_live(path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)   # never world-accessible, not even for an instant
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    os.chown(path, os.getuid(), os.getgid())
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _refuse_live(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return           # nobody listens: left by an earlier run
    except OSError as e:
        raise ShimError(f"control socket {path}: cannot check the existing socket: {e.strerror}",
                        EXIT_CONTROL) from None
    finally:
        probe.close()
    raise ShimError(f"control socket {path}: another shim is running on it (one shim per "
                    "RuntimeDirectory=; give this one its own --control)", EXIT_CONTROL)


class ControlServer:
    """Accepts on the control socket; each admitted request goes to `handler` with
    the function that sends its answer and closes the connection."""

    def __init__(self, path: str, mode: int, handler: Handler,
                 on_refused: Callable[[int], None], loop: Loop) -> None:
        self.path = path
        self.mode = mode
        self.sock = bind_control_socket(path, mode)
        self.handler = handler
        self.on_refused = on_refused
        self.loop = loop
        self.reading: Dict[int, "_Request"] = {}       # connections whose request is not complete yet
        self.refused_at = -REFUSED_EVERY      # when the last control-refused event was logged
        loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_ROUND):      # a flood of connections waits for the next round
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return      # e.g. EMFILE: the client sees its connection closed, the shim carries on
            try:
                uid, gids = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            if not admitted(uid, gids, self.mode):
                self._refused(uid)
                who = "root, the service's user and its group" if self.mode & 0o020 else \
                    "root and the service's user"
                _send(conn, {"ok": False, "error": f"permission denied: only {who} may control this shim"})
                continue
            if len(self.reading) >= MAX_READING:
                # fds stay bounded, and clients that never speak cannot keep a real one out
                self._malformed(next(iter(self.reading)))
            conn.setblocking(False)
            request = _Request(conn, self.loop.call_later(REQUEST_TIMEOUT, self._malformed, conn.fileno()))
            self.reading[conn.fileno()] = request
            self.loop.add_reader(conn.fileno(), self._read, conn.fileno())

    def _refused(self, uid: int) -> None:
        now = time.monotonic()
        if now - self.refused_at >= REFUSED_EVERY:
            self.refused_at = now
            self.on_refused(uid)

    def _read(self, fd: int) -> None:
        request = self.reading.get(fd)
        if request is None:
            return
        try:
            data = request.conn.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        request.buffer += data
        if b"\n" not in request.buffer and data and len(request.buffer) <= MAX_REQUEST:
            return
        line = request.buffer.split(b"\n", 1)[0]
        if not line.strip() and not data:
            self._forget(fd).conn.close()     # the client went away without asking anything
            return
        try:
            if len(line) > MAX_REQUEST:
                raise ValueError("too long")
            asked = json.loads(line)
            if not isinstance(asked, dict) or not isinstance(asked.get("command"), str):
                raise ValueError("not a command")
        except (ValueError, RecursionError):     # RecursionError: "[[[[..." nested past the limit
            self._malformed(fd)
            return
        conn = self._forget(fd).conn
        self.handler(asked, Reply(conn))

    def _malformed(self, fd: int) -> None:
        if fd in self.reading:
            _send(self._forget(fd).conn, {"ok": False, "error": "malformed request"})

    def _forget(self, fd: int) -> "_Request":
        request = self.reading.pop(fd)
        request.timer.cancel()
        self.loop.remove_reader(fd)
        return request

    def close(self) -> None:
        for fd in list(self.reading):
            self._forget(fd).conn.close()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Request:
    __slots__ = ("conn", "timer", "buffer")

    def __init__(self, conn: socket.socket, timer: Timer) -> None:
        self.conn, self.timer, self.buffer = conn, timer, b""


def _send(conn: socket.socket, answer: Dict[str, Any]) -> None:
    """The answer, then the connection closed; a client gone meanwhile costs nothing."""
    try:
        conn.settimeout(REQUEST_TIMEOUT)     # a few hundred bytes: the socket's buffer takes them
        conn.sendall(json.dumps(answer).encode() + b"\n")
    except OSError:
        pass
    finally:
        conn.close()


class Reply:
    """A request's connection, kept open until its answer is sent."""

    __slots__ = ("conn", "sent", "deadlines")

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.sent = conn, False
        self.deadlines: list = []        # when its client stops waiting (shim/runtime/deadline.py)

    def __call__(self, answer: Dict[str, Any]) -> None:
        if not self.sent:
            self.sent = True
            _send(self.conn, answer)

    def gone(self) -> bool:
        """Whether the client closed its end (it sends nothing after its request):
        one look at the socket, without waiting."""
        if self.sent:
            return True
        try:
            return self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


class SignalledReload:
    """A reload a signal asked for: its answer, kept for the one client that asks
    for it (`reload --signalled`, which may connect before or after it is over)."""

    def __init__(self) -> None:
        self.result: Optional[Dict[str, Any]] = None
        self.waiting: Optional[Reply] = None

    def __call__(self, result: Dict[str, Any]) -> None:
        self.result = result
        if self.waiting:
            self.waiting(result)

    def gone(self) -> bool:
        """Gone once its client connected and left; before it connects, not gone
        (the kill that asked for it is followed by the client at once)."""
        return self.waiting is not None and self.waiting.gone()

    @property
    def deadlines(self) -> list:
        """Its client's, once it connected."""
        return self.waiting.deadlines if self.waiting else []

    def report_to(self, reply: Reply) -> None:
        if self.result is not None:
            reply(self.result)
        else:
            self.waiting = reply
