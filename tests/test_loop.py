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


def test_a_reader_removed_by_an_earlier_call_of_the_same_round_is_not_called():
    loop = Loop()
    a, b = os.pipe(), os.pipe()
    seen = []

    def first() -> None:
        seen.append("a")
        loop.remove_reader(b[0])

    loop.add_reader(a[0], first)
    loop.add_reader(b[0], seen.append, "b")
    os.write(a[1], b"x")
    os.write(b[1], b"x")
    loop.poll(1.0)
    assert seen in (["a"], ["b", "a"])   # b only if the selector reported it first
    loop.close()
    for fd in (*a, *b):
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
