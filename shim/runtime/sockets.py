"""The listening sockets the shim holds for every generation of masters.

They come from a systemd .socket unit (LISTEN_FDS) or are bound here from
--listen addresses. Either way the shim keeps them open for its whole life, so
a master that dies or is replaced never takes the port with it.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
from collections import namedtuple

from shim.errors import EXIT_ACTIVATION, EXIT_LISTEN, ShimError

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import List, Optional

LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 64   # far more than any real unit; guards against hostile LISTEN_FDS
BACKLOG = 1024


class Address(namedtuple("Address", "family host port path", defaults=("", 0, ""))):
    """A parsed --listen address: host and port for TCP, path for unix sockets."""

    __slots__ = ()

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.path}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class HeldSocket:
    def __init__(self, sock: socket.socket, name: str, origin: str, unlink_path: Optional[str] = None) -> None:
        self.sock = sock
        self.name = name                # the server's spelling: "127.0.0.1:8080", "[::1]:8080", "/run/app.sock"
        self.origin = origin            # "systemd" (LISTEN_FDNAMES entry) or "listen"
        self.unlink_path = unlink_path  # a unix socket file we created and remove at exit

    def fileno(self) -> int:
        return self.sock.fileno()


def parse_address(text: str) -> Address:
    """Parse `HOST:PORT`, `[V6]:PORT`, `PORT` or `unix:/path`."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise ShimError(f"--listen {text!r}: a unix socket path must be absolute", EXIT_LISTEN)
        return Address(socket.AF_UNIX, path=path)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ShimError(f"--listen {text!r}: expected [IPV6]:PORT", EXIT_LISTEN)
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise ShimError(f"--listen {text!r}: {host!r} is not an IPv6 address", EXIT_LISTEN) from None
        return Address(socket.AF_INET6, host=host, port=_parse_port(text, port))
    host, sep, port = text.rpartition(":")
    if not sep:
        return Address(socket.AF_INET, host="0.0.0.0", port=_parse_port(text, text))
    if host in ("", "*"):
        host = "0.0.0.0"
    try:
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            host = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        except socket.gaierror as e:
            raise ShimError(f"--listen {text!r}: cannot resolve {host!r}: {e.strerror}", EXIT_LISTEN) from None
    return Address(socket.AF_INET, host=host, port=_parse_port(text, port))


def _parse_port(text: str, port: str) -> int:
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ShimError(f"--listen {text!r}: {port!r} is not a port number (1-65535)", EXIT_LISTEN)
    return int(port)


def server_name(sock: socket.socket) -> str:
    """The address as Unicorn and Gunicorn spell it, from the socket itself."""
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        return name.decode() if isinstance(name, bytes) else name
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def bind(address: Address, unix_mode: Optional[int] = None) -> HeldSocket:
    """Bind and listen on one --listen address."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        if address.family == socket.AF_UNIX:
            _remove_stale_unix_socket(address.path)
            sock.bind(address.path)
            if unix_mode is not None:
                os.chmod(address.path, unix_mode)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ShimError(f"--listen {address}: cannot bind: {e.strerror or e}", EXIT_LISTEN) from None
    unlink = address.path if address.family == socket.AF_UNIX else None
    return HeldSocket(sock, server_name(sock), "listen", unlink)


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ShimError(f"--listen unix:{path}: is a symlink; refusing to follow or remove it", EXIT_LISTEN)
    if not stat.S_ISSOCK(st.st_mode):
        raise ShimError(f"--listen unix:{path}: exists and is not a socket; refusing to remove it", EXIT_LISTEN)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)          # nobody listens: stale
        return
    except OSError as e:
        raise ShimError(f"--listen unix:{path}: cannot check the existing socket: {e.strerror}", EXIT_LISTEN) from None
    finally:
        probe.close()
    raise ShimError(f"--listen unix:{path}: another process is listening on it", EXIT_LISTEN)


def from_systemd(environ: "os._Environ[str] | dict[str, str]") -> List[HeldSocket]:
    """Take the sockets of a .socket unit, or [] when not socket-activated.

    Checked by hand rather than trusting sd_listen_fds() alone, so that each
    way of getting it wrong has its own message.
    """
    fds_text = environ.get("LISTEN_FDS")
    if fds_text is None:
        return []
    pid_text = environ.get("LISTEN_PID", "")
    if pid_text != str(os.getpid()):
        raise ShimError(f"LISTEN_PID={pid_text!r} is not this process ({os.getpid()}): "
                        "the sockets were meant for another process", EXIT_ACTIVATION)
    if not (fds_text.isascii() and fds_text.isdigit()) or not 0 < int(fds_text) <= MAX_LISTEN_FDS:
        raise ShimError(f"LISTEN_FDS={fds_text!r} is not a count between 1 and {MAX_LISTEN_FDS}", EXIT_ACTIVATION)
    count = int(fds_text)
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    if names and len(names) != count:
        raise ShimError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}", EXIT_ACTIVATION)
    held = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        held.append(_adopt(fd, names[i] if names else "unknown"))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(var, None)
    return held


def _adopt(fd: int, fdname: str) -> HeldSocket:
    try:
        os.fstat(fd)
    except OSError:
        raise ShimError(f"inherited fd {fd} ({fdname}) is not open", EXIT_ACTIVATION) from None
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        if e.errno == errno.ENOTSOCK:
            raise ShimError(f"inherited fd {fd} ({fdname}) is not a socket", EXIT_ACTIVATION) from None
        raise
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ShimError(f"inherited fd {fd} ({fdname}) is not a listening stream socket "
                        "(use ListenStream= in the .socket unit, and Accept=no)", EXIT_ACTIVATION)
    os.set_inheritable(fd, False)
    return HeldSocket(sock, server_name(sock), f"systemd:{fdname}")


def hold(environ: "os._Environ[str] | dict[str, str]", listen: List[str],
         unix_mode: Optional[int] = None) -> List[HeldSocket]:
    """All sockets for this run: the .socket unit's, plus any --listen given."""
    addresses = [parse_address(a) for a in listen]   # parse everything before binding anything
    held = from_systemd(environ)
    try:
        for address in addresses:
            held.append(bind(address, unix_mode))
    except ShimError:
        release(held)
        raise
    return held


def bind_probe(directory: str, number: int) -> HeldSocket:
    """A generation's private probe socket: a listening unix socket in the runtime
    directory, mode 0600 (only the shim's user, the service's, can connect; the
    server accepts on the fd it inherits and needs no access to the file), one name
    per master. Handed over like the held sockets; the shim closes its own copy once
    the master has it, so a probe of a generation whose master died is refused."""
    path = os.path.join(directory, f"probe.{number}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)        # never reachable by others, not even between bind and chmod
    try:
        try:
            os.unlink(path)            # left by an earlier run whose runtime directory was kept
        except FileNotFoundError:
            pass
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ShimError(f"cannot make the probe socket {path}: {e.strerror or e}", EXIT_LISTEN) from None
    finally:
        os.umask(old_umask)
    return HeldSocket(sock, path, "probe", path)


def unlink_probe(path: Optional[str]) -> None:
    """Remove a probe socket's file once its master is gone (the server never does)."""
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def release(held: List[HeldSocket]) -> None:
    for h in held:
        h.sock.close()
        if h.unlink_path:
            try:
                os.unlink(h.unlink_path)
            except FileNotFoundError:
                pass
