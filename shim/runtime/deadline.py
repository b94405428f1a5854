"""A reload's deadline: when its client stops waiting. The outcome reported is the
outcome, so a hand-over never passes its point of no return unless it can finish
before the first deadline of any client waiting for it; at the moment it no longer
could, it is rolled back, with the deadline named as the reason.

The client sends its deadlines with its request (shim/client.py, shim/jobdeadline.py
for how systemd's are read): seconds from now, what sets each, and whether the
shim's EXTEND_TIMEOUT_USEC= moves it (systemd's reload timer: to now + the extension
when that is later; an extension sent before the request came is not counted:
systemd re-arms the timer when it spawns the client, so it may have been undone).
A request's deadlines are hostile input: checked and bounded here.
"""
from __future__ import annotations

import math
import time

from shim.errors import ReloadFailed

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Iterable, List, Optional, Sequence

    from shim.runtime.loop import Loop, Timer

# After the point of no return: the old master's drain (up to --retire-timeout, then
# KILL), then MAINPID= and READY=1 (one datagram) and the answer (one line): the drain
# is the config's; this covers the KILL's reaping and the rest on a busy host.
FINISH_MARGIN = 2.0
MAX_DEADLINES = 8
FAR = 10 * 365 * 86400.0     # beyond this a deadline is none at all
# What may set a deadline, and how the operator gives it more time.
SOURCES = {
    "TimeoutStartSec": ("systemd's reload timeout",
                        "raise TimeoutStartSec= or lower --ready-timeout or --retire-timeout"),
    "JobTimeoutSec": ("the reload job's JobTimeoutSec=", "raise JobTimeoutSec="),
    "JobRunningTimeoutSec": ("the reload job's JobRunningTimeoutSec=", "raise JobRunningTimeoutSec="),
    "--timeout": ("the reload client's --timeout", "give `unicorn-shim reload` a longer --timeout"),
}


class Deadline:
    __slots__ = ("at", "by", "setting", "extends", "extended")

    def __init__(self, at: float, by: str, setting: float, extends: bool) -> None:
        self.at, self.by, self.setting, self.extends = at, by, setting, extends
        self.extended = False

    def extend(self, until: float) -> None:
        """The shim sent EXTEND_TIMEOUT_USEC=: systemd's timer is at `until` or later."""
        if self.extends and until > self.at:
            self.at, self.extended = until, True

    def describe(self) -> str:
        what, _fix = SOURCES[self.by]
        setting = f"{self.by}={self.setting:g} s" if self.by != "--timeout" else f"{self.setting:g} s"
        return f"{what} ({setting}{', extended by the shim' if self.extended else ''})"

    def fix(self) -> str:
        return SOURCES[self.by][1]


def from_request(request: Any, now: Optional[float] = None) -> List[Deadline]:
    """The deadlines a request carries (none: []); ValueError saying what is wrong."""
    given = request.get("deadlines", [])
    if not isinstance(given, list) or len(given) > MAX_DEADLINES:
        raise ValueError(f"deadlines: a list of at most {MAX_DEADLINES}")
    now = time.monotonic() if now is None else now
    found = []
    for item in given:
        if not isinstance(item, dict) or item.get("by") not in SOURCES:
            raise ValueError(f"deadlines: each names what sets it ({', '.join(SOURCES)})")
        left, setting, extends = item.get("in"), item.get("setting"), item.get("extends", False)
        if not (_number(left) and _number(setting) and 0 < setting <= FAR and isinstance(extends, bool)):
            raise ValueError("deadlines: 'in' and 'setting' are finite seconds, 'extends' true or false")
        if left < FAR:
            found.append(Deadline(now + max(0.0, min(left, setting)), item["by"], float(setting), extends))
    return found


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def first(deadlines: Sequence[Deadline]) -> Optional[Deadline]:
    return min(deadlines, key=lambda d: d.at, default=None)


def too_late(deadline: Deadline, reserve: float, now: float, seen: str) -> str:
    """Why the hand-over ends now: `deadline` comes within `reserve` seconds (what
    finishing takes from the point of no return on), and what was seen meanwhile."""
    left = deadline.at - now
    when = f"ends in {left:.1f} s" if left > 0 else "has passed"
    fix = deadline.fix()
    if deadline.setting <= reserve:
        # No release could ever fit: the drain the shim must allow for is the limit.
        fix = (f"no reload can finish within {deadline.setting:g} s while the old master may drain for "
               f"--retire-timeout {reserve - FINISH_MARGIN:g} s: lower --retire-timeout below "
               f"{deadline.setting - FINISH_MARGIN:g} s or {fix.split(' or ')[0]}")
    return (f"{deadline.describe()} {when}, too soon for the new release to take over (up to {reserve:g} s: "
            f"--retire-timeout {reserve - FINISH_MARGIN:g} s + {FINISH_MARGIN:g} s), {seen}: rolled back "
            f"before it; {fix}")


class Watch:
    """The deadlines of the clients waiting for the running hand-over, and a timer
    that wakes the loop when the hand-over must end by them (the loop then asks
    the supervisor's _interruption again)."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.wake: Optional[Timer] = None
        self.ended = False          # the running hand-over was ended by a deadline (said once)

    def too_late(self, askers: Iterable[object], retire_timeout: float, seen: str) -> Optional[ReloadFailed]:
        """The failure that ends the hand-over now, when it could no longer finish
        before the first deadline of `askers`; else None (and None once it was said)."""
        if self.ended:
            return None
        found = first([d for asker in askers for d in getattr(asker, "deadlines", ())])
        if found is None:
            return None
        reserve, now = retire_timeout + FINISH_MARGIN, time.monotonic()
        give_up = found.at - reserve
        if now < give_up:
            if self.wake is None or self.wake.when != give_up:
                if self.wake is not None:
                    self.wake.cancel()
                self.wake = self.loop.call_later(give_up - now, lambda: None)
            return None
        self.ended = True
        return ReloadFailed(too_late(found, reserve, now, seen))

    @staticmethod
    def extension(askers: Iterable[object], moved: float) -> float:
        """Seconds of EXTEND_TIMEOUT_USEC= that move systemd's reload timer by `moved`
        (it goes to now + the extension); 0 (nothing moves) when no client sent it."""
        found = first([d for asker in askers for d in getattr(asker, "deadlines", ()) if d.extends])
        return 0.0 if found is None else max(0.0, found.at + moved - time.monotonic())

    @staticmethod
    def extended(askers: Iterable[object], until: float) -> None:
        """EXTEND_TIMEOUT_USEC= was sent: systemd's reload timer of every client waiting now moves."""
        for asker in askers:
            for d in getattr(asker, "deadlines", ()):
                d.extend(until)
