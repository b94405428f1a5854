"""A test's own look at a generation's probe socket: plain blocking HTTP over a unix
socket, independent of the shim's probe code that it checks."""
from __future__ import annotations

import glob
import os
import socket
import time
from typing import List, Optional, Tuple


def probe_sockets(runtime_dir: str) -> List[str]:
    """The probe sockets in a shim's runtime directory, oldest generation first."""
    found = glob.glob(os.path.join(runtime_dir, "probe.*.sock"))
    return sorted(found, key=lambda p: int(os.path.basename(p).split(".")[1]))


def get_unix(path: str, http_path: str = "/", host: str = "localhost",
             timeout: float = 5.0) -> Tuple[Optional[int], str]:
    """(status, body) of one GET over the unix socket at `path`; (None, why) when it fails."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(f"GET {http_path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    words = head.split(b"\r\n", 1)[0].split()
    if len(words) < 2 or not words[1].isdigit():
        return None, f"not HTTP: {data[:80]!r}"
    return int(words[1]), body.decode(errors="replace")


def wait_answer(path: str, expect: str, timeout: float = 20.0) -> Tuple[Optional[int], str]:
    """GET over `path` until the body contains `expect` (or the deadline): the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = get_unix(path)
        if (status is not None and expect in body) or time.monotonic() > deadline:
            return status, body
        time.sleep(0.1)
