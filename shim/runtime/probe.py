"""One HTTP request to one generation, over its private probe socket, driven by the loop.

Every master gets a listening unix socket of its own beside the public ones
(sockets.bind_probe); only its workers accept on it, so an answer there comes
from that generation and no other. A probe connects without blocking (a unix
socket connects at once, into the listen queue, even while no worker accepts
yet), sends one request, reads the response head (bounded) and calls back once
with what it saw. A worker that hangs is a timeout, a dead master a refusal.

The default request is `GET /` with `Host: localhost`, and any status below
500 counts as an answer: `/` is the one path every Rack and WSGI app routes,
GET is safe to repeat, and a redirect to a login page, a 404 or a 400 from a
host check (Django's ALLOWED_HOSTS, Rails' config.hosts) still prove that a
worker loaded the app and serves. A 5xx is the app failing. `--probe-path /up`
(Rails >= 7.1) and `--probe-status 200-299` make the probe stricter.
"""
from __future__ import annotations

import errno
import socket
import time
from collections import namedtuple

from shim.runtime.loop import Wait

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Callable, Generator, Optional, Tuple

    from shim.runtime.loop import Loop, Timer

DEFAULT_PATH = "/"
DEFAULT_HOST = "localhost"
DEFAULT_STATUSES = "100-499"
TIMEOUT = 5.0            # one attempt: connect, request, response head
MAX_HEAD = 8192          # bytes read at most for the status line and headers
USER_AGENT = "unicorn-shim-probe"


def parse_statuses(text: str) -> Tuple[Tuple[int, int], ...]:
    """'200-399,404' -> ((200, 399), (404, 404)); ValueError when it is not that."""
    ranges = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        first = int(low)
        last = int(high) if dash else first
        if not 100 <= first <= last <= 599:
            raise ValueError(f"{part.strip()!r} is not a status or a range of statuses within 100-599")
        ranges.append((first, last))
    return tuple(ranges)


class Request(namedtuple("Request", "path host statuses", defaults=(DEFAULT_PATH, DEFAULT_HOST,
                                                                   parse_statuses(DEFAULT_STATUSES)))):
    """What a probe asks and which answers it accepts (statuses: inclusive ranges)."""

    __slots__ = ()

    def encode(self) -> bytes:
        return (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUser-Agent: {USER_AGENT}\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n").encode("latin-1")

    def accepts(self, status: int) -> bool:
        return any(first <= status <= last for first, last in self.statuses)


class Result(namedtuple("Result", "ok seen status elapsed", defaults=(None, 0.0))):
    """ok: the answer was accepted; seen: what came back, in words ("HTTP 200",
    "timeout", "refused", "reset", "closed with no answer", "not HTTP: ...")."""

    __slots__ = ()


class Probe:
    """One attempt. `done(result)` is called exactly once, from the loop (never from
    start(), even when the connection fails at once), unless cancelled."""

    def __init__(self, loop: Loop, path: str, request: Request, done: Callable[[Result], None],
                 timeout: float = TIMEOUT) -> None:
        self.loop, self.path, self.request, self.done, self.timeout = loop, path, request, done, timeout
        self.sock: Optional[socket.socket] = None
        self.timer: Optional[Timer] = None
        self.head = b""
        self.started = 0.0
        self.finished = False

    def start(self) -> None:
        self.started = time.monotonic()
        self.timer = self.loop.call_later(self.timeout, self._finish, False,
                                          f"timeout: no answer in {self.timeout:g} s")
        sock = self.sock = socket.socket(socket.AF_UNIX,
                                         socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        code = sock.connect_ex(self.path)
        if code:
            # A unix socket never answers EINPROGRESS: it is in the listen queue or it is not.
            self._fail_soon(_connect_error(code))
            return
        request = self.request.encode()
        try:
            sent = sock.send(request)      # far below any socket buffer: never partial on a new connection
        except OSError as e:
            self._fail_soon(_io_error(e))
            return
        if sent != len(request):
            self._fail_soon(f"could send only {sent} of {len(request)} bytes of the request")
            return
        self.loop.add_reader(sock.fileno(), self._readable)

    def _fail_soon(self, seen: str) -> None:
        self.timer.cancel()
        self.timer = self.loop.call_later(0, self._finish, False, seen)

    def cancel(self) -> None:
        self.finished = True
        self._close()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(MAX_HEAD - len(self.head))
        except BlockingIOError:
            return
        except OSError as e:
            self._finish(False, _io_error(e))
            return
        self.head += data
        self._judge(eof=not data)

    def _judge(self, eof: bool) -> None:
        head = self.head
        if not b"HTTP/".startswith(head[:5]):
            self._finish(False, f"not HTTP: {head[:60]!r}")
            return
        status_line, newline, _rest = head.partition(b"\n")
        complete = b"\r\n\r\n" in head or b"\n\n" in head or (eof and newline)
        if not complete:
            if eof:
                self._finish(False, "closed with no answer" if not head else f"closed mid-answer: {head[:60]!r}")
            elif len(head) >= MAX_HEAD:
                self._finish(False, f"not HTTP: no end of the response head in {MAX_HEAD} bytes")
            return
        words = status_line.split()
        if len(words) < 2 or not (words[1].isdigit() and len(words[1]) == 3):
            self._finish(False, f"not HTTP: {status_line[:60]!r}")
            return
        status = int(words[1])
        self._finish(self.request.accepts(status), f"HTTP {status}", status)

    def _finish(self, ok: bool, seen: str, status: Optional[int] = None) -> None:
        if self.finished:
            return
        self.finished = True
        self._close()
        self.done(Result(ok, seen, status, time.monotonic() - self.started))

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None


class _Attempts:
    """Probes of one generation one after another, driven by the loop alone."""

    def __init__(self, loop: Loop, path: str, request: Request, timeout: float) -> None:
        self.loop, self.path, self.request, self.timeout = loop, path, request, timeout
        self.current: Optional[Probe] = None
        self.timer: Optional[Timer] = None

    def _attempt(self) -> None:
        self.timer = None
        self.current = Probe(self.loop, self.path, self.request, self._finished, self.timeout)
        self.current.start()

    def _finished(self, result: Result) -> None:
        self.current = None
        delay = self._done(result)
        if delay is not None:
            self.timer = self.loop.call_later(delay, self._attempt)

    def _done(self, result: Result) -> Optional[float]:
        """Record `result`; the delay before the next attempt, or None to stop."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.current is not None:
            self.current.cancel()
            self.current = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Prober(_Attempts):
    """Probes one generation until a probe is answered as accepted, one attempt at a
    time, each up to `timeout`, the next `retry` seconds after a failed one. Started
    with the master: until a worker accepts, the first attempt waits in the socket's
    listen queue and is answered the moment one does."""

    def __init__(self, loop: Loop, path: str, request: Request, timeout: float = TIMEOUT,
                 retry: float = 0.1) -> None:
        super().__init__(loop, path, request, timeout)
        self.retry = retry
        self.answer: Optional[Result] = None     # the accepted answer, once there is one
        self.last: Optional[Result] = None       # the last failed attempt's
        self.failed = 0
        self.started = 0.0

    def start(self) -> "Prober":
        self.started = time.monotonic()
        self._attempt()
        return self

    def _done(self, result: Result) -> Optional[float]:
        if result.ok:
            self.answer = result
            return None
        self.last, self.failed = result, self.failed + 1
        return self.retry

    def describe(self) -> str:
        """What was seen, for a reason: 'no answer to GET / in 12 s (3 attempts, last: HTTP 500)'."""
        if self.answer is not None:
            return f"answered GET {self.request.path}: {self.answer.seen}"
        waited = time.monotonic() - self.started
        pending = " (one still waiting)" if self.current is not None else ""
        last = f", last: {self.last.seen}" if self.last else ""
        attempts = self.failed + (self.current is not None)
        return (f"no answer to GET {self.request.path} in {waited:.0f} s "
                f"({attempts} attempt{'s' if attempts != 1 else ''}{last}{pending})")


class Watcher(_Attempts):
    """Probes one generation every `interval` until stopped, each attempt up to
    `timeout`; `failure` is the first attempt not answered as accepted (then it stops)."""

    def __init__(self, loop: Loop, path: str, request: Request, timeout: float, interval: float) -> None:
        super().__init__(loop, path, request, timeout)
        self.interval = interval
        self.failure: Optional[Result] = None
        self.answered = 0

    def start(self) -> "Watcher":
        self._attempt()
        return self

    def _done(self, result: Result) -> Optional[float]:
        if not result.ok:
            self.failure = result
            return None
        self.answered += 1
        return self.interval


def _connect_error(code: int) -> str:
    if code == errno.ECONNREFUSED:
        return "refused (no master listens)"
    if code == errno.ENOENT:
        return "no probe socket"
    if code == errno.EAGAIN:
        return "listen queue full"
    return f"cannot connect: {errno.errorcode.get(code, code)}"


def _io_error(e: OSError) -> str:
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, BrokenPipeError):
        return "closed before the request was read"
    return f"{type(e).__name__}: {e.strerror or e}"


def attempt(loop: Loop, path: str, request: Request,
            timeout: float = TIMEOUT) -> Generator[Wait, object, Result]:
    """One probe, as a step of the lifecycle (the loop ends its wait: the probe's own
    timer bounds it). What ends the wait first (a stop) ends the probe too."""
    results: list = []
    probe = Probe(loop, path, request, results.append, timeout)
    probe.start()
    try:
        return (yield Wait(f"an answer over {path}", lambda wait: results[0] if results else None))
    finally:
        probe.cancel()

