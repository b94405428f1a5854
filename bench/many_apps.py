#!/usr/bin/python3
"""Benchmark (not a test): many apps on one host, reloaded at once and one by one.

    sudo bench/many_apps.py [--apps 20] [--rounds 3] [--compare REV]

N Unicorn apps (2 workers each) run through the packaged templates
(units/unicorn-shim@.service and .socket, with the drop-ins the generator
writes from each app's conf) under one private real systemd user manager, each
app under load from one client. Each round gives every app a new release and
reloads all of them in parallel (`systemctl --user reload` at once); then one
round reloads them in sequence. Reported, per setup:

  failed requests, deploys that took effect, and the time from `systemctl
  reload` to the manager's "Reloading" line (its reload job begins: the floor),
  to the shim's `signal` event (when ExecReload= signals it), to its
  reload-start (journal), to its reload-done, and to the command's return; the
  shim's CPU per reload, PSS/RSS per idle shim, idle wakeups per second; the CPU
  of one `unicorn-shim reload` and `status` call, and of one reload's
  ExecReload= lines as the template has them.

--compare REV runs the same on the shim of git revision REV (its `run`, its
client and its template's ExecReload= lines, from `git archive`) side by side: both hosts are up at once, each
under its own manager, and every step runs on one and then the other, in turns,
so that a shared machine's changing load falls on both. Debian's Python
(/usr/bin/python3).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from shim.tooling.generator import dropins, parse_conf  # noqa: E402
from support.apps import App, free_port  # noqa: E402
from support.load import Load, get  # noqa: E402
from support.systemd import UserManager, is_shim, proc_cmdline  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
# What the bench's manager changes in the packaged template: the shim from a checkout
# (in the template's own ExecReload= lines), and no /etc/unicorn-shim/APP.conf on this
# host (the conf is turned into drop-ins here).
BENCH_DROPIN = """[Unit]
ConditionPathExists=
[Service]
ExecReload=
{reload_lines}"""


# Starts the `systemctl reload`s and times them from a process of its own: in the
# bench's, the load's client threads hold the GIL, and a reload thread waited for it
# (hundreds of ms with 20 apps) between its timestamp and its systemctl.
RELOADER = """
import json, os, sys, time
quiet = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
running = {}
for unit in sys.argv[1:]:
    t0 = time.time()
    running[os.posix_spawnp("systemctl", ["systemctl", "--user", "reload", unit], os.environ,
                            file_actions=quiet)] = (unit, t0)
out = {}
while running:
    pid, status = os.wait()
    unit, t0 = running.pop(pid)
    out[unit] = (t0, time.time(), os.waitstatus_to_exitcode(status))
json.dump(out, sys.stdout)
"""


def reload_lines(template: str, shim_command: str) -> str:
    """The template's ExecReload= lines, running the shim of the tree under test."""
    with open(template) as f:
        return "".join(line.replace("/usr/bin/unicorn-shim", shim_command)
                       for line in f if line.startswith("ExecReload="))


def shim_tree(rev: str, base: str) -> str:
    """The checkout (rev "") or `git archive REV` of it, with its bytecode compiled,
    as an installed package has it."""
    if not rev:
        root = REPO
    else:
        root = tempfile.mkdtemp(dir=base, prefix="rev.")
        archive = subprocess.run(["git", "-C", REPO, "archive", rev, "shim", "bin", "units"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(root, "shim")], check=True,
                   capture_output=True)
    return root


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wakeups(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])


def memory(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key] = int(value.split()[0]) / 1024
    return out


class Host:
    """N apps through the templated units under one private user manager."""

    def __init__(self, base: str, tree: str, apps: int) -> None:
        self.m = UserManager(base)
        self.tree = tree
        self.root = tempfile.mkdtemp(dir=base, prefix="apps.")
        self.names = [f"app{i:02d}" for i in range(1, apps + 1)]
        self.apps = {}
        self.ports = {}
        units = self.m.unit_dir
        for template in ("unicorn-shim@.service", "unicorn-shim@.socket"):
            shutil.copy(os.path.join(tree, "units", template), units)
        shim = os.path.join(tree, "bin", "unicorn-shim")
        self.reload_lines = reload_lines(os.path.join(tree, "units", "unicorn-shim@.service"),
                                         f"{sys.executable} {shim}")
        for name in self.names:
            runtime = os.path.join(self.m.runtime_dir, "unicorn-shim", name)
            app = App(os.path.join(self.root, name), os.path.join(runtime, "server.pid"))
            self.apps[name], self.ports[name] = app, free_port()
            conf = parse_conf(f"APP_DIR={app.current}\nSERVER_COMMAND={app.command()}\n"
                              f"LISTEN=127.0.0.1:{self.ports[name]}\nUSER=root\n"
                              f"PID_FILE={app.pid_file}\n")
            for rel, text in dropins(name, conf).items():
                text = text.replace("/usr/bin/unicorn-shim", f"{sys.executable} {shim}")
                self._write(os.path.join(units, rel), text)
            self._write(os.path.join(units, f"unicorn-shim@{name}.service.d", "90-bench.conf"),
                        BENCH_DROPIN.format(reload_lines=self.reload_lines))
            self._write(os.path.join(units, f"unicorn-shim@{name}.socket.d", "90-bench.conf"),
                        "[Unit]\nConditionPathExists=\n")
            app.release()
        self.m.systemctl("daemon-reload")

    @staticmethod
    def _write(path: str, text: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def start(self) -> None:
        sockets = [f"unicorn-shim@{n}.socket" for n in self.names]
        r = self.m.systemctl("start", *sockets)
        assert r.returncode == 0, r.stderr
        for name in self.names:
            st = self.m.wait_for(f"unicorn-shim@{name}.service", timeout=180, ActiveState="active")
            assert st["ActiveState"] == "active", (name, st, self.m.journal_text(f"unicorn-shim@{name}.service"))
        self.shims = {n: self.shim_pid(n) for n in self.names}

    def shim_pid(self, name: str) -> int:
        return next(p for p in self.m.unit_processes(f"unicorn-shim@{name}.service")
                    if is_shim(p) and " run " in proc_cmdline(p))

    def control(self, name: str) -> str:
        return os.path.join(self.m.runtime_dir, "unicorn-shim", name, "control.sock")

    def reload(self, names: list) -> dict:
        """`systemctl reload` of these apps at once: {app: (start, return, exit status)}."""
        out = subprocess.run([sys.executable, "-c", RELOADER, *[f"unicorn-shim@{n}.service" for n in names]],
                             env=self.m.env, check=True, capture_output=True, text=True).stdout
        return {unit.partition("@")[2].rpartition(".")[0]: tuple(times) for unit, times in json.loads(out).items()}

    def down(self) -> None:
        self.m.systemctl("stop", *[f"unicorn-shim@{n}.socket" for n in self.names],
                         *[f"unicorn-shim@{n}.service" for n in self.names])
        self.m.down()


def idle(host: Host, seconds: float) -> dict:
    before = {n: (cpu_ticks(p), wakeups(p)) for n, p in host.shims.items()}
    time.sleep(seconds)
    after = {n: (cpu_ticks(p), wakeups(p)) for n, p in host.shims.items()}
    mem = [memory(p) for p in host.shims.values()]
    return {"cpu_ms": sum(after[n][0] - before[n][0] for n in before) * 1000 / TICKS,
            "wakeups_per_s": sum(after[n][1] - before[n][1] for n in before) / seconds / len(before),
            "pss": statistics.median(m["Pss"] for m in mem), "rss": statistics.median(m["Rss"] for m in mem)}


def cpu_of(argv: list, env: "dict | os._Environ[str]") -> float:
    """CPU seconds (user+sys) of one process from its own rusage: a wait is not CPU."""
    pid = os.posix_spawn(argv[0], argv, env, file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    _, status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, argv
    return usage.ru_utime + usage.ru_stime


def client_cpu(host: Host, argv_tail: list, i: int) -> float:
    """CPU of one client call, ms, on the i-th app."""
    name = host.names[i % len(host.names)]
    if argv_tail[0] == "reload":
        host.apps[name].release()
    shim = [sys.executable, os.path.join(host.tree, "bin", "unicorn-shim")]
    return cpu_of([*shim, *argv_tail, "--control", host.control(name)], os.environ) * 1000


def exec_reload_cpu(host: Host, i: int) -> float:
    """CPU of one reload's ExecReload= lines on the i-th app, ms, each run as systemd
    would run it (specifiers and $$ resolved, RUNTIME_DIRECTORY set)."""
    name = host.names[i % len(host.names)]
    host.apps[name].release()
    env = dict(os.environ, RUNTIME_DIRECTORY=os.path.dirname(host.control(name)))
    lines = [line.partition("=")[2].lstrip("-").replace("%t", host.m.runtime_dir).replace("%i", name)
             for line in host.reload_lines.splitlines()]
    return sum(cpu_of(shlex.split(line.replace("$$", "$")), env) for line in lines) * 1000


# The manager's "Reloading UNIT..." line: it starts the reload job (ExecReload= follows).
UNIT_RELOADING = "MESSAGE_ID=d34d037fff1847e6ae669a370e694725"


def events(host: Host, match: str) -> dict:
    """{app: [wall times]} of one SHIM_EVENT, or of the manager's entries matching `match`."""
    out: dict = {}
    for e in host.m.journal(match if "=" in match else f"SHIM_EVENT={match}"):
        unit = e.get("USER_UNIT") or e.get("_SYSTEMD_USER_UNIT", "")
        name = unit.partition("@")[2].rpartition(".")[0]
        out.setdefault(name, []).append(int(e["__REALTIME_TIMESTAMP"]) / 1e6)
    return out


def first_within(times: list, start: float, end: float) -> "float | None":
    """One app's reloads never overlap (systemd runs one reload job per unit), so the
    event of a reload is the one between its command's start and return."""
    return next((t for t in sorted(times) if start <= t <= end), None)


class Setup:
    """One tree's host and what was measured on it."""

    def __init__(self, label: str, tree: str, args: argparse.Namespace, base: str) -> None:
        self.host = Host(base, tree, args.apps)
        self.res: dict = {"label": label, "rounds": []}
        self.generation = {n: 1 for n in self.host.names}
        self.took_effect = self.reloads = self.failed_reloads = 0

    def start(self) -> None:
        self.host.start()

    def start_load(self) -> None:
        self.loads = {n: Load(self.host.ports[n], clients=1, max_seconds=3600) for n in self.host.names}
        for load in self.loads.values():
            load.__enter__()
        self.cpu0 = {n: cpu_ticks(p) for n, p in self.host.shims.items()}

    def round(self, kind: str) -> None:
        host = self.host
        releases = {n: host.apps[n].release() for n in host.names}
        if kind == "parallel":
            done = host.reload(host.names)
        else:
            done = {n: host.reload([n])[n] for n in host.names}
        for n in host.names:
            self.generation[n] += 1
            self.reloads += 1
            self.failed_reloads += done[n][2] != 0
            self.took_effect += get(host.ports[n]).release == releases[n]
        self.res["rounds"].append((kind, {n: (self.generation[n], *done[n]) for n in host.names}))

    def stop_load(self, rounds: int) -> None:
        res = self.res
        res["shim_cpu_per_reload_ms"] = statistics.median(
            (cpu_ticks(p) - self.cpu0[n]) * 1000 / TICKS / rounds for n, p in self.host.shims.items())
        for load in self.loads.values():
            load.stop()
        res["requests_ok"] = sum(load.ok_count() for load in self.loads.values())
        res["requests_failed"] = sum(len(load.failures()) for load in self.loads.values())
        res["took_effect"] = f"{self.took_effect}/{self.reloads}"
        res["failed_reloads"] = self.failed_reloads

    def latencies(self) -> None:
        self.res["failures"] = [f"{e.get('_SYSTEMD_USER_UNIT')}: {e.get('REASON')}"
                                for e in self.host.m.journal("SHIM_EVENT=reload-failed")]
        starts, dones = events(self.host, "reload-start"), events(self.host, "reload-done")
        signals = events(self.host, "signal")      # a tree whose ExecReload= signals the shim
        jobs = events(self.host, UNIT_RELOADING)
        for kind in ("parallel", "sequence"):
            to_job, to_signal, to_start, to_done, to_return = [], [], [], [], []
            for k, per_app in self.res["rounds"]:
                if k != kind:
                    continue
                for n, (_gen, t0, t1, rc) in per_app.items():
                    job = first_within(jobs.get(n, []), t0, t1 + 1)
                    if job is not None:
                        to_job.append(job - t0)
                    signalled = first_within(signals.get(n, []), t0, t1 + 1)
                    if signalled is not None:
                        to_signal.append(signalled - t0)
                    started = first_within(starts.get(n, []), t0, t1 + 1)
                    if started is not None:
                        to_start.append(started - t0)
                    done = first_within(dones.get(n, []), t0, t1 + 1)
                    if done is not None and rc == 0:
                        to_done.append(done - t0)
                        to_return.append(t1 - t0)
            self.res[kind] = {"to_job": to_job, "to_signal": to_signal, "to_start": to_start, "to_done": to_done, "to_return": to_return}


def run(setups: list, args: argparse.Namespace) -> None:
    """Both setups up at once; each step runs on one, then the other (in turns, so
    that neither always goes first on a machine whose load changes)."""
    def each(step, i=0):
        for s in (setups if i % 2 == 0 else setups[::-1]):
            step(s)

    each(lambda s: s.start())
    time.sleep(2)
    each(lambda s: s.res.__setitem__("idle", idle(s.host, args.idle)))
    each(lambda s: s.start_load())
    kinds = ["parallel"] * args.rounds + ["sequence"]
    for i, kind in enumerate(kinds):
        each(lambda s: s.round(kind), i)
    each(lambda s: s.stop_load(len(kinds)))
    for i in range(args.client_calls):
        each(lambda s: s.res.setdefault("reload_cpu", []).append(client_cpu(s.host, ["reload"], i)), i)
        each(lambda s: s.res.setdefault("status_cpu", []).append(client_cpu(s.host, ["status"], i)), i)
        each(lambda s: s.res.setdefault("exec_reload_cpu", []).append(exec_reload_cpu(s.host, i)), i)
    for s in setups:
        s.res["client_reload_cpu_ms"] = statistics.median(s.res["reload_cpu"])
        s.res["client_status_cpu_ms"] = statistics.median(s.res["status_cpu"])
        s.res["exec_reload_cpu_ms"] = statistics.median(s.res["exec_reload_cpu"])
    time.sleep(2)
    each(lambda s: s.res.__setitem__("idle_after", idle(s.host, args.idle)))
    each(lambda s: s.latencies())


def med(values: list) -> str:
    return f"{statistics.median(values) * 1000:.0f}" if values else "-"


def p90(values: list) -> str:
    return f"{sorted(values)[-(-9 * (len(values) - 1) // 10)] * 1000:.0f}" if values else "-"


def table(results: list) -> str:
    rows = [("requests ok / failed", lambda r: f"{r['requests_ok']} / {r['requests_failed']}"),
            ("deploys that took effect", lambda r: r["took_effect"]),
            ("reloads that failed", lambda r: str(r["failed_reloads"]))]
    for kind in ("parallel", "sequence"):
        for key, what in (("to_job", "the manager's `Reloading` line"),
                          ("to_signal", "the shim's `signal` event"),
                          ("to_start", "reload-start"), ("to_done", "reload-done"),
                          ("to_return", "command returns")):
            rows.append((f"{kind}: `systemctl reload` -> {what}, median / p90 ms" + (" (ok ones)" if key in ("to_done", "to_return") else ""),
                         lambda r, k=kind, key=key: f"{med(r[k][key])} / {p90(r[k][key])}"))
    rows += [("shim CPU per reload, ms (median over apps)", lambda r: f"{r['shim_cpu_per_reload_ms']:.0f}"),
             ("`unicorn-shim reload` client CPU, ms (median)", lambda r: f"{r['client_reload_cpu_ms']:.1f}"),
             ("the unit's ExecReload= lines, CPU per reload, ms (median)",
              lambda r: f"{r['exec_reload_cpu_ms']:.1f}"),
             ("`unicorn-shim status` client CPU, ms (median)", lambda r: f"{r['client_status_cpu_ms']:.1f}"),
             ("idle shim PSS / RSS, MiB (median), at start", lambda r: f"{r['idle']['pss']:.1f} / {r['idle']['rss']:.1f}"),
             ("idle shim PSS / RSS, MiB (median), after the reloads",
              lambda r: f"{r['idle_after']['pss']:.1f} / {r['idle_after']['rss']:.1f}"),
             ("idle wakeups per shim per s / CPU of all shims, ms",
              lambda r: f"{r['idle_after']['wakeups_per_s']:.2f} / {r['idle_after']['cpu_ms']:.0f}")]
    width = max(len(label) for label, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | " + " | ".join(r["label"] for r in results) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * (len(r["label"]) + 2) for r in results) + "|"]
    for label, cell in rows:
        lines.append(f"| {label.ljust(width)} | " + " | ".join(cell(r).ljust(len(r["label"])) for r in results)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="parallel reload rounds (then one in sequence)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    parser.add_argument("--client-calls", type=int, default=20)
    parser.add_argument("--compare", metavar="REV", help="also run the shim of git revision REV")
    args = parser.parse_args()
    if os.getuid() != 0:
        sys.exit("bench/many_apps.py: run as root: it starts a private systemd")
    base = tempfile.mkdtemp(prefix="unicorn-shim-many.")
    setups = []
    try:
        for label, rev in [("this tree", "")] + ([(args.compare, args.compare)] if args.compare else []):
            setups.append(Setup(label, shim_tree(rev, base), args, base))
        run(setups, args)
    finally:
        for s in setups:
            s.host.down()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.apps} apps per setup, {args.rounds} parallel rounds + 1 in sequence, one client per app:\n")
    print(table([s.res for s in setups]))
    for s in setups:
        print(f"{s.res['label']}: " + " | ".join(s.host.reload_lines.strip().splitlines()))
    for s in setups:
        for failure in s.res.get("failures", []):
            print(f"{s.res['label']}: reload failed: {failure}")


if __name__ == "__main__":
    main()
