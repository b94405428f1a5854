"""unicorn-shim's command line. The interface is a contract with users' unit files:
extend it, never rename it.

`reload` and `status` run from ExecReload=, often for many apps at once: their
plain forms go to shim.client without loading argparse or any of the modules
`run` needs (see shim/client.py). Everything else is parsed here.
"""
from __future__ import annotations

import os
import sys

from shim import client
from shim.errors import EXIT_PIDFILE, EXIT_USAGE, ShimError

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    import argparse
    from typing import List, Optional

    from shim import servers


def _seconds(text: str) -> float:
    import argparse
    try:
        return client.seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds more than 0") from None


def _mode(text: str) -> int:
    import argparse
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 0660") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode")
    return value


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

    from shim import __version__, servers

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
                          "killed (default 60)")
    run.add_argument("--health-check", metavar="URL",
                     help="http://HOST:PORT/PATH that must answer 2xx/3xx from the new release "
                          "before the old one is retired")
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
                        help="give up waiting after SEC (the reload itself goes on)")
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


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    status = client.main(argv)
    if status is not None:
        return status
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "reload": client.run, "status": client.run,
                "check": cmd_check}[args.subcommand](args)
    except ShimError as e:
        client.complain(f"unicorn-shim: {e}")
        return e.exit_status


def _require_pidfd() -> None:
    """Masters are watched through pidfds (Linux >= 5.3, Python >= 3.9): say so plainly."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as e:
        raise ShimError(f"this system cannot watch processes through pidfds ({e}): unicorn-shim needs "
                        "Linux 5.3 or newer and Python 3.9 or newer", EXIT_USAGE) from None


def cmd_run(args: argparse.Namespace) -> int:
    from shim import servers, sockets, spawn
    from shim.journal import Log
    from shim.notify import Notifier
    from shim.supervisor import Config, Supervisor

    _require_pidfd()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ShimError("no server command after `--` (e.g. -- unicorn -c config/unicorn.rb)", EXIT_USAGE)
    profile = servers.detect(command, args.server)
    spawn.resolve_command(command, args.chdir)
    _reject_daemon_flags(profile, command)
    if args.upgrade == "usr2" and not profile.usr2_carries_sockets:
        raise ShimError(f"--upgrade usr2: {profile.usr2_refusal}; use --upgrade spawn", EXIT_USAGE)
    if args.pid_file:
        _check_pid_dir(args.pid_file)
    if args.chdir and not os.path.isdir(args.chdir):
        raise ShimError(f"--chdir {args.chdir}: not a directory", EXIT_USAGE)
    environ = os.environ
    held = sockets.hold(environ, args.listen, args.socket_mode)
    if not held:
        raise ShimError("no socket to serve: give --listen ADDR or run from a .socket unit", EXIT_USAGE)
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    own_runtime = None
    if not runtime:
        import tempfile
        runtime = own_runtime = tempfile.mkdtemp(prefix="unicorn-shim.")
    config = Config(
        command=command, profile=profile, upgrade=args.upgrade or profile.default_upgrade,
        pid_file=os.path.abspath(args.pid_file) if args.pid_file else None,
        ready_timeout=args.ready_timeout, retire_timeout=args.retire_timeout, settle=args.settle,
        health_check=args.health_check, chdir=args.chdir,
        control_path=args.control or client.default_path(environ), control_mode=args.control_mode,
        runtime_dir=runtime, fallback=not args.no_fallback,
        state_dir=args.state_dir or environ.get("STATE_DIRECTORY", "").split(":")[0] or None)
    log = Log()
    if not config.control_path:
        log.event("no-control", "no control socket (no RuntimeDirectory= and no --control): "
                  "`unicorn-shim reload` cannot reach this shim; SIGHUP still reloads")
    supervisor = Supervisor(config, held, Notifier(), log, dict(environ))
    try:
        return supervisor.run()
    finally:
        sockets.release(held)
        if own_runtime:
            import shutil
            shutil.rmtree(own_runtime, ignore_errors=True)


def _reject_daemon_flags(profile: servers.ServerProfile, command: List[str]) -> None:
    for flag in profile.daemon_flags:
        if flag in command[1:]:
            raise ShimError(f"{flag} in the server command: a daemonized master escapes the shim and "
                            "sends its logs to /dev/null; remove it", EXIT_USAGE)


def _check_pid_dir(pid_file: str) -> None:
    directory = os.path.dirname(os.path.abspath(pid_file))
    if not os.path.isdir(directory):
        raise ShimError(f"--pid-file {pid_file}: directory {directory} does not exist", EXIT_PIDFILE)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ShimError(f"--pid-file {pid_file}: directory {directory} is not writable "
                        f"by uid {os.getuid()}", EXIT_PIDFILE)


def cmd_check(args: argparse.Namespace) -> int:
    from shim.check import check, report
    from shim.check_setup import SetupError

    rest = args.command
    if rest[:1] == ["--unit-only"]:          # given after the target: REMAINDER took it
        args.unit_only, rest = True, rest[1:]
    command = rest[1:] if rest[:1] == ["--"] else rest
    try:
        label, findings = check(args.unit_file, command or None, host=not args.unit_only)
    except OSError as e:
        raise ShimError(f"cannot read {args.unit_file}: {e.strerror}", EXIT_USAGE) from None
    except SetupError as e:
        raise ShimError(str(e), EXIT_USAGE) from None
    text, status = report(label, findings)
    print(text)
    return status
