#!/usr/bin/python3
"""Benchmark (not a test): a deploy sequence under load against the shim and
against a .socket unit + `systemctl restart`, side by side in one run, each
under its own private real systemd, with real Unicorn, Gunicorn and Puma
(and Puma's own systemd integration: phased restart on USR1, hot restart on USR2).

    sudo bench/reload.py [--reloads 20] [--clients 4] [--interval 1.0] [--setups a,b,...]
    sudo bench/reload.py --setups "puma shim,puma phased (own),puma hot (own)"

After the good deploys, one bad one (the app raises at load): the reload's exit
status and time, the requests that failed from then until --after-bad seconds
after it returned, and the unit's state at the end.

Prints a table: failed requests by kind, latency (p50/p99/max) in steady state
and during reload windows, time from the reload command to the first response
of the new release, time for the command to return, the shim's own overhead
(reload time minus the server's own boot and the old master's drain), and how
long the old master outlives the last request it was serving.
Debian's Python (/usr/bin/python3): it sees python3-systemd and python3-psutil.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from support.deploy import NO_PROBATION, Deployment  # noqa: E402
from support.load import Load, get  # noqa: E402
from support.systemd import UserManager  # noqa: E402

SETUPS = {
    "shim": dict(command="reload", kw={}),
    "shim+seed-hook": dict(command="reload", kw={"seed_hook": True}),
    "socket+restart": dict(command="restart", kw={"plain": True, "ready_hook": False}),
    "gunicorn shim": dict(command="reload", kw={"server": "gunicorn"}),
    "gunicorn socket+restart": dict(command="restart", kw={"server": "gunicorn", "plain": True,
                                                           "ready_hook": False}),
    "puma shim": dict(command="reload", kw={"server": "puma"}),
    # Puma's phased restart needs the app loaded in each worker (no preload_app!).
    "puma phased (own)": dict(command="reload", kw={"server": "puma", "puma_native": "phased",
                                                    "preload": False, "ready_hook": False,
                                                    "queue_requests": True}),
    "puma hot (own)": dict(command="reload", kw={"server": "puma", "puma_native": "hot",
                                                 "ready_hook": False, "queue_requests": True}),
}


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ms(x):
    return f"{x * 1000:.0f}" if x == x else "-"


def run_setup(name, spec, args, base):
    manager = UserManager(base)
    d = Deployment(manager, tempfile.mkdtemp(dir=base), probation=NO_PROBATION, **spec["kw"])
    out = {"name": name, "reload_s": [], "first_new_s": [], "window_lat": [], "retire_after_last_req_s": []}
    try:
        d.start()
        with Load(d.port, clients=args.clients) as load:
            time.sleep(args.steady)
            t_steady_end = time.monotonic()
            windows = []
            for i in range(args.reloads):
                release = d.app.release()
                slow = {}
                probe = None
                if i < args.slow_probes and spec["command"] == "reload":
                    probe = threading.Thread(target=lambda: slow.update(
                        r=get(d.port, "/slow?s=1", timeout=10), end=time.time()))
                    probe.start()
                    time.sleep(0.2)
                t0 = time.monotonic()
                r = manager.systemctl(spec["command"], "app.service")
                t1 = time.monotonic()
                if r.returncode != 0:
                    print(f"{name}: {spec['command']} {i} failed: {r.stderr.strip()}", file=sys.stderr)
                if not probe:   # a deploy with a slow request in flight waits for it, by design
                    out["reload_s"].append(t1 - t0)
                windows.append((t0, t1 + 0.2, release))
                if probe:
                    probe.join()
                    retired = manager.events("retired")
                    if retired and slow.get("r") and not slow["r"].error:
                        out["retire_after_last_req_s"].append(
                            int(retired[-1]["__REALTIME_TIMESTAMP"]) / 1e6 - slow["end"])
                time.sleep(args.interval)
            t_good_end = time.monotonic()
            if args.bad:
                bad_deploy(d, manager, spec, args, out)
        results = list(load.results)
        good = [r for r in results if r.start < t_good_end]
        out["steady_lat"] = [r.latency for r in results if r.start < t_steady_end and not r.error]
        out["target"] = 2 * pct(out["steady_lat"], 99) + 0.05
        previous = "r1"
        for t0, t1, release in windows:
            new = [r.start + r.latency for r in good if r.release == release and r.start >= t0]
            # A signal returns at once while the server switches over afterwards: the
            # window lasts until the new release answers and the old one stops answering.
            old_last = max((r.start for r in good if r.release == previous and r.start >= t0), default=t1)
            end = max(t1, min(new, default=t1), old_last) + 0.2
            out["window_lat"] += [r.latency for r in good if t0 <= r.start <= end and not r.error]
            if new:
                out["first_new_s"].append(min(new) - t0)
                previous = release
        out["ok"] = sum(1 for r in good if not r.error)
        out["failed"] = Counter(r.error.split(":")[0] for r in good if r.error)
        if args.bad:
            bad_end = out["bad_t0"] + out["bad_s"] + args.after_bad
            out["bad_failed"] = sum(1 for r in results if r.error and out["bad_t0"] <= r.start <= bad_end)
        done = manager.events("reload-done")
        out["overhead_ms"] = [int(e["SHIM_OVERHEAD_MS"]) for e in done if "SHIM_OVERHEAD_MS" in e]
        out["took_effect"] = sum(1 for _t0, _t1, rel in windows
                                 if any(r.release == rel for r in results))
    finally:
        d.stop()
        manager.down()
    return out


def bad_deploy(d, manager, spec, args, out):
    """A release that raises at load: what the reload says, how long it takes, and
    what serves afterwards."""
    last_good = f"r{d.app.count}"
    d.app.release(broken=True)
    t0 = time.monotonic()
    try:
        rc = manager.systemctl(spec["command"], "app.service", timeout=args.bad_timeout).returncode
    except subprocess.TimeoutExpired:
        rc = f"none in {args.bad_timeout:g} s"
    out["bad_t0"], out["bad_s"], out["bad_rc"] = t0, time.monotonic() - t0, rc
    time.sleep(args.after_bad)
    st = d.state()
    out["bad_state"] = f"{st['ActiveState']}/{st['SubState']}"
    answer = get(d.port, timeout=2).release
    out["bad_serves"] = "old release" if answer == last_good else (answer or "nothing")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between deploys")
    parser.add_argument("--steady", type=float, default=3.0, help="seconds of steady state first")
    parser.add_argument("--slow-probes", type=int, default=3,
                        help="deploys with a 1 s request in flight (old master's retirement)")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--no-bad", dest="bad", action="store_false", help="skip the bad deploy at the end")
    parser.add_argument("--after-bad", type=float, default=5.0,
                        help="seconds of load after the bad deploy's command returned")
    parser.add_argument("--bad-timeout", type=float, default=120.0)
    args = parser.parse_args()
    # The load generator keeps a million results: the cyclic GC's full passes over
    # them would stall the clients for hundreds of ms and be counted as server latency.
    gc.disable()
    base = tempfile.mkdtemp(prefix="unicorn-shim-bench.")
    try:
        rows = [run_setup(n, SETUPS[n], args, base) for n in args.setups.split(",")]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.reloads} deploys, {args.clients} clients, {args.interval:g} s apart "
          f"(medians; latencies in ms)\n")
    cols = [r["name"] for r in rows]
    lines = [
        ("requests ok", lambda r: str(r["ok"])),
        ("failed requests", lambda r: (", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "0")),
        ("deploys that took effect", lambda r: f"{r['took_effect']}/{args.reloads}"),
        ("steady p50 / p99 / max", lambda r: " / ".join(ms(pct(r["steady_lat"], p)) for p in (50, 99, 100))),
        ("reload window p50 / p99 / max", lambda r: " / ".join(ms(pct(r["window_lat"], p))
                                                                for p in (50, 99, 100))),
        ("reload-window requests over 2×p99+50 ms", lambda r: str(sum(
            1 for x in r["window_lat"] if x > r["target"]))),
        ("command returns after", lambda r: ms(statistics.median(r["reload_s"])) if r["reload_s"] else "-"),
        ("first response of new release", lambda r: ms(statistics.median(r["first_new_s"]))
         if r["first_new_s"] else "-"),
        ("shim overhead per reload (median / max)", lambda r: f"{statistics.median(r['overhead_ms']):.0f} / "
         f"{max(r['overhead_ms'])}" if r["overhead_ms"] else "-"),
        ("old master exits after its last request", lambda r: ms(statistics.median(r["retire_after_last_req_s"]))
         if r["retire_after_last_req_s"] else "-"),
    ]
    if args.bad:
        lines += [
            ("bad deploy: command exit status, time", lambda r: f"{r['bad_rc']}, {ms(r['bad_s'])}"),
            (f"bad deploy: failed requests (+{args.after_bad:g} s)", lambda r: str(r["bad_failed"])),
            ("bad deploy: then serving, unit state", lambda r: f"{r['bad_serves']}, {r['bad_state']}"),
        ]
    width = max(len(c) for c in cols + ["x" * 14]) + 2
    print("| " + " | ".join(["measure".ljust(40)] + [c.ljust(width) for c in cols]) + " |")
    print("|" + "|".join(["-" * 42] + ["-" * (width + 2) for _ in cols]) + "|")
    for label, fn in lines:
        print("| " + " | ".join([label.ljust(40)] + [fn(r).ljust(width) for r in rows]) + " |")


if __name__ == "__main__":
    main()
