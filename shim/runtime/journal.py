"""The shim's own log: structured journal entries, or readable stderr lines.

Every lifecycle step is one event with SHIM_EVENT= and its fields, so that
`journalctl -u app SHIM_EVENT=reload-failed` finds it. Under journald (stderr
is the journal stream named by JOURNAL_STREAM) entries go through
systemd.journal.send(); otherwise to stderr as `event: message key=value`.
"""
from __future__ import annotations

import sys

from shim.errors import stderr_is_journal

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Callable, Optional

EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)


def _journal_sendv() -> Optional[Callable[..., object]]:
    """systemd-python's sendv(), loaded only under journald. Its C module
    directly: the systemd.journal wrapper also loads the journal reader, uuid,
    datetime and logging (about 1.3 MiB per shim) for nothing the shim uses."""
    try:
        from systemd._journal import sendv
    except ImportError:   # pragma: no cover
        return None
    return sendv


class Log:
    def __init__(self, use_journal: Optional[bool] = None) -> None:
        if use_journal is None:
            use_journal = stderr_is_journal()
        self._sendv = _journal_sendv() if use_journal else None
        self.use_journal = self._sendv is not None

    def event(self, event: str, message: str, priority: int = INFO, **fields: object) -> None:
        fields = {k.upper(): v for k, v in fields.items() if v is not None}
        if self._sendv is not None:
            self._sendv(f"MESSAGE={message}", f"PRIORITY={priority}", "SYSLOG_IDENTIFIER=unicorn-shim",
                        f"SHIM_EVENT={event}", *(f"{k}={v}" for k, v in fields.items()))
            return
        extra = " ".join(f"{k.lower()}={v}" for k, v in fields.items())
        print(f"unicorn-shim: {event}: {message}" + (f" [{extra}]" if extra else ""),
              file=sys.stderr, flush=True)

    def error(self, event: str, message: str, **fields: object) -> None:
        self.event(event, message, ERR, **fields)
