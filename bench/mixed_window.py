#!/usr/bin/python3
"""Benchmark (not a test): how many responses a mixed release gives (the new release's
code with the old release's gems) before the shim refuses it, this tree beside
another commit's shim, in one run, same load.

    sudo bench/mixed_window.py [--reloads 10] [--clients 4] --compare REV

The classic Unicorn config (tests/support/classic.py) with Bundler, `--upgrade usr2`
and no `before_exec` BUNDLE_GEMFILE reset, so that every new master runs with the
first release's Gemfile; `--hook` keeps the guides' before_fork hook that QUITs
the .oldbin master (then a late refusal leaves the mixed master serving). Each
release answers `release=rN ... gemfile=PATH`; a mixed response is one of the
release being refused. Each setup gets its own private systemd manager, the two
take turns, each deploy reloads once; prints, per setup, the median and maximum
of mixed responses per reload, the reload's own time, and what served at the end.
Debian's Python (/usr/bin/python3): it sees python3-systemd and python3-psutil.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from support.classic import ClassicDeployment  # noqa: E402
from support.load import Load, get  # noqa: E402
from support.systemd import UserManager  # noqa: E402


def shim_of(rev: str, into: str) -> str:
    """bin/ and shim/ of commit `rev`, unpacked under `into`."""
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "bin", "shim"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


class Setup:
    def __init__(self, name: str, tree: str, base: str, hook: bool) -> None:
        self.name, self.counts, self.seconds = name, [], []
        self.manager = UserManager(tempfile.mkdtemp(dir=base))
        self.d = ClassicDeployment(self.manager, shim_args="--upgrade usr2", before_exec=False, quit_oldbin=hook)
        if tree != REPO:       # the deployment copied this tree's shim: that commit's instead
            opt = os.path.join(self.d.root, "opt", "unicorn-shim")
            for part in ("bin", "shim"):
                shutil.rmtree(os.path.join(opt, part))
                shutil.copytree(os.path.join(tree, part), os.path.join(opt, part))
        self.d.start()

    def deploy(self, load: Load) -> None:
        new = self.d.release()
        t0 = time.monotonic()
        r = self.d.reload()
        self.seconds.append(time.monotonic() - t0)
        assert r.returncode != 0, f"{self.name}: a pinned release deployed"
        time.sleep(1.0)          # what answers after the refusal counts too
        with load._lock:
            self.counts.append(sum(1 for x in load.results if x.release == new))

    def close(self) -> str:
        served = get(self.d.port, timeout=5).body.strip()
        status = self.d.state()["StatusText"]
        self.d.stop()
        self.manager.down()
        return f"serving at the end: {served}\n    StatusText: {status[:160]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--compare", metavar="REV", required=True, help="the other commit's shim")
    parser.add_argument("--hook", action="store_true", help="keep the before_fork hook that QUITs .oldbin")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="mixed-bench.")
    try:
        setups = [Setup("this tree", REPO, base, args.hook),
                  Setup(args.compare, shim_of(args.compare, tempfile.mkdtemp(dir=base)), base, args.hook)]
        loads = [Load(s.d.port, clients=args.clients).__enter__() for s in setups]
        for i in range(args.reloads):
            for s, load in (zip(setups, loads) if i % 2 == 0 else reversed(list(zip(setups, loads)))):
                s.deploy(load)
        for load in loads:
            load.stop()
        hook = "QUIT .oldbin" if args.hook else "none"
        print(f"{args.reloads} pinned deploys each, {args.clients} clients, hook={hook}")
        medians = {}
        for s, load in zip(setups, loads):
            medians[s.name] = statistics.median(s.counts)
            print(f"  {s.name:>12}: mixed responses per reload median {statistics.median(s.counts):g}, max "
                  f"{max(s.counts)}, total {sum(s.counts)} of {load.ok_count()}; failed requests "
                  f"{len(load.failures())}; reload returned in median {statistics.median(s.seconds):.2f} s")
            print("    " + s.close())
        print(f"  mixed per reload, {args.compare} / this tree (medians): "
              f"{medians[args.compare]:g} / {medians['this tree']:g}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
