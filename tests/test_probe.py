"""The probe (shim/runtime/probe.py) against real unix sockets: servers that answer,
hang, reset, dawdle, babble or are gone, driven by the shim's own loop."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from shim.runtime import probe
from shim.runtime.loop import Loop


class Server:
    """A listening unix socket; `behave(conn)` runs for each connection in a thread."""

    def __init__(self, path: str, behave=None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.requests = []
        self.behave = behave
        if behave is not None:
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.behave(self, conn)

    def read_request(self, conn) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        self.requests.append(data)
        return data

    def close(self) -> None:
        self.sock.close()


def answer(status_line: bytes, delay: float = 0.0):
    def behave(server, conn):
        server.read_request(conn)
        time.sleep(delay)
        try:
            conn.sendall(status_line + b"\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n")
        except OSError:
            pass                          # the probe gave up first (a test of the timeout)
    return behave


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "probe.1.sock")


def run(loop, path, request=probe.Request(), timeout=2.0, ticks=None):
    """Start a probe and poll the loop until it reports; also proves start() never blocks
    and that the loop keeps running its timers meanwhile."""
    results = []
    p = probe.Probe(loop, path, request, results.append, timeout)
    t0 = time.monotonic()
    p.start()
    assert time.monotonic() - t0 < 0.05, "start() blocked"
    assert results == [], "reported from start() instead of from the loop"
    deadline = time.monotonic() + timeout + 5
    while not results and time.monotonic() < deadline:
        loop.poll(0.5)
        if ticks is not None:
            ticks.append(time.monotonic())
    assert len(results) == 1
    return results[0]


def test_an_answer_is_read_and_the_request_names_path_and_host(loop, path):
    server = Server(path, answer(b"HTTP/1.1 200 OK"))
    result = run(loop, path, probe.Request("/up", "app.example"))
    assert result.ok and result.seen == "HTTP 200" and result.status == 200
    request = server.requests[0]
    assert request.startswith(b"GET /up HTTP/1.1\r\n")
    assert b"\r\nHost: app.example\r\n" in request and b"Connection: close" in request
    server.close()


@pytest.mark.parametrize("status,ok", [(302, True), (404, True), (400, True), (500, False), (503, False)])
def test_default_accepts_any_answer_below_500(loop, path, status, ok):
    server = Server(path, answer(b"HTTP/1.1 %d Whatever" % status))
    result = run(loop, path)
    assert (result.ok, result.seen) == (ok, f"HTTP {status}")
    server.close()


def test_configured_statuses_are_obeyed(loop, path):
    server = Server(path, answer(b"HTTP/1.0 404 Not Found"))
    result = run(loop, path, probe.Request(statuses=probe.parse_statuses("200-299")))
    assert not result.ok and result.seen == "HTTP 404"
    server.close()


def test_a_hung_accept_is_a_timeout_and_the_loop_runs_on_meanwhile(loop, path):
    server = Server(path)                 # listens, never accepts
    fired = []
    loop.call_later(0.2, fired.append, time.monotonic() + 0.2)
    t0 = time.monotonic()
    result = run(loop, path, timeout=1.0)
    took = time.monotonic() - t0
    assert not result.ok and result.seen.startswith("timeout")
    assert 0.9 < took < 3.0, took
    assert fired and fired[0] < t0 + 1.0, "a timer waited for the probe"
    server.close()


def test_a_slow_answer_within_the_timeout_passes_and_one_beyond_does_not(loop, path):
    server = Server(path, answer(b"HTTP/1.1 200 OK", delay=0.5))
    result = run(loop, path, timeout=3.0)
    assert result.ok and result.elapsed >= 0.5
    result = run(loop, path, timeout=0.2)
    assert not result.ok and result.seen.startswith("timeout")
    server.close()


def test_a_reset_is_named(loop, path):
    def reset(server, conn):
        time.sleep(0.1)                   # the request arrives unread: closing now resets
    server = Server(path, reset)
    result = run(loop, path)
    assert (result.ok, result.seen) == (False, "reset")
    server.close()


def test_a_close_with_no_answer_is_named(loop, path):
    server = Server(path, lambda server, conn: server.read_request(conn))
    result = run(loop, path)
    assert (result.ok, result.seen) == (False, "closed with no answer")
    server.close()


def test_an_oversized_response_head_is_cut_at_the_bound(loop, path):
    def babble(server, conn):
        server.read_request(conn)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Junk: " + b"a" * 100_000 + b"\r\n\r\n")
        except OSError:
            pass                          # the probe stopped reading at its bound
    server = Server(path, babble)
    result = run(loop, path)
    assert not result.ok and f"{probe.MAX_HEAD} bytes" in result.seen
    server.close()


def test_garbage_is_not_http(loop, path):
    def ssh(server, conn):
        server.read_request(conn)
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    server = Server(path, ssh)
    result = run(loop, path)
    assert not result.ok and result.seen.startswith("not HTTP: b'SSH-2.0")
    server.close()


def test_a_socket_nobody_listens_on_is_refused_and_a_missing_one_named(loop, path):
    server = Server(path)
    server.close()                       # the file stays, the listener is gone: a dead master
    assert os.path.exists(path)
    assert run(loop, path).seen.startswith("refused")
    os.unlink(path)
    assert run(loop, path).seen == "no probe socket"


def test_an_attempt_is_a_step_the_loop_waits_for_and_an_interruption_ends_the_probe(loop, path):
    server = Server(path, answer(b"HTTP/1.1 204 No Content"))
    waits = []

    def never(wait):
        waits.append(wait)
    result = loop.run(probe.attempt(loop, path, probe.Request()), never)
    assert result.ok and result.seen == "HTTP 204" and waits
    hung = Server(path + "2")

    def stop_at_once(wait):
        waits.append(wait)
        return KeyboardInterrupt("a stop requested meanwhile")
    waits.clear()
    with pytest.raises(KeyboardInterrupt):
        loop.run(probe.attempt(loop, path + "2", probe.Request()), stop_at_once)
    assert len(loop.selector.get_map()) == 0, "an abandoned probe left its socket in the loop"
    server.close()
    hung.close()


@pytest.mark.parametrize("text,expected", [("200", ((200, 200),)), ("200-399,404", ((200, 399), (404, 404)))])
def test_statuses_parse(text, expected):
    assert probe.parse_statuses(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "99", "600", "400-200", "200-"])
def test_bad_statuses_are_refused(text):
    with pytest.raises(ValueError):
        probe.parse_statuses(text)


def test_the_health_check_asks_over_the_probe_socket_with_the_urls_path_and_host(loop, path):
    from shim.runtime import health
    server = Server(path, answer(b"HTTP/1.1 503 Service Unavailable"))
    reason = loop.run(health.check(loop, path, "http://shop.example:8080/health?deep=1"), lambda wait: None)
    assert reason == "health check http://shop.example:8080/health?deep=1: HTTP 503"
    request = server.requests[0]
    assert request.startswith(b"GET /health?deep=1 HTTP/1.1\r\n") and b"\r\nHost: shop.example:8080\r\n" in request
    server.close()
    os.unlink(path)
    server = Server(path, answer(b"HTTP/1.1 302 Found"))
    assert loop.run(health.check(loop, path, "http://127.0.0.1/"), lambda wait: None) == ""
    server.close()


@pytest.mark.parametrize("url", ["https://x/", "http:///path", "http://a b/", "localhost:80/"])
def test_a_health_check_url_that_cannot_be_asked_is_refused(url):
    from shim.runtime import health
    with pytest.raises(ValueError):
        health.request_for(url)


def test_a_prober_retries_until_an_answer_is_accepted_and_then_stops(loop, path):
    """A master booting: the first attempts fail (a 503 while warming up), then it serves."""
    answers = [b"HTTP/1.1 503 Warming Up", b"HTTP/1.1 503 Warming Up", b"HTTP/1.1 200 OK"]

    def warming(server, conn):
        answer(answers.pop(0) if answers else b"HTTP/1.1 200 OK")(server, conn)
    server = Server(path, warming)
    prober = probe.Prober(loop, path, probe.Request(), timeout=2.0, retry=0.05).start()
    deadline = time.monotonic() + 10
    while prober.answer is None and time.monotonic() < deadline:
        loop.poll(0.5)
    assert prober.answer is not None and prober.answer.seen == "HTTP 200"
    assert prober.failed == 2 and prober.last.seen == "HTTP 503"
    assert prober.describe() == "answered GET /: HTTP 200"
    loop.poll(0.2)
    assert len(server.requests) == 3, "it went on probing after the answer"
    assert len(loop.selector.get_map()) == 0
    server.close()


def test_a_prober_of_a_hung_generation_says_what_it_saw_and_stops_cleanly(loop, path):
    server = Server(path)                 # workers that never accept: a hang at import
    prober = probe.Prober(loop, path, probe.Request("/up"), timeout=0.3, retry=0.05).start()
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        loop.poll(0.1)
    assert prober.answer is None and prober.failed >= 2
    described = prober.describe()
    assert described.startswith("no answer to GET /up in 1 s (") and "last: timeout" in described, described
    prober.stop()
    assert len(loop.selector.get_map()) == 0 and all(t.cancelled for t in loop.timers)
    server.close()
