"""The shim's messages to the service manager (sd_notify).

systemd-python's daemon.notify() is used where it is installed (Debian's
python3-systemd); sdnotify, pure Python, where it is not. Without
NOTIFY_SOCKET (not run by systemd) every message is a no-op.
"""
from __future__ import annotations

import os
import time
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
    def __init__(self) -> None:
        self._send = _sender()
        self.watchdog_usec = _watchdog_usec()

    @property
    def enabled(self) -> bool:
        return self._send is not None

    def send(self, **fields: object) -> None:
        """send(MAINPID=12, READY=1, STATUS="...") -> one datagram, in that order."""
        if self._send is None:
            return
        self._send("\n".join(f"{k}={v}" for k, v in fields.items()))

    def ready(self, mainpid: int, status: str) -> None:
        self.send(MAINPID=mainpid, READY=1, STATUS=status)

    def reloading(self, mainpid: int, status: str) -> None:
        # MONOTONIC_USEC lets systemd >= 253 match the reload; older ones ignore it.
        self.send(RELOADING=1, MAINPID=mainpid, STATUS=status,
                  MONOTONIC_USEC=int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6))

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> None:
        self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)


def _watchdog_usec() -> Optional[int]:
    """WatchdogSec= of the unit, if it is meant for this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec)
