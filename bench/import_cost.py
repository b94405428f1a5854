#!/usr/bin/python3
"""Benchmark (not a test): what each dependency costs a shim process.

    bench/import_cost.py [--runs 15]

For each import (alone, on top of a bare interpreter) and for the shim's own
process profiles: the memory of an otherwise idle Python process that did it
(RSS, and Private = pages no other process shares, which PSS tends to once
many shims share the interpreter's own pages), and the CPU it takes from
process start to exit (median of --runs; a bare `python3 -c pass` is the first
row). Debian's Python (/usr/bin/python3), as the shim runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
PYTHON = "/usr/bin/python3"
RUN = ("import argparse; from systemd import _journal; from shim import cli, client, errors, options; "
       "from shim.runtime import control, handover, health, journal, loop, masters, notify, procs, readiness, "
       "release, servers, sockets, spawn, state, supervisor, upgrade; options.build_parser()")

CASES = [
    ("bare interpreter (`python3 -c pass`)", "pass"),
    ("asyncio (the shim's loop before; not loaded now)", "import asyncio"),
    ("asyncio without ssl (what `run` loaded before)", "import sys; sys.modules['ssl'] = None; import asyncio"),
    ("dataclasses (with inspect; not loaded now)", "import dataclasses"),
    ("typing (not loaded now)", "import typing"),
    ("shutil (argparse's help formatter asks it the width; not loaded now)", "import shutil"),
    ("psutil (loaded only on a kernel without /proc/PID/task/PID/children)", "import psutil"),
    ("systemd.journal (the wrapper; not loaded)", "from systemd import journal"),
    ("systemd._journal (sendv only, what the shim loads under journald)", "from systemd import _journal"),
    ("systemd.daemon (sd_notify)", "from systemd import daemon"),
    ("sdnotify", "import sdnotify"),
    ("argparse", "import argparse"),
    ("selectors (the shim's loop)", "import selectors"),
    ("json + socket (the client's needs)", "import json, socket"),
    ("`unicorn-shim reload`'s imports", "from shim import cli, client"),
    ("`unicorn-shim run`'s imports (and its parser built)", RUN),
]


def memory(code: str) -> dict:
    p = subprocess.Popen([PYTHON, "-c", code + "\nimport sys, time\nprint(flush=True)\ntime.sleep(60)"],
                         stdout=subprocess.PIPE, cwd=REPO)
    try:
        p.stdout.readline()
        out = {"Rss": 0.0, "Private": 0.0}
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "Rss":
                    out["Rss"] = int(value.split()[0]) / 1024
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["Private"] += int(value.split()[0]) / 1024
        return out
    finally:
        p.kill()
        p.wait()


def cpu_ms(code: str, runs: int) -> float:
    samples = []
    for _ in range(runs):
        pid = os.posix_spawn(PYTHON, [PYTHON, "-c", code], os.environ)
        _, _, usage = os.wait4(pid, 0)
        samples.append(usage.ru_utime + usage.ru_stime)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = REPO
    subprocess.run([PYTHON, "-m", "compileall", "-q", os.path.join(REPO, "shim")], check=True,
                   capture_output=True)
    rows = []
    for label, code in CASES:
        mem = memory(code)
        rows.append((label, mem["Rss"], mem["Private"], cpu_ms(code, args.runs)))
    base = rows[0]
    width = max(len(r[0]) for r in rows)
    print(f"| {'import'.ljust(width)} | RSS MiB | +RSS | Private MiB | +Private | CPU ms | +CPU |")
    print(f"|{'-' * (width + 2)}|---------|------|-------------|----------|--------|------|")
    for label, rss, private, cpu in rows:
        print(f"| {label.ljust(width)} | {rss:7.1f} | {rss - base[1]:4.1f} | {private:11.1f} | "
              f"{private - base[2]:8.1f} | {cpu:6.1f} | {cpu - base[3]:4.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
