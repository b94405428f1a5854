"""The supervisor's event loop (shim/runtime/loop.py): real signals, pipes and timers."""
from __future__ import annotations

import os
import signal
import time

from shim.runtime.loop import Loop


def test_a_signal_becomes_a_call_from_the_loop_and_close_puts_the_handler_back():
    before = signal.getsignal(signal.SIGUSR2)
    loop = Loop()
    seen = []
    loop.add_signal_handler(signal.SIGUSR2, seen.append, "usr2")
    os.kill(os.getpid(), signal.SIGUSR2)
    assert seen == []                  # nothing runs inside the handler
    loop.poll(1.0)
    assert seen == ["usr2"]
    loop.close()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_timers_run_in_order_and_a_cancelled_one_never():
    loop = Loop()
    seen = []
    loop.call_later(0.02, seen.append, "second")
    loop.call_later(0.01, seen.append, "first")
    loop.call_later(0.015, seen.append, "cancelled").cancel()
    deadline = time.monotonic() + 2
    while len(seen) < 2 and time.monotonic() < deadline:
        loop.poll()                    # None: sleeps only until the next timer
    assert seen == ["first", "second"]
    loop.close()


def test_a_signal_is_handled_before_other_events_of_the_same_round():
    """A signal sent before a connection was made is seen before its request: with
    both pending when the loop wakes, the signal's call comes first, whatever order
    the selector reports them in."""
    loop = Loop()
    seen = []
    readers = [os.pipe() for _ in range(3)]
    for r, _w in readers:                      # registered before the wake-up pipe exists
        loop.add_reader(r, seen.append, f"fd{r}")
    loop.add_signal_handler(signal.SIGUSR2, seen.append, "usr2")
    for _r, w in readers:
        os.write(w, b"x")
    os.kill(os.getpid(), signal.SIGUSR2)
    loop.poll(1.0)
    assert seen[0] == "usr2" and sorted(seen[1:]) == sorted(f"fd{r}" for r, _w in readers), seen
    loop.close()
    for fd in (fd for pair in readers for fd in pair):
        os.close(fd)


def test_a_reader_removed_by_an_earlier_call_of_the_same_round_is_not_called():
    """A stop signal that closes a reader (a master's pidfd, a client) in the round
    where that reader is ready too: signals come first, so the reader is never called."""
    loop = Loop()
    r, w = os.pipe()
    seen = []

    def on_signal() -> None:
        seen.append("signal")
        loop.remove_reader(r)

    loop.add_reader(r, seen.append, "reader")
    loop.add_signal_handler(signal.SIGUSR2, on_signal)
    os.write(w, b"x")
    os.kill(os.getpid(), signal.SIGUSR2)
    loop.poll(1.0)
    loop.poll(0.05)
    assert seen == ["signal"]
    loop.close()
    for fd in (r, w):
        os.close(fd)


def test_a_call_that_raises_is_reported_and_the_loop_goes_on():
    errors = []
    loop = Loop(on_error=lambda where, e: errors.append((where, str(e))))
    seen = []
    loop.call_later(0, lambda: 1 / 0)
    loop.call_later(0, seen.append, "after")
    loop.poll(0.1)
    assert seen == ["after"] and errors and "division by zero" in errors[0][1]
    loop.close()
