"""A bounded load generator on loopback: N clients, fresh connection per request.

Records every request: when it started, how long it took, what failed and how,
which release answered. Used by the tests (failures must be zero) and the
benchmarks (latency percentiles).
"""
from __future__ import annotations

import http.client
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from support.systemd import WAIT, eventually


@dataclass
class Result:
    start: float
    latency: float
    release: Optional[str]
    error: Optional[str]
    body: str = ""


@dataclass
class Load:
    port: int
    clients: int = 4
    path: str = "/"
    timeout: float = 10.0
    max_seconds: float = 900.0          # bounded: it stops by itself
    results: List[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]

    def __enter__(self) -> "Load":
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _client(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            r = get(self.port, self.path, self.timeout)
            with self._lock:
                self.results.append(r)

    def failures(self) -> List[Result]:
        with self._lock:
            return [r for r in self.results if r.error]

    def failure_kinds(self) -> Counter:
        return Counter(r.error.split(":")[0] for r in self.failures())

    def ok_count(self) -> int:
        with self._lock:
            return sum(1 for r in self.results if not r.error)

    def releases_since(self, t: float) -> set:
        with self._lock:
            return {r.release for r in self.results if r.start >= t and r.release}


def get(port: int, path: str = "/", timeout: float = 10.0, host: str = "127.0.0.1") -> Result:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        if resp.status != 200:
            return Result(t0, time.monotonic() - t0, None, f"http {resp.status}")
        release = next((w.split("=", 1)[1] for w in body.split() if w.startswith("release=")), None)
        return Result(t0, time.monotonic() - t0, release, None, body)
    except Exception as e:   # every way a request can fail is a result here
        return Result(t0, time.monotonic() - t0, None, f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def accepted(port: int, pids: List[int]) -> bool:
    """Whether one of `pids` holds an accepted connection on local `port`. The kernel's
    socket filter (ss) answers at once; /proc/PID/net/tcp lists every socket of the
    host, and with the load tests' tens of thousands in TIME_WAIT, reading it for a
    few processes took 10 s, longer than the request being looked for. A connection
    still in the listen queue is established too, but has no process yet."""
    try:
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True).stdout
    except FileNotFoundError:       # no iproute2 (the Debian 13 test image): psutil, on a quiet machine
        return any(_accepted_by(pid, port) for pid in pids)
    return any(f"pid={pid}," in out for pid in pids)


def _accepted_by(pid: int, port: int) -> bool:
    import psutil
    try:
        conns = psutil.Process(pid).connections("tcp")
    except psutil.Error:
        return False
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in conns)


def wait_accepted(port: int, processes: Callable[[], List[int]], timeout: float = WAIT) -> None:
    """Until one of `processes()` (the unit's) has accepted a connection on `port`: from
    then on the request is in a worker's hands, not in the listen queue."""
    assert eventually(lambda: accepted(port, processes()), bool, timeout, interval=0.01), \
        f"no connection on port {port} was accepted within {timeout:g} s"
