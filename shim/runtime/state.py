"""What the shim remembers across restarts: the last release that served.

A failed deploy leaves `current` on the bad release (deploy tools stop, they
do not flip back); the next restart or reboot would boot it and crash-loop.
The shim records, durably, each release a master became ready in, so a boot
whose release fails can fall back to it. One small JSON file in the unit's
state directory (StateDirectory=), replaced atomically.
"""
from __future__ import annotations

import json
import os
import time

from shim.runtime import procs

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Dict, Optional

FILE_NAME = "state.json"


class State:
    def __init__(self, directory: Optional[str]) -> None:
        self.path = os.path.join(directory, FILE_NAME) if directory else None
        self.data: Dict[str, Any] = self._load()

    def _load(self) -> Dict[str, Any]:
        if not self.path:
            return {}
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def last_good(self) -> Optional[str]:
        value = self.data.get("last_good_release")
        return value if isinstance(value, str) else None

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
            self.data.update(last_failed_release=release, last_failed_at=_now(), last_failed_reason=reason)
            self._save()

    def _save(self) -> None:
        """Atomically and durably: a crash leaves the old file or the new one, never half of one."""
        if self.path:
            procs.write_atomically(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n",
                                   mode=0o644, durable=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
