"""The control socket: `unicorn-shim reload` and `status` talk to the running shim.

One JSON object per line each way. The server side runs in the shim's event
loop; a request waits for its own answer (a reload answers when it is over).
Only root and the shim's own user may connect (SO_PEERCRED).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import struct
from typing import Any, Awaitable, Callable, Dict, Optional

from shim.errors import EXIT_CONTROL, ShimError

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0
_UCRED = struct.Struct("3i")

Handler = Callable[[Dict[str, Any]], Awaitable[Dict[str, Any]]]


def default_path(environ: "Dict[str, str] | os._Environ[str]") -> Optional[str]:
    """The socket in the unit's RuntimeDirectory= (ExecReload= sees the same one)."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, SOCKET_NAME) if runtime else None


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(creds)[1]


def bind_control_socket(path: str, mode: int) -> socket.socket:
    """Bind the control socket, replacing a stale file a previous run left."""
    try:
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ShimError(f"control socket path {path} exists and is not a socket", EXIT_CONTROL)
        os.unlink(path)   # ours from an earlier run: only one shim per RuntimeDirectory
    except FileNotFoundError:
        pass
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


class ControlServer:
    def __init__(self, path: str, mode: int, handler: Handler,
                 on_refused: Callable[[int], None]) -> None:
        self.path = path
        self.sock = bind_control_socket(path, mode)
        self.handler = handler
        self.on_refused = on_refused
        self.server: Optional[asyncio.base_events.Server] = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, sock=self.sock, limit=MAX_REQUEST)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid not in (0, os.getuid()):
                self.on_refused(uid)
                await self._reply(writer, {"ok": False, "error": "permission denied: only root and the "
                                           "service's user may control this shim"})
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


def request(path: Optional[str], command: Dict[str, Any], timeout: Optional[float]) -> Dict[str, Any]:
    """Send one command and wait for its answer (client side, blocking)."""
    if not path:
        raise ShimError("cannot find the shim's control socket: RUNTIME_DIRECTORY is not set "
                        "(add RuntimeDirectory= to the unit) and no --control was given", EXIT_CONTROL)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        try:
            sock.sendall(json.dumps(command).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # The shim may answer and close before reading us (a refused peer): its
            # answer is already queued on our side, so read it rather than report EPIPE.
            pass
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except FileNotFoundError:
        raise ShimError(f"no shim is running: {path} does not exist", EXIT_CONTROL) from None
    except ConnectionRefusedError:
        raise ShimError(f"no shim is running: nothing answers on {path} "
                        "(the shim died; restart the service)", EXIT_CONTROL) from None
    except socket.timeout:
        raise ShimError(f"no answer from the shim within {timeout:g} s "
                        "(the operation goes on in the shim; see journalctl)", EXIT_CONTROL) from None
    except OSError as e:
        raise ShimError(f"cannot talk to the shim on {path}: {e.strerror or e}", EXIT_CONTROL) from None
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError:
        raise ShimError("the shim closed the connection without an answer", EXIT_CONTROL) from None
