#!/usr/bin/python3
"""Benchmark (not a test): the README's "Why" table. Each way of deploying
Unicorn that operators use, driven by its own deploy command, side by side in
one run, each under its own private real systemd user manager, with Debian's
unicorn and runit and the real unicornherder:

    sudo bench/alternatives.py [--deploys 5] [--interval 4] [--clients 4]
        [--unicornherder SPEC] [--setups a,b,...] [--journal DIR]

Per setup: a few seconds of steady load, --deploys good deploys --interval
seconds apart (each links a new release as `current` and runs the setup's
deploy command), then one bad deploy (a release that raises at load) and
--after-bad seconds more load. Reported per setup: requests that failed during
the good deploys, the worst latency in each deploy's window (the --interval
seconds from the command on; median over the deploys), the longest time
without a successful response in a window (median), what the deploy command
returned, how many deploys took effect (the release answering just before the
next deploy is the one just deployed), and after the bad deploy: what its
command returned, what serves, the requests that failed. For the runit rows,
how often unicornherder crashed (tracebacks in its svlogd log) and how often
Unicorn's `-D` launcher said "master failed to start". --journal DIR keeps each
setup's journal and that log.

unicornherder is not packaged by Debian: it is installed with pip into a
virtualenv made by Debian's python3 (with the system site packages, so Debian's
python3-psutil serves its one dependency). SPEC is what pip is given
(default `unicornherder`; a path or a VCS URL of its source works too). If the
install fails, its rows say so and are not measured.
Needs root, Debian's unicorn, runit and python3-psutil.
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
import time
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from support.apps import App, free_port  # noqa: E402
from support.classic import USER, ensure_user  # noqa: E402
from support.deploy import NO_PROBATION, SOCKET, Deployment  # noqa: E402
from support.load import Load, get  # noqa: E402
from support.systemd import UserManager  # noqa: E402

# Unicorn started by systemd itself (Type=simple): a deploy is `systemctl restart`.
# Without a .socket unit the master binds the port (the config's `listen`).
SIMPLE_SERVICE = """\
[Unit]
{socket_deps}
[Service]
Type=simple
WorkingDirectory={current}
Environment=PATH=/usr/local/bin:/usr/bin:/bin PWD={current}
ExecStart={command}
KillSignal=SIGQUIT
TimeoutStopSec=60
SyslogIdentifier=app
"""

# The hand-made unit of the blog posts: Unicorn daemonized, systemd follows the
# pid file, a deploy is USR2 to the master; the config's before_fork QUITs the old one.
FORKING_SERVICE = """\
[Service]
Type=forking
WorkingDirectory={current}
Environment=PATH=/usr/local/bin:/usr/bin:/bin PWD={current}
PIDFile={pid_file}
ExecStart={command} -D
ExecReload=/bin/kill -USR2 $MAINPID
KillSignal=SIGQUIT
TimeoutStopSec=60
Restart=always
SyslogIdentifier=app
"""

# runit under systemd as Debian's runit.service runs it (runsvdir over a service
# directory), with the classic run script: runit runs unicornherder, which runs
# Unicorn daemonized and follows its pid file.
RUNIT_SERVICE = """\
[Service]
ExecStart=/usr/bin/runsvdir -P {service_dir}
KillSignal=SIGHUP
# Debian's runit.service has KillMode=process; mixed also ends what is left when stopped
KillMode=mixed
TimeoutStopSec=5
SyslogIdentifier=app
"""
RUN_SCRIPT = """\
#!/bin/sh
exec 2>&1
cd {current}
exec chpst -u {user} {herder} -u unicorn -p {pid_file} -- -c config/unicorn.rb -E production
"""

# The part of the config every setup but the shim needs: the classic config's
# `working_directory` (so a USR2 re-exec starts in the release `current` names)
# and, without a .socket unit, its `listen`.
CONFIG = 'working_directory "{current}"\n{listen}'


class Setup:
    """One deploy method: its units, its deploy command, its app."""

    deploy_command = ("systemctl", "restart")
    socket_unit = False
    seed_hook = False

    def __init__(self, manager: UserManager, root: str, args) -> None:
        self.m, self.root, self.args = manager, root, args
        self.port = free_port()
        os.makedirs(os.path.join(root, "pids"))
        self.app = App(os.path.join(root, "app"), os.path.join(root, "pids", "unicorn.pid"),
                       ready_hook=False, seed_hook=self.seed_hook)
        self.extra = CONFIG.format(current=self.app.current,
                                   listen="" if self.socket_unit else f'listen "127.0.0.1:{self.port}"')

    def release(self, broken: bool = False) -> str:
        return self.app.release(broken=broken, extra=self.extra)

    def command(self) -> str:
        return "/usr/bin/unicorn -c config/unicorn.rb -E production config.ru"

    def unit(self) -> str:
        return SIMPLE_SERVICE.format(current=self.app.current, command=self.command(),
                                     socket_deps="Requires=app.socket\nAfter=app.socket" if self.socket_unit
                                     else "")

    def start(self) -> None:
        self.release()
        if self.socket_unit:
            self.m.write_unit("app.socket", SOCKET.format(port=self.port))
            self.m.systemctl("start", "app.socket")
        self.m.write_unit("app.service", self.unit())
        r = self.m.systemctl("start", "app.service")
        if r.returncode:
            raise RuntimeError(r.stderr.strip())

    def deploy(self, timeout: float) -> subprocess.CompletedProcess:
        return self.m.systemctl(*self.deploy_command[1:], "app.service", timeout=timeout)

    def state(self) -> str:
        st = self.m.show("app.service", "ActiveState", "SubState")
        text = f"{st.get('ActiveState')}/{st.get('SubState')}"
        if self.socket_unit:
            sock = self.m.show("app.socket", "ActiveState", "Result")
            text += f", socket {sock.get('ActiveState')} ({sock.get('Result')})"
        return text

    def stop(self) -> None:
        self.m.systemctl("stop", "app.service")
        if self.socket_unit:
            self.m.systemctl("stop", "app.socket")

    def log(self) -> str:
        """What the setup logged outside the journal."""
        return ""

    def notes(self) -> str:
        return ""


class SocketRestart(Setup):
    socket_unit = True


class Forking(Setup):
    deploy_command = ("systemctl", "reload")
    seed_hook = True

    def unit(self) -> str:
        return FORKING_SERVICE.format(current=self.app.current, command=self.command(),
                                      pid_file=self.app.pid_file)


class Herder(Setup):
    """runit + unicornherder; `sv_command` is the deploy: 2 (USR2), hup or restart."""

    seed_hook = True

    def __init__(self, manager: UserManager, root: str, args, sv_command: str, herder: str,
                 seed_hook: bool = True) -> None:
        self.seed_hook = seed_hook      # without it, unicornherder's HUP path retires the old master
        super().__init__(manager, root, args)
        self.deploy_command = ("sv", sv_command)
        self.herder = herder
        # The run script drops to an unprivileged user, as the classic one does (chpst -u app).
        user = ensure_user()
        for d in (root, self.app.root):
            os.chmod(d, 0o755)
        os.chown(os.path.dirname(self.app.pid_file), user.pw_uid, user.pw_gid)
        self.service_dir = os.path.join(root, "service")
        self.sv_dir = os.path.join(root, "sv", "app")

    def unit(self) -> str:
        os.makedirs(self.sv_dir)
        run = os.path.join(self.sv_dir, "run")
        with open(run, "w") as f:
            f.write(RUN_SCRIPT.format(current=self.app.current, user=USER, herder=self.herder,
                                      pid_file=self.app.pid_file))
        os.chmod(run, 0o755)
        # runit's own logging of the run script's output (unicornherder's log): svlogd
        os.makedirs(os.path.join(self.sv_dir, "log", "main"))
        with open(os.path.join(self.sv_dir, "log", "run"), "w") as f:
            f.write(f"#!/bin/sh\nexec svlogd -tt {self.sv_dir}/log/main\n")
        os.chmod(os.path.join(self.sv_dir, "log", "run"), 0o755)
        os.makedirs(self.service_dir)
        os.symlink(self.sv_dir, os.path.join(self.service_dir, "app"))
        return RUNIT_SERVICE.format(service_dir=self.service_dir)

    def deploy(self, timeout: float) -> subprocess.CompletedProcess:
        r = subprocess.run(["sv", self.deploy_command[1], self.sv_dir], capture_output=True, text=True,
                           timeout=timeout)
        r.stdout = r.stdout.replace(self.sv_dir + ": ", "")
        return r

    def log(self) -> str:
        try:
            with open(os.path.join(self.sv_dir, "log", "main", "current")) as f:
                return "\n--- svlogd (unicornherder) ---\n" + f.read()
        except OSError as e:
            return f"\n--- no svlogd log: {e}\n"

    def notes(self) -> str:
        log = self.log()
        return (f"unicornherder crashed {log.count('Traceback (most recent call last)')}×, "
                f"Unicorn 'master failed to start' {log.count('master failed to start')}×")

    def state(self) -> str:
        status = subprocess.run(["sv", "status", self.sv_dir], capture_output=True, text=True).stdout
        return status.replace(self.sv_dir + ": ", "").strip()


class Shim(Setup):
    """The shim (with its readiness hook) and a .socket unit; `seed_hook`: the config
    also has the before_fork hook of the USR2 setups, which the shim does not need."""

    deploy_command = ("systemctl", "reload")

    def __init__(self, manager: UserManager, root: str, args, seed_hook: bool = False) -> None:
        self.m, self.root, self.args = manager, root, args
        self.d = Deployment(manager, root, seed_hook=seed_hook, probation=NO_PROBATION)
        self.app, self.port, self.socket_unit = self.d.app, self.d.port, True

    def release(self, broken: bool = False) -> str:
        return self.app.release(broken=broken)

    def start(self) -> None:
        self.d.start()

    def stop(self) -> None:
        self.d.stop()


SETUPS = {
    "restart (Unicorn binds)": lambda m, root, args: Setup(m, root, args),
    "socket+restart": lambda m, root, args: SocketRestart(m, root, args),
    "forking+USR2": lambda m, root, args: Forking(m, root, args),
    "herder sv 2": lambda m, root, args: Herder(m, root, args, "2", args.herder_bin),
    "herder sv hup": lambda m, root, args: Herder(m, root, args, "hup", args.herder_bin),
    "herder sv restart": lambda m, root, args: Herder(m, root, args, "restart", args.herder_bin),
    "herder sv hup (no hook)": lambda m, root, args: Herder(m, root, args, "hup", args.herder_bin,
                                                          seed_hook=False),
    "shim": lambda m, root, args: Shim(m, root, args),
    "shim+same hook": lambda m, root, args: Shim(m, root, args, seed_hook=True),
}


def install_herder(base: str, spec: str) -> tuple:
    """(path of the unicornherder command, None) or (None, why not)."""
    venv = os.path.join(base, "herder-venv")
    r = subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", venv],
                       capture_output=True, text=True)
    if r.returncode == 0:
        r = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "--quiet", spec],
                           capture_output=True, text=True)
    if r.returncode:
        lines = [line for line in (r.stderr or r.stdout).splitlines() if line.strip()]
        return None, f"`pip install {spec}` failed: {lines[-1] if lines else r.returncode}"
    os.chmod(base, 0o755)
    return os.path.join(venv, "bin", "unicornherder"), None


def wait_serving(port: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = get(port, timeout=2)
        if r.release:
            return r.release
        time.sleep(0.2)
    raise RuntimeError(f"nothing serves on {port} after {timeout:g} s")


def longest_gap(results, t0: float, t1: float) -> float:
    """The longest stretch of [t0, t1] in which no request that succeeded ended."""
    ends = sorted(r.start + r.latency for r in results if not r.error and t0 <= r.start + r.latency <= t1)
    points = [t0] + ends + [t1]
    return max(b - a for a, b in zip(points, points[1:]))


def run_setup(name: str, args, base: str) -> dict:
    out = {"name": name, "rc": [], "served": [], "worst": [], "gap": []}
    manager = UserManager(base)
    root = tempfile.mkdtemp(dir=base)
    setup = SETUPS[name](manager, root, args)
    try:
        setup.start()
        wait_serving(setup.port)
        windows = []
        with Load(setup.port, clients=args.clients) as load:
            time.sleep(args.steady)
            for _ in range(args.deploys):
                release = setup.release()
                t0 = time.monotonic()
                r = setup.deploy(timeout=args.interval * 10)
                out["rc"].append(r.returncode)
                time.sleep(max(0.0, t0 + args.interval - time.monotonic()))
                out["served"].append((release, get(setup.port, timeout=2).release))
                windows.append((t0, time.monotonic()))
            last_good = f"r{setup.app.count}"
            setup.release(broken=True)
            t0 = time.monotonic()
            try:
                r = setup.deploy(timeout=args.bad_timeout)
                out["bad_rc"] = f"{r.returncode}" + (f" ({first_line(r)})" if first_line(r) else "")
            except subprocess.TimeoutExpired:
                out["bad_rc"] = f"none in {args.bad_timeout:g} s"
            t_bad_returned = time.monotonic()
            time.sleep(args.after_bad)
            answer = get(setup.port, timeout=2)
            out["bad_serves"] = ("old release" if answer.release == last_good
                                 else answer.release or f"nothing ({(answer.error or '').split(':')[0]})")
            out["bad_state"] = setup.state()
            out["bad_s"] = t_bad_returned - t0
        results = list(load.results)
        good_end = windows[-1][1]
        out["failed"] = Counter(r.error.split(":")[0] for r in results if r.error and r.start < good_end)
        out["ok"] = sum(1 for r in results if not r.error and r.start < good_end)
        out["bad_failed"] = sum(1 for r in results if r.error and r.start >= good_end)
        for t0, t1 in windows:
            out["worst"].append(max((r.latency for r in results if t0 <= r.start < t1), default=0.0))
            out["gap"].append(longest_gap(results, t0, t1))
    except Exception as e:    # a setup that cannot even start is a result too
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        setup.stop()
        out["notes"] = setup.notes()
        if args.journal:
            os.makedirs(args.journal, exist_ok=True)
            with open(os.path.join(args.journal, name.replace(" ", "_") + ".log"), "w") as f:
                f.write(manager.journal_text() + setup.log())
        manager.down()
    return out


def first_line(r: subprocess.CompletedProcess) -> str:
    text = (r.stdout + r.stderr).strip()
    return text.splitlines()[0][:70] if text else ""


def summary(r: dict, args) -> list:
    if "error" in r:
        return [r["error"]] + [""] * 9
    rcs = Counter(r["rc"])
    took = sum(1 for deployed, served in r["served"] if served == deployed)
    return [
        (", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "0") + f" of {r['ok'] + sum(r['failed'].values())}",
        f"{statistics.median(r['worst']) * 1000:.0f} / {max(r['worst']) * 1000:.0f}",
        f"{statistics.median(r['gap']) * 1000:.0f} / {max(r['gap']) * 1000:.0f}",
        ", ".join(f"{k} ×{v}" for k, v in sorted(rcs.items(), key=str)),
        f"{took}/{args.deploys} (" + " ".join(served or "-" for _, served in r["served"]) + ")",
        r["bad_rc"] + f", {r['bad_s'] * 1000:.0f} ms",
        r["bad_serves"],
        str(r["bad_failed"]),
        r["bad_state"],
        r["notes"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deploys", type=int, default=5)
    parser.add_argument("--interval", type=float, default=4.0, help="seconds between deploys")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steady", type=float, default=2.0, help="seconds of load before the first deploy")
    parser.add_argument("--after-bad", type=float, default=5.0,
                        help="seconds of load after the bad deploy's command returned")
    parser.add_argument("--bad-timeout", type=float, default=60.0)
    parser.add_argument("--unicornherder", default="unicornherder", metavar="SPEC",
                        help="what pip installs as unicornherder")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--journal", metavar="DIR", help="keep each setup's journal (app.service) in DIR")
    args = parser.parse_args()
    gc.disable()      # see bench/reload.py: GC passes over the results would count as latency
    names = args.setups.split(",")
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        parser.error(f"unknown setup {unknown[0]!r}; setups: {', '.join(SETUPS)}")
    base = tempfile.mkdtemp(prefix="unicorn-shim-alternatives.")
    rows = []
    try:
        args.herder_bin, why_not = (install_herder(base, args.unicornherder)
                                    if any(n.startswith("herder") for n in names) else (None, None))
        for name in names:
            if name.startswith("herder") and not args.herder_bin:
                rows.append({"name": name, "error": f"not measured: {why_not}"})
                continue
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(run_setup(name, args, base))
            print(" | ".join(summary(rows[-1], args)), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.deploys} good deploys {args.interval:g} s apart, then a bad one; {args.clients} clients; "
          f"latencies in ms (median / worst over the deploys)\n")
    head = ["setup", "failed in good deploys (of requests)", "worst latency per deploy",
            "longest time without an answer per deploy", "deploy command returned",
            f"took effect (release serving {args.interval:g} s after each)", "bad deploy: command returned, after",
            f"bad deploy: then serving (+{args.after_bad:g} s)", "bad deploy: failed requests", "state at the end",
            "the supervisor's log"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join([r["name"]] + summary(r, args)) + " |")


if __name__ == "__main__":
    main()
