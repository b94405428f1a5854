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
from shim.options import build_parser
from shim.errors import EXIT_PIDFILE, EXIT_USAGE, ShimError, complain

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    import argparse
    from typing import List, Optional

    from shim.runtime import adopt, servers
    from shim.runtime.journal import Log



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
        complain(f"unicorn-shim: {e}")
        return e.exit_status


def _require_pidfd() -> None:
    """Masters are watched through pidfds (Linux >= 5.3, Python >= 3.9): say so plainly."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as e:
        raise ShimError(f"this system cannot watch processes through pidfds ({e}): unicorn-shim needs "
                        "Linux 5.3 or newer and Python 3.9 or newer", EXIT_USAGE) from None


def cmd_run(args: argparse.Namespace) -> int:
    from shim.runtime import adopt
    from shim.runtime.journal import Log
    from shim.runtime.notify import Notifier

    log = Log()
    record = adopt.take_record(os.environ, Notifier(), log)     # a dead shim's watcher started this one
    try:
        return _run(args, log, record)
    except ShimError as e:
        adopt.not_adopted(record, e, log)
        raise


def _run(args: argparse.Namespace, log: Log, record: Optional[adopt.Record]) -> int:
    from shim.runtime import adopt, probe, servers, sockets, spawn
    from shim.runtime.supervisor import Config, Supervisor

    environ = os.environ
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
    held = record.sockets() if record else sockets.hold(environ, args.listen, args.socket_mode)
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
        probe=probe.Request(args.probe_path, probe.DEFAULT_HOST, args.probe_status), probation=args.probation,
        state_dir=args.state_dir or environ.get("STATE_DIRECTORY", "").split(":")[0] or None)
    if not config.control_path:
        log.event("no-control", "no control socket (no RuntimeDirectory= and no --control): "
                  "`unicorn-shim reload` cannot reach this shim; SIGHUP still reloads")
    master = record and adopt.pin(record, runtime, log)
    notifier = adopt.watching(held, environ, log)
    supervisor = Supervisor(config, held, notifier, log, dict(environ))
    adopt.follow(notifier, supervisor, record and (record, master))
    crashed = True
    try:
        status = supervisor.run()
        crashed = False
        return status
    except ShimError:
        crashed = False
        raise
    finally:
        adopt.ended(notifier, held, crashed)
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
    from shim.tooling.check import check, report
    from shim.tooling.check_setup import SetupError

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
