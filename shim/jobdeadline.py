"""The reload job's deadline as systemd keeps it, read by `unicorn-shim reload` when
it runs as the unit's ExecReload= and sent with its request (shim/runtime/deadline.py
is the shim's side).

What systemd does (src/core/service.c): each ExecReload= command gets a timer of
TimeoutStartSec= armed when that command is spawned (service_enter_reload, then
service_run_next_control for the next line, which arms it anew), so the one that
bounds this client starts with its control process, the unit's ControlPID=. A
notify message EXTEND_TIMEOUT_USEC=N moves that timer to now + N when that is
later. JobTimeoutSec= and JobRunningTimeoutSec= bound the whole job from its
start (the unit enters "reloading") and are never extended. When the timer fires,
systemd kills the control process: "Reload operation timed out".

Imports only what the client does; `systemctl show` is the client's.
"""
from __future__ import annotations

import os
import time

from shim.errors import ShimError

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional

PROPERTIES = ("ActiveState", "ControlPID", "TimeoutStartUSec", "JobTimeoutUSec", "JobRunningTimeoutUSec",
              "StateChangeTimestampMonotonic")
# format_timespan()'s units, as `systemctl show` prints a timespan ("2min 30s", "1.500s", "infinity")
_SPAN_UNITS = {"y": 31557600.0, "month": 2629800.0, "w": 604800.0, "d": 86400.0, "h": 3600.0,
               "min": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "μs": 1e-6}


def timespan(text: str) -> Optional[float]:
    """Seconds of a timespan as `systemctl show` prints it; None for infinity, 0 or nonsense."""
    text = text.strip()
    if not text or text == "infinity":
        return None
    total = 0.0
    for word in text.split():
        number = word.rstrip("abcdefghijklmnopqrstuvwxyzμ")
        unit = _SPAN_UNITS.get(word[len(number):])
        try:
            total += float(number) * unit if unit and number[:1].isdigit() else float("nan")
        except ValueError:
            return None
    if total != total:
        return None
    return total or None


def deadlines(timeout: Optional[float], unit: Optional[str],
              show: Callable[[str, bool, tuple], Dict[str, str]]) -> List[Dict[str, object]]:
    """When the client stops waiting, in seconds from now: its --timeout, and as
    `unit`'s ExecReload= the reload job's own timeouts. The shim never lets a
    reload go live after the first of them."""
    found: List[Dict[str, object]] = []
    if timeout:
        found.append({"in": timeout, "by": "--timeout", "setting": timeout, "extends": False})
    if unit:
        try:     # MANAGERPID: set by a user manager (systemctl --user) for what it spawns
            found += job_deadlines(unit, bool(os.environ.get("MANAGERPID")), show)
        except ShimError:
            pass        # systemd cannot be asked: the shim goes by the client leaving alone
    return found


def job_deadlines(unit: str, user: bool,
                  show: Callable[[str, bool, tuple], Dict[str, str]]) -> List[Dict[str, object]]:
    """The deadlines of the reload job this process runs in, as seconds from now:
    [] when it is not the unit's ExecReload= (the unit is not reloading, or its
    control process is not this process or one of its ancestors)."""
    props = show(unit, user, PROPERTIES)
    control = props.get("ControlPID", "0")
    if props.get("ActiveState") != "reloading" or not control.isdigit() or not _is_ancestor(int(control)):
        return []
    found: List[Dict[str, object]] = []
    limit = timespan(props.get("TimeoutStartUSec", ""))
    spawned = _started(int(control))
    if limit is not None and spawned is not None:
        left = spawned + limit - time.clock_gettime(time.CLOCK_BOOTTIME)   # /proc's start times count from boot
        found.append({"in": round(left, 3), "by": "TimeoutStartSec", "setting": limit, "extends": True})
    since = props.get("StateChangeTimestampMonotonic", "")
    for name in ("JobTimeoutUSec", "JobRunningTimeoutUSec"):
        limit = timespan(props.get(name, ""))
        if limit is not None and since.isdigit():
            left = int(since) / 1e6 + limit - time.monotonic()
            found.append({"in": round(left, 3), "by": name.replace("USec", "Sec"), "setting": limit,
                          "extends": False})
    return found


def _is_ancestor(pid: int) -> bool:
    """Whether `pid` is this process or one of its ancestors."""
    here = os.getpid()
    for _ in range(64):
        if here == pid:
            return True
        if here <= 1:
            return False
        try:
            with open(f"/proc/{here}/stat") as f:
                here = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _started(pid: int) -> Optional[float]:
    """When `pid` started, in seconds since boot (CLOCK_BOOTTIME)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
