"""The optional --health-check: one HTTP GET that must answer 2xx or 3xx."""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

TIMEOUT = 5.0


async def check(url: str, timeout: float = TIMEOUT) -> str:
    """'' when healthy, else the reason."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return f"health check URL {url!r} is not http://HOST[:PORT]/PATH"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 80), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        return f"health check {url}: cannot connect: {e}"
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nUser-Agent: unicorn-shim\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        return f"health check {url}: no answer: {e or 'timed out'}"
    finally:
        writer.close()
    words = status_line.decode(errors="replace").split()
    if len(words) < 2 or not (words[1].isascii() and words[1].isdigit()):
        return f"health check {url}: not an HTTP answer: {status_line[:80]!r}"
    if not 200 <= int(words[1]) < 400:
        return f"health check {url}: HTTP {words[1]}"
    return ""
