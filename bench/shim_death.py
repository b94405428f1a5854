#!/usr/bin/python3
"""The shim's death (a benchmark, not a test): what the watcher costs, and how long
after a `kill -9` of the shim supervision is back, against the remedy without it.

    sudo bench/shim_death.py [--rounds 5] [--server unicorn|gunicorn|puma]

One app behind a .socket unit under load. Prints the watcher's processes, RSS and
PSS beside the shim's; then, each round: kill -9 the shim, time until STATUS says
a new shim adopted the master and until a reload (a new release) succeeds, failed
requests; against: kill -9 the shim, `systemctl restart` (what an operator had to
do before), time until the restart returns and the unit is active, failed requests.
Medians. Debian's Python (/usr/bin/python3).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from support.deploy import NO_PROBATION, Deployment  # noqa: E402
from support.load import Load  # noqa: E402
from support.systemd import UserManager, eventually, is_shim, proc_cmdline, proc_parent  # noqa: E402


def memory(pid: int) -> tuple:
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    with open(f"/proc/{pid}/smaps_rollup") as f:
        rollup = dict(line.split(":", 1) for line in f.readlines()[1:])
    return int(status["VmRSS"].split()[0]), int(rollup["Pss"].split()[0])


def shim_of(d: Deployment, manager: UserManager) -> int:
    with open(os.path.join(manager.runtime_dir, "app", "shim.pid")) as f:
        return int(f.read().split()[0])


def kill_shim(d: Deployment, manager: UserManager) -> tuple:
    """kill -9 the shim; (its pid, when) once STATUS names its death."""
    shim = shim_of(d, manager)
    t0 = time.monotonic()
    os.kill(shim, signal.SIGKILL)
    eventually(d.state, lambda st: f"(pid {shim}) died" in st["StatusText"], timeout=30, interval=0.01)
    return shim, t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server", default="unicorn", choices=["unicorn", "gunicorn", "puma"])
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="death.")
    manager = UserManager(base)
    d = Deployment(manager, base, server=args.server, probation=NO_PROBATION)
    said_s, adopt_s, reload_s, restart_s, failed = [], [], [], [], {"adopt": 0, "restart": 0}
    try:
        d.start()
        shim = shim_of(d, manager)
        watchers = [p for p in manager.unit_processes() if proc_parent(p) == shim and "shim-watcher" in proc_cmdline(p)]
        print(f"watcher processes per shim: {len(watchers)}")
        for name, pid in (("shim", shim), ("watcher", watchers[0])):
            rss, pss = memory(pid)
            print(f"{name:8} RSS {rss} KiB  PSS {pss} KiB")
        with Load(d.port, clients=4, max_seconds=3600) as load:
            for _ in range(args.rounds):
                before = len(load.failures())
                shim, t0 = kill_shim(d, manager)
                said_s.append(time.monotonic() - t0)
                eventually(d.state, lambda st: f"(adopted after the shim (pid {shim}) died)" in st["StatusText"],
                           timeout=30, interval=0.01)
                adopt_s.append(time.monotonic() - t0)
                d.app.release()
                assert d.reload().returncode == 0
                reload_s.append(time.monotonic() - t0)
                failed["adopt"] += len(load.failures()) - before
            for _ in range(args.rounds):
                time.sleep(2.5)     # StartLimitBurst=5 in 10 s: the manager would refuse a start
                before = len(load.failures())
                shim, t0 = kill_shim(d, manager)
                r = manager.systemctl("restart", "app.service")
                assert r.returncode == 0, r.stderr + manager.journal_text()[-4000:]
                manager.wait_for("app.service", ActiveState="active")
                eventually(lambda: shim_of(d, manager), lambda pid: pid != shim and is_shim(pid))
                restart_s.append(time.monotonic() - t0)
                failed["restart"] += len(load.failures()) - before
            ok = load.ok_count()
    finally:
        d.stop()
        manager.down()
    print(f"{args.rounds} rounds, {args.server}, {ok} requests served in all")
    print(f"kill -9 -> STATUS names the death:   median {statistics.median(said_s) * 1000:.0f} ms")
    print(f"kill -9 -> STATUS says adopted:      median {statistics.median(adopt_s) * 1000:.0f} ms")
    print(f"kill -9 -> a reload succeeded:       median {statistics.median(reload_s) * 1000:.0f} ms; "
          f"failed requests {failed['adopt']}")
    print(f"kill -9 -> systemctl restart done:   median {statistics.median(restart_s) * 1000:.0f} ms; "
          f"failed requests {failed['restart']}")


if __name__ == "__main__":
    main()
