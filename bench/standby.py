#!/usr/bin/python3
"""Benchmark (not a test): what it takes Gunicorn's and Puma's old generation to stand
by during a probation other than serving on beside the new one, and to come back.

    sudo bench/standby.py [--workers 4] [--rounds 3]

Per server and preload setting, under its own private real systemd with load running:
`current` is flipped to the next release (as a deploy does before its reload), the
old master gets TTOU until it keeps one worker (neither server goes below one:
Gunicorn's WINCH acts only when it daemonized itself), then TTIN back, one at a time,
each waited for. Rows: workers left by TTOU (the old release's share of the public
requests during the window), how long the comeback takes until every worker is back
and answers, which releases answer afterwards (by response body: a re-spawned worker
must load the OLD release's code although `current` names the new one), failed
requests. Serving on beside costs no comeback and leaves every old worker serving.
Debian's Python (/usr/bin/python3): it sees python3-systemd and python3-psutil.
"""
from __future__ import annotations

import argparse
import http.client
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from support.load import Load  # noqa: E402
from support.systemd import eventually  # noqa: E402
from readiness import deployed, med, print_table, run_columns  # noqa: E402 (bench/readiness.py)

COLUMNS = {"gunicorn, preload off": ("gunicorn", False), "gunicorn, preload on": ("gunicorn", True),
           "puma, preload off": ("puma", False), "puma, preload on": ("puma", True)}


def answer(port: int) -> tuple:
    """(pid, release) of the worker that answered GET /."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        words = dict(w.split("=", 1) for w in conn.getresponse().read().decode().split() if "=" in w)
        return words.get("pid"), words.get("release")
    finally:
        conn.close()


def column(base: str, server: str, preload: bool, workers: int, rounds: int) -> dict:
    out = {"left": [], "back_ms": [], "releases": set(), "failed": 0}
    with deployed(base, server=server, preload=preload, workers=workers,
                  shim_args="--probation 0") as (manager, d):
        d.start()
        old = d.assert_main_pid_is_live_master()
        with Load(d.port, clients=4) as load:
            time.sleep(0.5)
            d.app.release()          # `current` now names r2; the old master serves r1
            for _ in range(rounds):
                for _n in range(workers - 1):
                    before = len(d.app_workers(old))
                    os.kill(old, signal.SIGTTOU)
                    eventually(lambda: len(d.app_workers(old)), lambda n, b=before: n < b, timeout=30,
                               interval=0.01)
                time.sleep(0.3)
                out["left"].append(len(d.app_workers(old)))
                t0 = time.monotonic()
                for n in range(out["left"][-1] + 1, workers + 1):
                    os.kill(old, signal.SIGTTIN)
                    eventually(lambda: len(d.app_workers(old)), lambda got, n=n: got >= n, timeout=30,
                               interval=0.01)
                # back: every worker answers (each answer names the release and the pid that served it)
                seen: dict = {}
                eventually(lambda: seen.update([answer(d.port)]) or seen, lambda got: len(got) >= workers,
                           timeout=30, interval=0)
                out["back_ms"].append((time.monotonic() - t0) * 1000)
                out["releases"] |= set(seen.values())
            out["failed"] = len(load.failures())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = run_columns(COLUMNS, lambda base, column_of: column(base, *column_of, args.workers, args.rounds))
    rows = [
        ("workers left by TTOU", lambda r: f"{min(r['left'])}-{max(r['left'])} of {args.workers}"),
        ("comeback: TTIN until every worker answers (median / max ms)",
         lambda r: f"{med(r['back_ms'])} / {max(r['back_ms']):.0f}"),
        ("releases answering after the comeback", lambda r: ", ".join(sorted(r["releases"]))),
        ("failed requests", lambda r: str(r["failed"])),
    ]
    print_table(rows, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
