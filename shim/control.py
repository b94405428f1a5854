"""The control socket, the shim's side: `unicorn-shim reload` and `status`
(shim/client.py) talk to the running shim through it.

One JSON object per line each way. The server runs in the shim's event loop; a
request waits for its own answer (a reload answers when it is over). Admitted
(SO_PEERCRED): root, the shim's own user, and, when --control-mode gives the
group write access (0660), any peer whose group or supplementary groups hold
the socket's group.
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import stat
import struct
from typing import Any, Awaitable, Callable, Dict, FrozenSet, Optional

from shim.errors import EXIT_CONTROL, ShimError

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0
_UCRED = struct.Struct("3i")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)   # Linux >= 4.13; Python does not name it
_MAX_GROUPS = 65536

Handler = Callable[[Dict[str, Any]], Awaitable[Dict[str, Any]]]


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
    def __init__(self, path: str, mode: int, handler: Handler,
                 on_refused: Callable[[int], None]) -> None:
        self.path = path
        self.mode = mode
        self.sock = bind_control_socket(path, mode)
        self.handler = handler
        self.on_refused = on_refused
        self.server: Optional[asyncio.base_events.Server] = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, sock=self.sock, limit=MAX_REQUEST)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid, gids = peer_credentials(writer.get_extra_info("socket"))
            if not admitted(uid, gids, self.mode):
                self.on_refused(uid)
                who = "root, the service's user and its group" if self.mode & 0o020 else \
                    "root and the service's user"
                await self._reply(writer, {"ok": False, "error": f"permission denied: only {who} may "
                                           "control this shim"})
                return
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                    raise ValueError("not a command")
            except (asyncio.TimeoutError, ValueError, asyncio.LimitOverrunError):
                await self._reply(writer, {"ok": False, "error": "malformed request"})
                return
            await self._reply(writer, await self.handler(request))
        except (ConnectionError, OSError):
            pass   # the client went away; the shim carries on
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, answer: Dict[str, Any]) -> None:
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
