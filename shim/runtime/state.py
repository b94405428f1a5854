"""What the shim remembers across restarts: the last release that served.

A failed deploy leaves `current` on the bad release (deploy tools stop, they
do not flip back); the next restart or reboot would boot it and crash-loop.
The shim records, durably, each release a master became ready in, so a boot
whose release fails can fall back to it. One small JSON file in the unit's
state directory (StateDirectory=), replaced atomically, readable by the
unit's user alone (it holds the server's error lines).

The file is read as untrusted input: anything but a small regular file of
known keys and types is ignored, never a reason not to start.
"""
from __future__ import annotations

import json
import os
import stat
import time

from shim.runtime import procs

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Dict, Optional

FILE_NAME = "state.json"
MAX_BYTES = 64 * 1024      # the shim writes well under 4 KiB
MAX_TEXT = 4096            # a path or a reason longer than this was not written by the shim
KEYS = ("last_good_release", "last_good_at", "last_failed_release", "last_failed_at", "last_failed_reason")
MODE = 0o600


class State:
    def __init__(self, directory: Optional[str]) -> None:
        self.path = os.path.join(directory, FILE_NAME) if directory else None
        self.data: Dict[str, Any] = self._load()

    def _load(self) -> Dict[str, Any]:
        if not self.path:
            return {}
        text = _read_small_file(self.path)
        if text is None:
            return {}
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):      # RecursionError: "[[[[..." nested deeper than the parser goes
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: data[k] for k in KEYS if isinstance(data.get(k), str) and 0 < len(data[k]) <= MAX_TEXT}

    @property
    def last_good(self) -> Optional[str]:
        return self.data.get("last_good_release")

    def served(self, release: Optional[str]) -> None:
        """A master became ready serving `release` (a real directory)."""
        if release:
            self.data.update(last_good_release=release, last_good_at=_now())
            if self.data.get("last_failed_release") == release:
                self.data.pop("last_failed_release", None)
            self._save()

    def failed(self, release: Optional[str], reason: str) -> None:
        """A reload or a boot of `release` failed."""
        if release and release != self.last_good:
            self.data.update(last_failed_release=release, last_failed_at=_now(),
                             last_failed_reason=reason[:MAX_TEXT])
            self._save()

    def _save(self) -> None:
        """Atomically and durably: a crash leaves the old file or the new one, never half of one."""
        if self.path:
            procs.write_atomically(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n",
                                   mode=MODE, durable=True)


def fallback_refusal(last_good: str, deployed: Optional[str]) -> Optional[str]:
    """Why `last_good` may not be booted instead of the `deployed` release, or None.

    The file is in a directory the unit's user may write: whatever it names, the
    shim would start the server in. So only a release directory beside the
    deployed one qualifies: an absolute path to a real directory (no symlink on
    the way) whose parent is the deployed release's parent (`releases/`)."""
    if not os.path.isabs(last_good) or os.path.normpath(last_good) != last_good:
        return f"the recorded last good release {last_good!r} is not a normalised absolute path"
    if not os.path.isdir(last_good):
        return f"the last good release {last_good} no longer exists"
    if os.path.realpath(last_good) != last_good:
        return f"the recorded last good release {last_good} goes through a symlink"
    if not deployed or os.path.dirname(last_good) != os.path.dirname(deployed):
        return (f"the recorded last good release {last_good} is not beside the deployed release {deployed} "
                "(only a sibling directory of the release --chdir names is booted instead)")
    return None


def _read_small_file(path: str) -> Optional[str]:
    """The text of `path` if it is a regular file of at most MAX_BYTES, else None
    (never blocks on a FIFO, never reads a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            return None
        data = os.read(fd, MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
