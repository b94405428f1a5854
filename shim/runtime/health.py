"""The optional --health-check: one HTTP GET that must answer 2xx or 3xx.

It blocks the supervisor's loop for at most `timeout` twice (connect, answer):
it runs once per reload, against workers just found ready, and signals or
control requests that arrive meanwhile are handled right after it.
"""
from __future__ import annotations

import socket

TIMEOUT = 5.0


def check(url: str, timeout: float = TIMEOUT) -> str:
    """'' when healthy, else the reason."""
    from urllib.parse import urlsplit     # only shims with a health check pay for it

    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return f"health check URL {url!r} is not http://HOST[:PORT]/PATH"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn = socket.create_connection((parts.hostname, parts.port or 80), timeout)
    except OSError as e:
        return f"health check {url}: cannot connect: {e}"
    try:
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nUser-Agent: unicorn-shim\r\n"
                     "Connection: close\r\n\r\n".encode())
        status_line = conn.makefile("rb").readline(256)
    except OSError as e:
        return f"health check {url}: no answer: {e or 'timed out'}"
    finally:
        conn.close()
    words = status_line.decode(errors="replace").split()
    if len(words) < 2 or not (words[1].isascii() and words[1].isdigit()):
        return f"health check {url}: not an HTTP answer: {status_line[:80]!r}"
    if not 200 <= int(words[1]) < 400:
        return f"health check {url}: HTTP {words[1]}"
    return ""
