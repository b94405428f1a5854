"""What the operator sees of a running shim: the one-line STATUS= (systemctl
status) and the `unicorn-shim status` object, read from the supervisor's fields."""
from __future__ import annotations

import time

from shim.runtime import procs

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Any, Dict, Optional

    Supervisor = Any        # shim.runtime.supervisor.Supervisor, which imports this module


def status_line(sup: Supervisor, workers: Optional[int] = None) -> str:
    """One line for systemctl status: state, master, workers (ready/expected
    when the hook says how many), release, generation, last reload."""
    m = sup.master
    if m is None:
        return sup.state
    if workers is None:
        workers = sum(1 for p in procs.children(m.pid) if sup.profile.worker_title.search(procs.title(p)))
    expected = sup.reports.expected(m.pid)
    counted = (f"{workers}/{expected} workers ready" if expected
               else f"{workers} worker" + ("" if workers == 1 else "s"))
    line = (f"{sup.state}: master {m.pid}, {counted}, release {sup.release(m)}, "
            f"generation {sup.generation}") + (f" ({m.adopted})" if m.adopted else "")
    line += f"; last reload {sup.last_reload}" if sup.last_reload else ""
    return f"{sup.degraded}; {line}" if sup.degraded else line


def status(sup: Supervisor) -> Dict[str, Any]:
    m = sup.master
    return {
        "state": sup.state,
        "master_pid": m.pid if m else None,
        "masters": sorted(sup.masters),
        "generation": sup.generation,
        "release": sup.release(m),
        "last_reload": sup.last_reload or None,
        "server": sup.profile.name,
        "upgrade": sup.strategy.name,
        "sockets": [{"address": s.name, "origin": s.origin} for s in sup.sockets],
        "uptime_s": round(time.time() - sup.started, 1),
        "status_line": status_line(sup),
        "degraded": sup.degraded or None,
        "adopted": m.adopted if m else None,
        "last_good_release": sup.remembered.last_good,
    }
