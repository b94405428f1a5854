"""The optional --health-check URL, asked of one generation alone.

It goes over that generation's private probe socket (shim/runtime/probe.py), not to
the URL's address: the shared socket's queue is served by whichever generation's
worker accepts first, so an answer there may be the old release's. The URL gives
the path and query, and its host part is sent as the Host header (name-based
routing, Rails' config.hosts). A 2xx or 3xx passes.
"""
from __future__ import annotations

from shim.runtime import probe

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Generator

    from shim.runtime.loop import Loop, Wait

TIMEOUT = 5.0
PASSING = ((200, 399),)


def request_for(url: str) -> probe.Request:
    """The probe request a health-check URL stands for; ValueError when it is not http://HOST[:PORT]/PATH."""
    from urllib.parse import urlsplit     # only shims with a health check pay for it

    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"health check URL {url!r} is not http://HOST[:PORT]/PATH")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(c in path + parts.netloc for c in " \r\n"):
        raise ValueError(f"health check URL {url!r} has a space or a line break")
    return probe.Request(path, parts.netloc, PASSING)


def check(loop: Loop, socket_path: str, url: str) -> Generator[Wait, object, str]:
    """'' when the generation listening on `socket_path` passes, else the reason: a
    step of the lifecycle (the loop waits for the answer)."""
    try:
        request = request_for(url)
    except ValueError as e:
        return str(e)
    result = yield from probe.attempt(loop, socket_path, request, TIMEOUT)
    return "" if result.ok else f"health check {url}: {result.seen}"
