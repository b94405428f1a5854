"""The shim's messages to the service manager (sd_notify).

systemd-python's daemon.notify() is used where it is installed (Debian's
python3-systemd); sdnotify, pure Python, where it is not. Without
NOTIFY_SOCKET (not run by systemd) every message is a no-op.
"""
from __future__ import annotations

import os
import socket
import time

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Callable, Optional


def _sender() -> Optional[Callable[[str], object]]:
    """Loaded only when there is a service manager to tell (NOTIFY_SOCKET)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        from systemd import daemon
        return daemon.notify
    except ImportError:   # pragma: no cover - exercised where python3-systemd is absent
        import sdnotify
        return sdnotify.SystemdNotifier().notify


class Notifier:
    _send: Optional[Callable[[str], object]] = None
    # Told when systemd's timer is moved: the time (monotonic) it is at, or later.
    on_extend: Optional[Callable[[float], None]] = None

    def __init__(self) -> None:
        self._send = _sender()
        self.watchdog_usec = _watchdog_usec()

    def managed(self) -> bool:
        """Whether a service manager hears these messages."""
        return self._send is not None


    def send(self, **fields: object) -> None:
        """send(MAINPID=12, READY=1, STATUS="...") -> one datagram, in that order."""
        if self._send is None:
            return
        self._send("\n".join(f"{k}={v}" for k, v in fields.items()))

    def ready(self, mainpid: int, status: str) -> None:
        self.send(MAINPID=mainpid, READY=1, STATUS=status)

    def reloading(self, mainpid: int, status: str) -> Optional[int]:
        """The hand-over begins: MAINPID moves to the shim. Returns the read end of
        a barrier (sd_notify_barrier) that systemd closes once it has taken the
        message in; the old master may exit only from then on. None without a manager.

        No RELOADING=1: the unit already shows "reloading" while `systemctl
        reload` runs ExecReload=, and after it systemd >= 253 waits for READY=1
        after ExecReload= ends even when the main process is dead: a shim killed
        mid hand-over left the unit stuck until TimeoutStartSec= instead of
        restarting it (252 restarts it at once either way)."""
        self.send(MAINPID=mainpid, STATUS=status)
        return barrier()

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> None:
        """Move the running job's timer (systemd: to now + seconds when that is later)."""
        if seconds <= 0:
            return
        self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))
        if self.managed() and self.on_extend is not None:
            self.on_extend(time.monotonic() + seconds)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)


def barrier() -> Optional[int]:
    """sd_notify_barrier()'s first half: sends BARRIER=1 with the write end of a pipe
    and returns the read end, which the manager's side makes readable (closed) once
    it has processed every message sent before. Datagrams are read asynchronously:
    until then systemd may still see the old master as the main process. None when
    it cannot be sent (the caller then cannot know either)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return None
    if address[0] == "@":
        address = "\0" + address[1:]
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            socket.send_fds(s, [b"BARRIER=1"], [w])
    except OSError:
        os.close(r)
        return None
    finally:
        os.close(w)
    return r


def _watchdog_usec() -> Optional[int]:
    """WatchdogSec= of the unit, if it is meant for this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not (usec.isascii() and usec.isdigit()) or (pid and pid != str(os.getpid())):
        return None
    return int(usec)
