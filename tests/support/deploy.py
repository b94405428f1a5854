"""One app under the shim, under a private real systemd: used by the tests,
the demo and the benchmarks alike."""
from __future__ import annotations

import os
import subprocess

from support.apps import App, free_port
from support.systemd import UserManager, eventually, is_shim, proc_cmdline, proc_parent

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIM = os.path.join(REPO, "bin", "unicorn-shim")

SERVICE = """\
[Unit]
Description=unicorn-shim test app
{socket_deps}

[Service]
Type=notify
NotifyAccess=all
WorkingDirectory={current}
Environment=PATH=/usr/local/bin:/usr/bin:/bin
ExecStart={shim} run --pid-file {pid_file} --chdir {current} {shim_args} -- {command}
ExecReload={shim} reload
RuntimeDirectory=app
KillSignal={kill_signal}
TimeoutStopSec=60
Restart=on-failure
RestartSec=200ms
SyslogIdentifier=app
{service_extra}
"""

# The alternative operators use today: systemd hands the socket to Unicorn
# itself (it reads LISTEN_FDS natively) and a deploy is `systemctl restart`.
PLAIN_SERVICE = """\
[Unit]
Description=plain Unicorn behind a .socket unit
Requires=app.socket
After=app.socket
# A deploy per second would otherwise trip the start rate limit (5 in 10 s).
StartLimitIntervalSec=0

[Service]
Type=simple
WorkingDirectory={current}
Environment=PATH=/usr/local/bin:/usr/bin:/bin
ExecStart=/usr/bin/env -C {current} {command}
RuntimeDirectory=app
KillSignal={kill_signal}
TimeoutStopSec=60
SyslogIdentifier=app
"""

# Puma's own systemd integration, as its docs describe it: the socket from a
# .socket unit (bound by URL), Type=notify with the sd_notify gem (ruby-sd-notify),
# and a deploy by signal: USR1 phased restart or USR2 hot restart.
PUMA_NATIVE_SERVICE = """\
[Unit]
Description=Puma with its own systemd integration
Requires=app.socket
After=app.socket
StartLimitIntervalSec=0

[Service]
Type=notify
WatchdogSec=10
WorkingDirectory={current}
# Puma restarts into $PWD (the `current` symlink), not the release it resolved at boot
Environment=PATH=/usr/local/bin:/usr/bin:/bin PWD={current}
ExecStart={command} --bind=tcp://127.0.0.1:{port}
ExecReload=/bin/kill -{reload_signal} $MAINPID
RuntimeDirectory=app
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=always
RestartSec=200ms
SyslogIdentifier=app
"""
PUMA_RELOAD_SIGNALS = {"phased": "USR1", "hot": "USR2"}

SOCKET = """\
[Socket]
ListenStream=127.0.0.1:{port}
Backlog=1024
"""


# The probation the fixtures' shims run with (--probation; the shim's default is 5 s):
# the suite reloads some 340 times, and 4 s more each is 20 minutes of CI. The
# probation's own tests, the packaged units and the container tests run the default
# (probation=None), and every probation length runs the same code.
TEST_PROBATION = "1"
# The benchmarks' shims: their figures in the README leave the probation out (its
# cost has a benchmark of its own: bench/probation.py).
NO_PROBATION = "0"


def with_probation(shim_args: str, probation: "str | None") -> str:
    """`shim_args` with --probation `probation` unless they name one (None: the shim's default)."""
    if probation is None or "--probation" in shim_args:
        return shim_args
    return f"--probation {probation} {shim_args}".strip()


class Deployment:
    """One app under the shim, under the test's own systemd."""

    def __init__(self, manager: UserManager, root: str, socket_unit: bool = True,
                 shim_args: str = "", service_extra: str = "", port: int = 0, plain: bool = False,
                 pid_file: str = "", puma_native: str = "", probation: "str | None" = TEST_PROBATION,
                 **app_kw) -> None:
        self.m = manager
        self.plain = plain
        self.puma_native = puma_native     # "phased" or "hot": Puma's own systemd integration
        self.port = port or free_port()
        self.socket_unit = socket_unit
        self.app = App(os.path.join(root, "app"),
                       pid_file or os.path.join(manager.runtime_dir, "app", "unicorn.pid"), **app_kw)
        self.shim_args = with_probation(shim_args, probation) + ("" if socket_unit else f" --listen 127.0.0.1:{self.port}")
        self.service_extra = service_extra

    def write_units(self) -> None:
        template = PLAIN_SERVICE if self.plain else SERVICE
        if self.puma_native:
            template = PUMA_NATIVE_SERVICE
        self.m.write_unit("app.service", template.format(
            port=self.port, reload_signal=PUMA_RELOAD_SIGNALS.get(self.puma_native, ""),
            socket_deps="Requires=app.socket\nAfter=app.socket" if self.socket_unit else "",
            current=self.app.current, shim=SHIM, shim_args=self.shim_args,
            command=self.app.command(), service_extra=self.service_extra, pid_file=self.app.pid_file,
            kill_signal=self.app.graceful_stop_signal))
        if self.socket_unit:
            self.m.write_unit("app.socket", SOCKET.format(port=self.port))

    def start(self, check: bool = True) -> subprocess.CompletedProcess:
        if not os.path.exists(self.app.current):
            self.app.release()
        self.write_units()
        if self.socket_unit:
            r = self.m.systemctl("start", "app.socket")
            assert r.returncode == 0, r.stderr
        r = self.m.systemctl("start", "app.service")
        if check:
            assert r.returncode == 0, r.stderr + self.m.journal_text()[-3000:]
        return r

    def reload(self) -> subprocess.CompletedProcess:
        return self.m.systemctl("reload", "app.service")

    def stop(self) -> subprocess.CompletedProcess:
        r = self.m.systemctl("stop", "app.service")
        if self.socket_unit:
            self.m.systemctl("stop", "app.socket")
        return r

    def state(self) -> dict:
        return self.m.show("app.service", "MainPID", "ActiveState", "SubState", "Result", "NRestarts",
                           "StatusText", "ExecMainStatus")

    def master_pids(self) -> list:
        """Masters: the unit's processes whose parent is not in the unit (the manager's
        children), other than the shim. Holds in steady state for every server."""
        pids = self.m.unit_processes()
        return [p for p in pids if proc_parent(p) not in pids and not is_shim(p)]

    def app_workers(self, master: int) -> list:
        """Unicorn's and Puma's worker titles say "worker"; Gunicorn's (no setproctitle) do not."""
        return [p for p in self.m.unit_processes() if proc_parent(p) == master
                and ("worker" in proc_cmdline(p) or self.app.server == "gunicorn")]

    def assert_main_pid_is_live_master(self) -> int:
        """systemd's MainPID is the one Unicorn master alive, and the manager is its parent."""
        pid, masters = eventually(lambda: (self.m.main_pid(), self.master_pids()),
                                  lambda got: got[1] == [got[0]], interval=0.05)
        assert masters == [pid], (pid, masters, [proc_cmdline(p) for p in masters])
        assert proc_parent(pid) == self.m.pid
        return pid
