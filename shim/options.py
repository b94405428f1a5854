"""The command line's grammar: one argparse parser for every subcommand, used by the
CLI, by `check` (to read a unit's ExecStart= as `run` will) and by the man page.
The running shim never imports this after parsing its own command line.
"""
from __future__ import annotations

import os
import sys

from shim import client

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    import argparse
    from typing import Optional

def _seconds(text: str) -> float:
    import argparse
    try:
        return client.seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds more than 0") from None


# --probation's default, chosen by measurement (README, "Probation's default"): it catches
# a release that stalls a second after ready with margin on a loaded host.
PROBATION = 5.0


def _seconds_or_zero(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _seconds(text)


def _mode(text: str) -> int:
    import argparse
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 0660") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode")
    return value


def _statuses(text: str) -> tuple:
    import argparse

    from shim.runtime import probe
    try:
        return probe.parse_statuses(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of statuses within 100-599 "
                                         "such as 200-399,404") from None


def _probe_path(text: str) -> str:
    import argparse
    if not text.startswith("/") or any(c in text for c in " \r\n"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a request path such as /up")
    return text


def _health_url(text: str) -> str:
    import argparse

    from shim.runtime import health
    try:
        health.request_for(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else the terminal's, else 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def build_parser() -> argparse.ArgumentParser:
    import argparse
    import functools

    from shim import __version__
    from shim.runtime import servers

    class Formatter(argparse.HelpFormatter):
        """argparse's own, told the terminal's width: left to itself it imports shutil
        to ask (add_argument builds one), and every shim would carry shutil for life."""

        def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                     width: Optional[int] = None) -> None:
            super().__init__(prog, indent_increment, max_help_position, width or _columns())

    parser = argparse.ArgumentParser(
        formatter_class=Formatter,
        prog="unicorn-shim",
        description="Run a Unicorn, Gunicorn or Puma master under systemd with zero-downtime reloads.")
    parser.add_argument("--version", action="version", version=f"unicorn-shim {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", parser_class=functools.partial(
        argparse.ArgumentParser, formatter_class=Formatter))
    sub.required = True

    run = sub.add_parser("run", help="supervise a server (the unit's ExecStart=)",
                         description="Hold the listening sockets, start the server's master, tell systemd "
                                     "the truth about it, and replace it on reload.")
    run.add_argument("--listen", action="append", default=[], metavar="ADDR",
                     help="bind HOST:PORT, [V6]:PORT, PORT or unix:/path (repeatable); "
                          "not needed with a .socket unit")
    run.add_argument("--pid-file", metavar="PATH",
                     help="the pid file the server writes (the `pid` of its config); the shim keeps "
                          "it truthful across reloads")
    run.add_argument("--ready-timeout", type=_seconds, default=60.0, metavar="SEC",
                     help="how long a new master may take to be ready (default 60)")
    run.add_argument("--retire-timeout", type=_seconds, default=60.0, metavar="SEC",
                     help="how long an old master may take to finish its requests before it is "
                          "killed (default 60); a stop during that drain gives it 2 s")
    run.add_argument("--health-check", metavar="URL", type=_health_url,
                     help="http://HOST:PORT/PATH that must answer 2xx/3xx from the new release "
                          "before the old one is retired; asked of the new generation alone, over "
                          "its private probe socket, with PATH and HOST:PORT as the Host header")
    run.add_argument("--probe-path", metavar="PATH", type=_probe_path, default="/",
                     help="the request path of the readiness probe each new generation must answer "
                          "over its private socket (default /; Rails 7.1 and later: /up)")
    run.add_argument("--probe-status", metavar="LIST", type=_statuses, default="100-499",
                     help="the probe's accepted statuses, e.g. 200-399,404 (default 100-499: any "
                          "answer but a server error)")
    run.add_argument("--probation", type=_seconds_or_zero, default=PROBATION, metavar="SEC",
                     help="after a reload's new generation is ready, watch it SEC seconds (workers dying with an "
                          "error, a probe every 0.25 s answered within 1 s) and roll back on a failure; the "
                          "old generation stands by meanwhile (Unicorn: its master with its workers "
                          "stopped; Gunicorn, Puma: serving beside); the reload returns after "
                          f"(default {PROBATION:g}; 0: off)")
    run.add_argument("--server", choices=sorted(servers.PROFILES),
                     help="the server, when it cannot be told from the command")
    run.add_argument("--upgrade", choices=["spawn", "usr2"],
                     help="spawn (the default): the shim starts each next master itself, in the "
                          "release `current` names; usr2: Unicorn re-execs itself (Unicorn only)")
    run.add_argument("--settle", type=_seconds, default=0.1, metavar="SEC",
                     help="without the readiness hook: how long the master and its workers must stay "
                          "unchanged and idle (asleep, using no CPU) to count as ready (default 0.1)")
    run.add_argument("--chdir", metavar="DIR",
                     help="start each new master in DIR, resolved anew each time (a `current` symlink)")
    run.add_argument("--control", metavar="PATH",
                     help="control socket (default: $RUNTIME_DIRECTORY/control.sock)")
    run.add_argument("--control-mode", type=_mode, default=0o600, metavar="MODE",
                     help="file mode of the control socket (default 0600; 0660 lets the group reload)")
    run.add_argument("--socket-mode", type=_mode, metavar="MODE",
                     help="file mode of unix sockets bound from --listen")
    run.add_argument("--state-dir", metavar="DIR",
                     help="where the last good release is remembered (default: $STATE_DIRECTORY, "
                          "from the unit's StateDirectory=)")
    run.add_argument("--no-fallback", action="store_true",
                     help="at start, never fall back to the last good release when the deployed one "
                          "cannot boot: the start fails instead")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- SERVER_COMMAND ...")

    reload = sub.add_parser("reload", help="replace the running release, wait for the outcome "
                                           "(the unit's ExecReload=)")
    reload.add_argument("--timeout", type=_seconds, metavar="SEC",
                        help="give up after SEC: the shim rolls the reload back rather than let it "
                             "finish later (as ExecReload=, systemd's own reload timeout is read and "
                             "counts too)")
    reload.add_argument("--signalled", action="store_true",
                        help="report the outcome of the reload a SIGHUP to the shim started (the "
                             "shipped units' first ExecReload= line sends it to the pid in shim.pid of "
                             "the runtime directory: no Python start before the reload begins); when no "
                             "such reload awaits a report, ask for one")
    _add_target(reload)

    check = sub.add_parser("check", help="pre-flight: known mistakes in a setup and the server's config",
                           description="Check an app of the packaged units (APP, unicorn-shim@APP or "
                                       "/etc/unicorn-shim/APP.conf), a unit (NAME.service) or a unit file, "
                                       "as systemd and the server will run it.")
    check.add_argument("unit_file", metavar="APP|UNIT|UNIT_FILE")
    check.add_argument("--unit-only", action="store_true",
                       help="only the unit's own settings: not this machine's users and directories, "
                            "nor the server's config")
    check.add_argument("command", nargs=argparse.REMAINDER, metavar="-- SERVER_COMMAND ...",
                       help="the server command, when ExecStart= does not show it")

    status = sub.add_parser("status", help="what the running shim supervises")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add_target(status)
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    """Which shim: the packaged app, a unit of one's own, or a socket path (else $RUNTIME_DIRECTORY)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("app", nargs="?", metavar="APP",
                       help="the app of the packaged unit unicorn-shim@APP (/run/unicorn-shim/APP/control.sock); "
                            "without APP, --unit or --control: $RUNTIME_DIRECTORY/control.sock, as in ExecReload=")
    which.add_argument("--unit", metavar="NAME",
                       help="the shim of unit NAME, found through systemd (its RuntimeDirectory=)")
    which.add_argument("--control", metavar="PATH", help="control socket of the shim")
    parser.add_argument("--user", action="store_true",
                        help="with --unit: a unit of the caller's own service manager (systemctl --user)")
