#!/usr/bin/python3
"""Benchmark (not a test): what readiness and the upgrade strategy cost per
deploy, side by side in one run, each column under its own private real
systemd with real Unicorn and load running.

    sudo bench/readiness.py [--reloads 10] [--clients 4]

Columns: the readiness hook vs the heuristic (no `require "unicorn_shim"`),
and spawn vs usr2 with the classic `before_fork` hook that QUITs the .oldbin
master (Unicorn's example config: TTOU per worker, QUIT at the last; and the widely
copied variant that QUITs at the first worker, then sleeps 1 s). Rows come from
the shim's own `reload-done` journal fields (the server's boot, the old
master's drain, the shim's overhead beyond both, and within it the wait for the
new generation's answer over its probe socket once its workers were seen
ready) and from the clients (failed requests, worst latency in a reload window).
Debian's Python (/usr/bin/python3): it sees python3-systemd and python3-psutil.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from support.deploy import NO_PROBATION, Deployment  # noqa: E402
from support.load import Load, get  # noqa: E402
from support.systemd import UserManager  # noqa: E402

COLUMNS = {
    "hook, spawn": dict(ready_hook=True),
    "heuristic, spawn": dict(ready_hook=False),
    "heuristic, usr2": dict(ready_hook=False, shim_args="--upgrade usr2"),
    "classic hook, spawn": dict(ready_hook=False, seed_hook=True),
    "classic hook, usr2": dict(ready_hook=False, seed_hook=True, shim_args="--upgrade usr2"),
    "QUIT-first hook, spawn": dict(ready_hook=False, seed_hook="quit-first"),
    "QUIT-first hook, usr2": dict(ready_hook=False, seed_hook="quit-first", shim_args="--upgrade usr2"),
    "gunicorn hook": dict(server="gunicorn", ready_hook=True),
    "hook, spawn, probation 2 s": dict(ready_hook=True, shim_args="--probation 2"),
    "gunicorn heuristic": dict(server="gunicorn", ready_hook=False),
}


def run_column(kw: dict, reloads: int, clients: int, base: str) -> dict:
    manager = UserManager(base)
    d = Deployment(manager, tempfile.mkdtemp(dir=base), **{"probation": NO_PROBATION, **kw})
    out = {"failed": 0, "took_effect": 0, "worst_ms": [], "return_ms": []}
    try:
        d.start()
        with Load(d.port, clients=clients) as load:
            time.sleep(0.5)
            for _ in range(reloads):
                name = d.app.release()
                t0 = time.monotonic()
                r = d.reload()
                t1 = time.monotonic()
                out["return_ms"].append((t1 - t0) * 1000)
                if r.returncode == 0 and get(d.port, timeout=5).release == name:
                    out["took_effect"] += 1
                time.sleep(0.5)
                window = [x.latency for x in load.results if t0 <= x.start <= t1 + 0.2]
                out["worst_ms"].append(max(window, default=0) * 1000)
            out["failed"] = len(load.failures())
        events = manager.events("reload-done")
        for field in ("SERVER_BOOT_MS", "RETIRE_MS", "SHIM_OVERHEAD_MS", "DURATION_MS", "PROBE_WAIT_MS"):
            out[field] = [int(e[field]) for e in events if field in e]    # (no probe before issue 21)
    finally:
        d.stop()
        manager.down()
    return out


def med(values) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--only", action="append", help="run only these columns")
    args = parser.parse_args()
    gc.disable()      # the load generator's own GC passes would count as server latency
    base = tempfile.mkdtemp(prefix="unicorn-shim-bench.")
    results = {}
    try:
        for name, kw in COLUMNS.items():
            if args.only and name not in args.only:
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_column(kw, args.reloads, args.clients, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = [
        ("failed requests", lambda r: str(r["failed"])),
        ("deploys that took effect", lambda r: f"{r['took_effect']}/{args.reloads}"),
        ("server boot (median ms)", lambda r: med(r["SERVER_BOOT_MS"])),
        ("old master's drain (median ms)", lambda r: med(r["RETIRE_MS"])),
        ("shim overhead (median / max ms)", lambda r: f"{med(r['SHIM_OVERHEAD_MS'])} / "
                                                      f"{max(r['SHIM_OVERHEAD_MS'], default=0)}"),
        ("of which waiting for the probe's answer (median / max ms)",
         lambda r: f"{med(r['PROBE_WAIT_MS'])} / {max(r['PROBE_WAIT_MS'], default='-')}"),
        ("reload duration (median ms)", lambda r: med(r["DURATION_MS"])),
        ("systemctl reload returns (median ms)", lambda r: med(r["return_ms"])),
        ("worst latency in a reload window (median / max ms)",
         lambda r: f"{med(r['worst_ms'])} / {max(r['worst_ms'], default=0):.0f}"),
    ]
    print_table(rows, results)
    return 0


@contextlib.contextmanager
def deployed(base: str, **kw):
    """(its private systemd, a Deployment of **kw under it), both taken down after."""
    manager = UserManager(base)
    d = Deployment(manager, tempfile.mkdtemp(dir=base), **{"probation": NO_PROBATION, **kw})
    try:
        yield manager, d
    finally:
        d.stop()
        manager.down()


def run_columns(columns: dict, run) -> dict:
    """run(base directory, column's settings) for each column, one after the other in one run."""
    gc.disable()      # the load generator's own GC passes would count as server latency
    results, base = {}, tempfile.mkdtemp(prefix="unicorn-shim-bench.")
    try:
        for name, settings in columns.items():
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run(base, settings)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def print_table(rows: list, columns: dict) -> None:
    """A markdown table: a row per (label, cell(column's results)), a column per entry."""
    print("| measure | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(results) for results in columns.values()) + " |")


if __name__ == "__main__":
    sys.exit(main())
