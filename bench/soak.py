#!/usr/bin/python3
"""Soak (a benchmark, not a test): many reloads under load against one shim.

    sudo bench/soak.py [--reloads 500] [--clients 4] [--server unicorn|gunicorn]

Prints failed requests and the shim's own resources (PSS, RSS, open fds,
threads, whether psutil is loaded) at the start and every --every reloads, and
what is left in the unit's cgroup at the end (zombies, strays). Debian's
Python (/usr/bin/python3). Targets: <= 8 MiB PSS and <= 15 MiB RSS after
500 reloads, and psutil never loaded (the kernel lists children in /proc).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from support.deploy import NO_PROBATION, Deployment  # noqa: E402
from support.load import Load  # noqa: E402
from support.systemd import UserManager, is_shim, proc_cmdline, proc_parent  # noqa: E402


def resources(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    with open(f"/proc/{pid}/smaps_rollup") as f:
        rollup = dict(line.split(":", 1) for line in f.readlines()[1:])    # after the range line
    with open(f"/proc/{pid}/maps") as f:
        psutil = "psutil" in f.read()
    return {"rss_kb": int(status["VmRSS"].split()[0]), "pss_kb": int(rollup["Pss"].split()[0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(status["Threads"]),
            "psutil": "yes" if psutil else "no"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reloads", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--server", default="unicorn", choices=["unicorn", "gunicorn"])
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="soak.")   # not "unicorn-shim": master_pids() skips that name
    manager = UserManager(base)
    d = Deployment(manager, base, server=args.server, probation=NO_PROBATION)
    failed_reloads = 0
    try:
        d.start()
        shim = next(p for p in manager.unit_processes() if is_shim(p))
        rows = [(0, resources(shim))]
        t0 = time.monotonic()
        with Load(d.port, clients=args.clients, max_seconds=7200) as load:
            for i in range(1, args.reloads + 1):
                d.app.release()
                if d.reload().returncode != 0:
                    failed_reloads += 1
                if i % args.every == 0:
                    rows.append((i, resources(shim)))
        took = time.monotonic() - t0
        masters = d.master_pids()
        watchers = [p for p in manager.unit_processes() if proc_parent(p) == shim
                    and "shim-watcher" in proc_cmdline(p)]       # shim/runtime/adopt.py
        leftovers = [p for p in manager.unit_processes() if p != shim and p not in masters + watchers
                     and p not in d.app_workers(masters[0])]
        zombies = [p for p in manager.unit_processes() if open(f"/proc/{p}/stat").read().split(") ")[1][0] == "Z"]
        print(f"\n{args.reloads} reloads of {args.server} in {took:.0f} s under {args.clients} clients: "
              f"{load.ok_count()} requests ok, {len(load.failures())} failed {dict(load.failure_kinds())}, "
              f"{failed_reloads} reloads failed\n")
        print("| after reloads | shim PSS (KiB) | shim RSS (KiB) | open fds | threads | psutil loaded |")
        print("|---|---|---|---|---|---|")
        for n, r in rows:
            print(f"| {n} | {r['pss_kb']} | {r['rss_kb']} | {r['fds']} | {r['threads']} | {r['psutil']} |")
        print(f"\nmasters at the end: {len(masters)}; the shim's watchers: {len(watchers)}; other processes "
              f"besides the shim, its watcher, the master and its workers: {len(leftovers)}; zombies: {len(zombies)}")
    finally:
        d.stop()
        manager.down()


if __name__ == "__main__":
    main()
