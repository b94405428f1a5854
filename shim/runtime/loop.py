"""The supervisor's event loop: readable file descriptors, timers and signals,
each turned into a call made from the loop itself.

A shim is one of many on a host and sits idle nearly all its life, so this is
a selector and a heap of timers rather than asyncio: asyncio (with the modules
it imports) would be a third of an idle shim's memory. Nothing here blocks but
`poll`, and the supervisor's lifecycle code calls `poll` wherever it waits, so
control requests, signals and master exits are seen during a hand-over too.

Signals: the handler installed does nothing; the kernel-level handler writes the
signal's number to a wakeup pipe (signal.set_wakeup_fd), and the loop reads the
numbers there and calls the registered function, like Unicorn's self-pipe.
"""
from __future__ import annotations

import heapq
import os
import selectors
import signal
import time

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Tuple

    Callback = Callable[..., None]


class Timer:
    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callback, args: tuple) -> None:
        self.when, self.callback, self.args, self.cancelled = when, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "Timer") -> bool:
        return self.when < other.when


def _noted(number: int, frame: object) -> None:
    """Python-level handler: the number already went to the wakeup pipe."""


class Loop:
    def __init__(self, on_error: Optional[Callable[[str, Exception], None]] = None) -> None:
        # A call that raises is reported here and the loop goes on: a bug in answering a
        # status request must not take the service down. Without on_error, it raises.
        self.on_error = on_error
        self.selector = selectors.DefaultSelector()
        self.timers: List[Timer] = []
        self.signal_handlers: Dict[int, Tuple[Callback, tuple]] = {}
        self._previous: Dict[int, object] = {}     # handlers put back by close()
        self._wakeup: Optional[Tuple[int, int, int]] = None

    # -- what is watched ------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback, *args: object) -> None:
        self.selector.register(fd, selectors.EVENT_READ, (callback, args))

    def remove_reader(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_later(self, delay: float, callback: Callback, *args: object) -> Timer:
        timer = Timer(time.monotonic() + delay, callback, args)
        heapq.heappush(self.timers, timer)
        return timer

    def add_signal_handler(self, number: int, callback: Callback, *args: object) -> None:
        if self._wakeup is None:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
            self.add_reader(r, self._read_signals, r)
        self.signal_handlers[number] = (callback, args)
        self._previous.setdefault(number, signal.signal(number, _noted))

    # -- waiting ----------------------------------------------------------------

    def poll(self, timeout: Optional[float] = None) -> None:
        """Wait up to `timeout` seconds (None: until something happens), then make
        the calls for what happened."""
        if self.timers:
            first = max(0.0, self.timers[0].when - time.monotonic())
            timeout = first if timeout is None else min(timeout, first)
        ready = self.selector.select(timeout)
        if self._wakeup and len(ready) > 1:
            # Signals first: one sent before a connection was made is seen before its request.
            ready.sort(key=lambda event: event[0].fd != self._wakeup[0])
        for key, _events in ready:
            # an earlier call of this round may have removed (and closed) this one
            if self.selector.get_map().get(key.fd) is key:
                callback, args = key.data
                self._call(callback, args)
        self._run_due_timers()

    def _call(self, callback: Callback, args: tuple) -> None:
        if self.on_error is None:
            callback(*args)
            return
        try:
            callback(*args)
        except Exception as e:
            self.on_error(getattr(callback, "__qualname__", repr(callback)), e)

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0].when <= now:
            timer = heapq.heappop(self.timers)
            if not timer.cancelled:
                self._call(timer.callback, timer.args)

    def pending_signals(self) -> None:
        """Make the calls for signals already received, now (not at the next poll)."""
        if self._wakeup:
            self._read_signals(self._wakeup[0])

    def _read_signals(self, fd: int) -> None:
        try:
            numbers = os.read(fd, 4096)
        except BlockingIOError:
            return
        for number in numbers:
            handler = self.signal_handlers.get(number)
            if handler:
                self._call(*handler)

    def close(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self.signal_handlers.clear()
        self._previous.clear()
        if self._wakeup:
            r, w, previous_fd = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            os.close(r)
            os.close(w)
            self._wakeup = None
        self.selector.close()
