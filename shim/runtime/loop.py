"""The supervisor's event loop: readable file descriptors, timers and signals,
each turned into a call made from the loop itself, and the one place where the
shim waits.

A shim is one of many on a host and sits idle nearly all its life, so this is
a selector and a heap of timers rather than asyncio: asyncio (with the modules
it imports) would be a third of an idle shim's memory.

The lifecycle (boot, each hand-over, the stop) is a generator of steps: each
step yields a Wait saying what it waits for and until when, and `run` drives it.
The loop alone decides what ends a wait, in this order: an interruption (a
stop, the reload's client gone, the job's timeout: whatever the `interrupt`
function given to `run` says), the awaited event, the step's deadline. Control
requests, signals and master exits are handled between the rounds, so they are
seen during a hand-over too.

Signals: the handler installed does nothing; the kernel-level handler writes the
signal's number to a wakeup pipe (signal.set_wakeup_fd), and the loop reads the
numbers there and calls the registered function, like Unicorn's self-pipe.
"""
from __future__ import annotations

import heapq
import os
import select
import selectors
import signal
import time

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Callable, Dict, Generator, List, Optional, Tuple, TypeVar

    Callback = Callable[..., None]
    T = TypeVar("T")


class Wait:
    """What a step waits for. `check(wait)` is called after every round of the loop
    (and at least every `every` seconds): a result other than None ends the wait and
    is what the step's `yield` returns; an exception it raises is raised where the
    step waits. At `deadline` (time.monotonic(); None: no deadline of its own)
    the yield returns `expired(wait)` (or None), or raises what that raises. A
    check may move its wait's deadline (a busy host's CPU wait extends a boot).
    `interruptible`: whether a stop or the reload's client going away ends it."""

    __slots__ = ("what", "check", "deadline", "every", "expired", "interruptible")

    def __init__(self, what: str, check: Optional[Callable[["Wait"], object]] = None, *,
                 deadline: Optional[float] = None, every: Optional[float] = None,
                 expired: Optional[Callable[["Wait"], object]] = None, interruptible: bool = True) -> None:
        self.what, self.check, self.deadline, self.every = what, check, deadline, every
        self.expired, self.interruptible = expired, interruptible

    def __repr__(self) -> str:
        return f"Wait({self.what!r})"


def readable_now(fd: int) -> bool:
    """Whether `fd` is readable at this moment (a pidfd: its process exited); never waits."""
    poller = select.poll()        # not select(): fds above 1024 are fine
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def pause(what: str, seconds: float, interruptible: bool = True) -> Wait:
    """A wait that only its deadline ends (or an interruption)."""
    return Wait(what, deadline=time.monotonic() + seconds, interruptible=interruptible)


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

    def run(self, task: Generator[Wait, object, T],
            interrupt: Callable[[Wait], Optional[BaseException]]) -> T:
        """Drive `task`, a generator of Waits, to its end and return its value."""
        value: object = None
        error: Optional[BaseException] = None
        while True:
            try:
                wait = task.throw(error) if error is not None else task.send(value)
            except StopIteration as done:
                return done.value       # type: ignore[no-any-return]
            value, error = None, None
            while True:
                try:
                    error = interrupt(wait)
                    if error is not None:
                        break
                    if wait.check is not None:
                        value = wait.check(wait)
                        if value is not None:
                            break
                    if wait.deadline is not None and time.monotonic() >= wait.deadline:
                        value = wait.expired(wait) if wait.expired else None
                        break
                except Exception as e:    # raised where the step waits, which decides
                    error = e
                    break
                self.poll(self._round(wait))

    @staticmethod
    def _round(wait: Wait) -> Optional[float]:
        timeout = wait.every
        if wait.deadline is not None:
            left = max(0.0, wait.deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    def poll(self, timeout: Optional[float] = None) -> None:
        """One round: wait up to `timeout` seconds (None: until something happens),
        then make the calls for what happened. Only `run` calls it in a running shim."""
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
