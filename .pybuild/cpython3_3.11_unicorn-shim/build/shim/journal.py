"""The shim's own log: structured journal entries, or readable stderr lines.

Every lifecycle step is one event with SHIM_EVENT= and its fields, so that
`journalctl -u app SHIM_EVENT=reload-failed` finds it. Under journald (stderr
is the journal stream named by JOURNAL_STREAM) entries go through
systemd.journal.send(); otherwise to stderr as `event: message key=value`.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

try:
    from systemd import journal as _journal
except ImportError:   # pragma: no cover
    _journal = None

EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


class Log:
    def __init__(self, use_journal: Optional[bool] = None) -> None:
        if use_journal is None:
            use_journal = _journal is not None and _stderr_is_journal()
        self.use_journal = use_journal

    def event(self, event: str, message: str, priority: int = INFO, **fields: object) -> None:
        fields = {k.upper(): v for k, v in fields.items() if v is not None}
        if self.use_journal:
            _journal.send(message, PRIORITY=priority, SYSLOG_IDENTIFIER="unicorn-shim",
                          SHIM_EVENT=event, **{k: str(v) for k, v in fields.items()})
            return
        extra = " ".join(f"{k.lower()}={v}" for k, v in fields.items())
        print(f"unicorn-shim: {event}: {message}" + (f" [{extra}]" if extra else ""),
              file=sys.stderr, flush=True)

    def error(self, event: str, message: str, **fields: object) -> None:
        self.event(event, message, ERR, **fields)
