#!/usr/bin/python3
"""Benchmark (not a test): what --probation catches and what it costs, for a few
lengths side by side in one run, each column under its own private real systemd
with real servers and load running.

    sudo bench/probation.py [--values 0,2,3,5,8] [--good 6] [--bad 3] [--clients 4]

Per column (one --probation value): `--good` good reloads of Unicorn (the cost:
how long `systemctl reload` takes, the worst latency in a reload window, failed
requests), then `--bad` reloads of each of the issue's breaking releases (what is
caught, and when `systemctl reload` returns): Unicorn workers whose requests take
3 s from 1 s after they began serving, and Gunicorn (preload off) workers whose
requests take 3 s from 0.3 s after their boot. A release caught returns non-zero
with "during probation" in its reason.
Debian's Python (/usr/bin/python3): it sees python3-systemd and python3-psutil.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from support.load import Load  # noqa: E402
from support.stall import make_stall  # noqa: E402
from readiness import deployed, med, print_table, run_columns  # noqa: E402 (bench/readiness.py)

BREAKING = {"unicorn, 1 s after ready": ("unicorn", 1.0), "gunicorn, 0.3 s after boot": ("gunicorn", 0.3)}


def good_reloads(base: str, probation: float, reloads: int, clients: int) -> dict:
    out = {"return_ms": [], "worst_ms": [], "ok": 0, "failed": 0}
    with deployed(base, server="unicorn", preload=False, shim_args=f"--probation {probation:g}") as (manager, d):
        d.start()
        with Load(d.port, clients=clients) as load:
            time.sleep(0.5)
            for _ in range(reloads):
                d.app.release()
                t0 = time.monotonic()
                r = d.reload()
                t1 = time.monotonic()
                out["ok"] += r.returncode == 0
                out["return_ms"].append((t1 - t0) * 1000)
                time.sleep(0.5)
                out["worst_ms"].append(max((x.latency for x in load.results if t0 <= x.start <= t1 + 0.2),
                                           default=0) * 1000)
            out["failed"] = len(load.failures())
    return out


def bad_reloads(base: str, probation: float, server: str, after: float, reloads: int, clients: int) -> dict:
    out = {"caught": 0, "return_ms": []}
    with deployed(base, server=server, preload=False, shim_args=f"--probation {probation:g}") as (manager, d):
        d.start()
        with Load(d.port, clients=clients):
            time.sleep(0.5)
            for _ in range(reloads):
                d.app.release()
                make_stall(os.path.realpath(d.app.current), after)
                t0 = time.monotonic()
                r = d.reload()
                out["return_ms"].append((time.monotonic() - t0) * 1000)
                failed = manager.events("reload-failed")
                out["caught"] += r.returncode != 0 and "during probation" in failed[-1]["REASON"]
                if r.returncode == 0:        # it went through: the next reload starts from a good one
                    d.app.release()
                    d.reload()
                time.sleep(0.5)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", default="0,2,3,5,8")
    parser.add_argument("--good", type=int, default=6)
    parser.add_argument("--bad", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    values = [float(v) for v in args.values.split(",")]

    def column(base: str, value: float) -> dict:
        col = {"good": good_reloads(base, value, args.good, args.clients)}
        for name, (server, after) in BREAKING.items():
            col[name] = bad_reloads(base, value, server, after, args.bad, args.clients)
        return col
    results = run_columns({f"--probation {v:g}": v for v in values}, column)
    rows = [
        ("good reload: systemctl reload returns (median / max ms)",
         lambda c: f"{med(c['good']['return_ms'])} / {max(c['good']['return_ms'], default=0):.0f}"),
        ("good reload: worst latency in a reload window (median / max ms)",
         lambda c: f"{med(c['good']['worst_ms'])} / {max(c['good']['worst_ms'], default=0):.0f}"),
        ("good reload: rc 0, failed requests",
         lambda c: f"{c['good']['ok']}/{args.good}, {c['good']['failed']}"),
    ]
    for name in BREAKING:
        rows.append((f"{name}: caught in probation", lambda c, n=name: f"{c[n]['caught']}/{args.bad}"))
        rows.append((f"{name}: systemctl reload returns (median / max ms)",
                     lambda c, n=name: f"{med(c[n]['return_ms'])} / {max(c[n]['return_ms'], default=0):.0f}"))
    print_table(rows, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
