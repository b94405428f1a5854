"""`unicorn-shim reload` and `status`: find a running shim's control socket and talk to it.

ExecReload= starts this once per deploy, for many apps at once on a busy host,
so it imports only os, sys, signal, socket, json, time and pwd/grp (for error messages),
and subprocess for one `systemctl show` (the reload job's deadline, shim/jobdeadline.py):
not psutil, systemd-python, nor the argparse parser that `run` needs.
shim/cli.py calls parse() first and builds its full parser only when parse()
cannot take the command line as it is (help, an error, an abbreviated option):
argparse then parses it, with the same meaning, and calls run() all the same.

Where the socket is, in this order:
    --control PATH     as given
    --unit NAME        the unit's RuntimeDirectory= as systemd reports it (--user: the
                       caller's own service manager), or the --control of its ExecStart=
    APP                the packaged unicorn-shim@APP: /run/unicorn-shim/APP/control.sock
    (none)             $RUNTIME_DIRECTORY/control.sock: what ExecReload= sees
"""
from __future__ import annotations

import json
import os
import signal
import socket

from shim.errors import EXIT_CONTROL, EXIT_RELOAD, EXIT_USAGE, ShimError, complain

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (a few ms per call)
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

SOCKET_NAME = "control.sock"
PACKAGED_RUNTIME = "/run/unicorn-shim"      # RuntimeDirectory=unicorn-shim/%i of the templated unit
PACKAGED_CONF = "/etc/unicorn-shim"
EXAMPLES = "/usr/share/doc/unicorn-shim/examples"
STATUS_TIMEOUT = 10.0
SERVER_SIGNALS = ("SIGUSR1", "SIGTTIN", "SIGTTOU", "SIGWINCH")   # the server's: reopen logs, workers +1/-1
_APP_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


class Invocation:
    """What `reload`/`status` were asked to do; argparse's Namespace has the same attributes."""

    def __init__(self, subcommand: str) -> None:
        self.subcommand = subcommand
        self.app: Optional[str] = None
        self.control: Optional[str] = None
        self.unit: Optional[str] = None
        self.user = False
        self.timeout: Optional[float] = None
        self.json = False
        self.signalled = False


def seconds(text: str) -> float:
    """A positive, finite number of seconds; ValueError otherwise."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"{text!r} must be more than 0")
    return value


_VALUED = {"reload": ("--timeout", "--control", "--unit"), "status": ("--control", "--unit")}
_FLAGS = {"reload": ("--user", "--signalled"), "status": ("--user", "--json")}


def parse(argv: List[str]) -> Optional[Invocation]:
    """The plain forms of `reload`/`status`, or None: then argparse decides (and
    gives help or the error) exactly as it did before this fast path existed."""
    if not argv or argv[0] not in _VALUED:
        return None
    inv = Invocation(argv[0])
    seen = set()
    words = iter(argv[1:])
    for word in words:
        name, eq, value = word.partition("=")
        if word in _FLAGS[inv.subcommand]:
            name, value = word, ""
        elif name in _VALUED[inv.subcommand]:
            if not eq:
                value = next(words, "-")
                if value.startswith("-"):
                    return None
        elif not word.startswith("-") and inv.app is None:
            inv.app = word
            continue
        else:
            return None
        if name in seen:
            return None
        seen.add(name)
        if name == "--timeout":
            try:
                inv.timeout = seconds(value)
            except ValueError:
                return None
        elif name in _FLAGS[inv.subcommand]:
            setattr(inv, name[2:], True)
        else:
            setattr(inv, name[2:], value)
    if sum(x is not None for x in (inv.app, inv.control, inv.unit)) > 1:
        return None      # argparse says which options exclude each other
    return inv


def run(args: Any) -> int:
    """Carry out a parsed `reload` or `status` (an Invocation or argparse's Namespace)."""
    # As ExecReload= this runs in the unit's cgroup: `systemctl kill -s USR1 APP` (logrotate)
    # reaches it too, and USR1's default action would end the reload's client, not the reload.
    for name in SERVER_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    where = locate(args)
    if args.subcommand == "reload":
        answer = reload(where, args.signalled, args.timeout)
        if answer.get("ok"):
            print(f"reloaded: generation {answer['generation']}, master {answer['master_pid']} serving "
                  f"{answer.get('release')}, old master {answer['old_master_pid']} retired "
                  f"({answer['duration_ms']} ms)")
            return 0
        complain(f"unicorn-shim: reload failed: {answer.get('error')}")
        return EXIT_RELOAD
    answer = where.request({"command": "status"}, STATUS_TIMEOUT)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif answer.get("ok"):
        print(answer["status_line"])
        for s in answer["sockets"]:
            print(f"  socket {s['address']} ({s['origin']})")
        print(f"  server {answer['server']}, upgrade {answer['upgrade']}, up {answer['uptime_s']} s")
    else:
        complain(f"unicorn-shim: {answer.get('error')}")
    return 0 if answer.get("ok") else EXIT_RELOAD


def reload(where: Target, signalled: bool, timeout: Optional[float]) -> Dict[str, Any]:
    """Ask for a reload, or with `signalled` report the one the unit's previous
    ExecReload= started with SIGHUP (waiting for it if it still runs). When no
    signalled reload awaits a report (the trigger did not reach the shim; a shim
    started before `reload-wait` existed answers "unknown command"), ask for one."""
    from shim.jobdeadline import deadlines
    bounds = {"deadlines": deadlines(timeout, _own_unit(), systemctl_show)}
    if signalled:
        answer = where.request({"command": "reload-wait", **bounds}, timeout)
        if not (answer.get("no_signalled_reload") or str(answer.get("error")).startswith("unknown command")):
            return answer
    return where.request({"command": "reload", **bounds}, timeout)


def main(argv: List[str]) -> Optional[int]:
    """Run a plain `reload`/`status` command line; None when argparse must parse it."""
    args = parse(argv)
    if args is None:
        return None
    try:
        return run(args)
    except ShimError as e:
        complain(f"unicorn-shim: {e}")
        return e.exit_status


# -- where the shim is ---------------------------------------------------------

class Target:
    """A control socket, and what to tell the operator when it cannot be reached."""

    def __init__(self, path: str, unit: Optional[str] = None, app: Optional[str] = None) -> None:
        self.path, self.unit, self.app = path, unit, app

    def request(self, command: Dict[str, Any], timeout: Optional[float]) -> Dict[str, Any]:
        try:
            return request(self.path, command, timeout)
        except PermissionError:
            raise ShimError(permission_hint(self.path, self.unit), EXIT_CONTROL) from None
        except FileNotFoundError:
            raise ShimError(self._not_running(), EXIT_CONTROL) from None

    def _not_running(self) -> str:
        runtime = os.path.dirname(self.path)
        see = f"; see: systemctl status {self.unit}" if self.unit else ""
        if self.app and not os.path.isdir(runtime):
            if not os.path.exists(os.path.join(PACKAGED_CONF, f"{self.app}.conf")):
                return (f"no such app {self.app!r}: {PACKAGED_CONF}/{self.app}.conf does not exist "
                        "(for a unit of your own: --unit NAME)")
            return (f"no shim is running: {runtime} does not exist ({self.unit} is not running: "
                    f"systemctl start {self.unit}.socket{see})")
        if not os.path.isdir(runtime):
            return f"no shim is running: {runtime} does not exist (the service is not running{see})"
        return f"no shim is running: {self.path} does not exist (the shim has not started or has exited{see})"


def locate(args: Any) -> Target:
    if args.user and not args.unit:
        raise ShimError("--user goes with --unit NAME (a unit of the caller's own service manager)",
                        EXIT_USAGE)
    if args.control:
        return Target(args.control)
    if args.unit:
        return unit_target(args.unit, args.user)
    if args.app:
        if args.app[0] == "." or not set(args.app) <= _APP_CHARS:
            raise ShimError(f"{args.app!r} is not an app name (letters, digits, _ . -)", EXIT_USAGE)
        return Target(os.path.join(PACKAGED_RUNTIME, args.app, SOCKET_NAME), f"unicorn-shim@{args.app}",
                      args.app)
    path = default_path(os.environ)
    if not path:
        raise ShimError("cannot find the shim's control socket: name the app (unicorn-shim reload APP for "
                        "unicorn-shim@APP), give --unit NAME or --control PATH; without them it is "
                        "$RUNTIME_DIRECTORY/control.sock, and RUNTIME_DIRECTORY is set only in the unit's "
                        "own ExecReload= (add RuntimeDirectory= to the unit)", EXIT_CONTROL)
    return Target(path)


def default_path(environ: "Dict[str, str] | os._Environ[str]") -> Optional[str]:
    """The socket in the unit's RuntimeDirectory= (ExecReload= sees the same one)."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, SOCKET_NAME) if runtime else None


def unit_target(unit: str, user: bool) -> Target:
    """Ask systemd where the unit's shim listens: --control in its ExecStart=, else
    control.sock in the first RuntimeDirectory= (under /run, or $XDG_RUNTIME_DIR with --user)."""
    props = systemctl_show(unit, user, ("Id", "LoadState", "RuntimeDirectory", "ExecStart"))
    name = props.get("Id") or unit
    if props.get("LoadState") != "loaded":
        raise ShimError(f"no such unit {name} (LoadState={props.get('LoadState') or 'unknown'}"
                        f"{'' if user else '; a unit of your user manager: add --user'})", EXIT_CONTROL)
    given = control_option(props.get("ExecStart", ""))
    if given:
        return Target(given, name)
    runtime = props.get("RuntimeDirectory", "").split()
    if not runtime:
        raise ShimError(f"{name} has no RuntimeDirectory= and its ExecStart= no --control: add "
                        "RuntimeDirectory= to the unit (the shim puts control.sock there)", EXIT_CONTROL)
    if user:
        base = os.environ.get("XDG_RUNTIME_DIR")
        if not base:
            raise ShimError("--user: XDG_RUNTIME_DIR is not set (it is where a user manager's "
                            "RuntimeDirectory= lives)", EXIT_CONTROL)
    else:
        base = "/run"
    return Target(os.path.join(base, runtime[0], SOCKET_NAME), name)


def systemctl_show(unit: str, user: bool, props: tuple) -> Dict[str, str]:
    import subprocess
    argv = ["systemctl", *(["--user"] if user else []), "show", "-p", ",".join(props), "--", unit]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ShimError(f"--unit {unit}: cannot ask systemd ({' '.join(argv)}): {e}", EXIT_CONTROL) from None
    if out.returncode != 0:
        why = "; ".join(out.stderr.split("\n")).strip("; ") or f"exit status {out.returncode}"
        raise ShimError(f"--unit {unit}: {' '.join(argv)}: {why}", EXIT_CONTROL)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def control_option(exec_start: str) -> Optional[str]:
    """--control PATH from `systemctl show -p ExecStart` ("{ path=... ; argv[]=... ; ... }"),
    when the unit's shim runs with one."""
    argv = exec_start.partition("argv[]=")[2].partition(" ; ")[0].split()
    if "run" not in argv:
        return None
    for i, word in enumerate(argv):
        if word == "--":
            break
        if word == "--control" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--control="):
            return word[len("--control="):]
    return None


def permission_hint(path: str, unit: Optional[str]) -> str:
    """Permission denied, with who may connect and how to become one of them."""
    import grp
    import pwd
    owner = os.path.dirname(path)
    try:
        st = os.stat(path)
    except OSError:
        try:
            st = os.stat(owner)
        except OSError:
            return f"cannot talk to the shim on {path}: Permission denied"
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    reload = f"systemctl reload {unit}" if unit else "systemctl reload UNIT"
    return (f"cannot talk to the shim on {path}: Permission denied (uid {os.getuid()}): only root and "
            f"its user {user} may, and group {group} when the shim runs with --control-mode 0660 "
            f"(RuntimeDirectoryMode= must let the group in too). Run it as {user} "
            f"(sudo -u {user} unicorn-shim ...), or as root ({reload}); to let a deploy user do just "
            f"that, see the sudoers example in {EXAMPLES}")


# -- the wire ------------------------------------------------------------------

def request(path: Optional[str], command: Dict[str, Any], timeout: Optional[float]) -> Dict[str, Any]:
    """Send one command and wait for its answer (one JSON object per line each way).
    PermissionError and FileNotFoundError are left to the caller, which knows what to advise."""
    if not path:
        raise ShimError("cannot find the shim's control socket: RUNTIME_DIRECTORY is not set "
                        "(add RuntimeDirectory= to the unit) and no --control was given", EXIT_CONTROL)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        try:
            sock.sendall(json.dumps(command).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # The shim may answer and close before reading us (a refused peer): its
            # answer is already queued on our side, so read it rather than report EPIPE.
            pass
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (FileNotFoundError, PermissionError):
        raise
    except ConnectionRefusedError:
        raise ShimError(dead_shim(os.path.dirname(path), path), EXIT_CONTROL) from None
    except socket.timeout:
        raise ShimError(f"no answer from the shim within {timeout:g} s "
                        "(the operation goes on in the shim; see journalctl)", EXIT_CONTROL) from None
    except OSError as e:
        raise ShimError(f"cannot talk to the shim on {path}: {e.strerror or e}", EXIT_CONTROL) from None
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError:
        raise ShimError("the shim closed the connection without an answer", EXIT_CONTROL) from None


# -- a shim that died ------------------------------------------------------------

SHIM_PID_FILE = "shim.pid"     # "PID START_TICKS", written by the running shim, removed when it exits


def dead_shim(runtime: str, path: str) -> str:
    """Nothing answers on the control socket: the shim was killed (its socket file
    and shim.pid stay behind). The master serves on, but nothing supervises it and
    no reload can work. Said in the error line and, from ExecReload= (NOTIFY_SOCKET
    is set with NotifyAccess=all), in the unit's STATUS=, until a restart."""
    pid = _recorded_shim(runtime)
    who = f"the shim (pid {pid})" if pid else "the shim"
    unit = _own_unit()
    restart = f"systemctl restart {unit}" if unit else "restart the service"
    master = os.environ.get("MAINPID")       # set for ExecReload=: the master systemd watches
    serving = f"master {master} serves on" if master else "the master serves on"
    status = (f"supervision lost: {who} died; {serving} unsupervised; reloads fail until a restart "
              f"({restart})")
    _tell_systemd(status)
    return f"no shim is running: nothing answers on {path} ({who} died; {serving}, but reloads " \
           f"cannot work: {restart})"


def _recorded_shim(runtime: str) -> Optional[int]:
    """The pid shim.pid names, when that process is gone (or its pid reused: the
    start time differs); None when the file is missing or the shim still runs."""
    try:
        with open(os.path.join(runtime, SHIM_PID_FILE)) as f:
            pid, start = (int(w) for w in f.read().split()[:2])
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return None if int(f.read().rpartition(")")[2].split()[19]) == start else pid
    except FileNotFoundError:
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _own_unit() -> Optional[str]:
    """The unit this client runs in (ExecReload= runs in the service's cgroup)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    name = line.strip().rsplit("/", 1)[-1]
                    return name if name.endswith(".service") else None
    except OSError:
        pass
    return None


def _tell_systemd(status: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect("\0" + path[1:] if path[0] == "@" else path)
        sock.sendall(f"STATUS={status}".encode())
    except OSError:
        pass
    finally:
        sock.close()
