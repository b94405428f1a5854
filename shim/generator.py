"""systemd generator: /etc/unicorn-shim/APP.conf -> drop-ins for the templated
units unicorn-shim@APP.service and unicorn-shim@APP.socket.

Some settings a config file must decide cannot come from an EnvironmentFile=
(User=, WorkingDirectory=, a socket's ListenStream=), so they are written as
drop-ins each time systemd loads its units (boot, daemon-reload). Installed as
/usr/lib/systemd/system-generators/unicorn-shim-generator.

APP.conf, shell-style KEY=VALUE lines:
    APP_DIR=/srv/myapp/current          # required: the release directory (a symlink is fine)
    SERVER_COMMAND=bundle exec --keep-file-descriptors unicorn -c config/unicorn.rb -E production
    LISTEN=127.0.0.1:8080               # required: one or more, space-separated (or unix:/path)
    USER=myapp                          # default: the app's name
    GROUP=myapp                         # default: USER
    PID_FILE=/run/unicorn-shim/myapp/server.pid   # must match the server's config
    SHIM_OPTIONS=--ready-timeout 120    # more `unicorn-shim run` options
    FALLBACK=no                         # never boot the last good release instead (default yes)
"""
from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from typing import Dict, List

from shim import servers
from shim.errors import ShimError

try:
    from systemd import journal as _journal
except ImportError:   # pragma: no cover - exercised where python3-systemd is absent
    _journal = None

CONF_DIR = "/etc/unicorn-shim"
SHIM = "/usr/bin/unicorn-shim"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DROPIN = "50-unicorn-shim-conf.conf"


class ConfError(Exception):
    pass


def parse_conf(text: str) -> Dict[str, str]:
    conf = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.match(r"^[A-Z_]+$", key):
            raise ConfError(f"line {number}: expected KEY=VALUE")
        words = shlex.split(value, comments=True)
        conf[key] = " ".join(words) if key not in ("SERVER_COMMAND", "SHIM_OPTIONS") else \
            " ".join(shlex.quote(w) for w in words)
    return conf


def _unit_escape(text: str) -> str:
    return text.replace("%", "%%")


def dropins(app: str, conf: Dict[str, str]) -> Dict[str, str]:
    """{relative path: text} for one app."""
    for key in ("APP_DIR", "SERVER_COMMAND", "LISTEN"):
        if not conf.get(key):
            raise ConfError(f"{key}= is missing")
    command = shlex.split(conf["SERVER_COMMAND"])
    try:
        profile = servers.detect(command, conf.get("SERVER") or None)
    except ShimError as e:
        raise ConfError(str(e)) from None
    user = conf.get("USER", app)
    group = conf.get("GROUP", user)
    pid_file = conf.get("PID_FILE", f"/run/unicorn-shim/{app}/server.pid")
    listen: List[str] = conf["LISTEN"].split()
    fallback = conf.get("FALLBACK", "yes").lower()
    if fallback not in ("yes", "no"):
        raise ConfError(f"FALLBACK={conf['FALLBACK']}: expected yes or no")
    exec_start = " ".join([SHIM, "run", "--pid-file", shlex.quote(pid_file), "--chdir",
                           shlex.quote(conf["APP_DIR"]), "--no-fallback" if fallback == "no" else "",
                           conf.get("SHIM_OPTIONS", ""), "--",
                           conf["SERVER_COMMAND"]])
    service = "\n".join([
        f"# generated from {CONF_DIR}/{app}.conf by unicorn-shim-generator", "[Service]",
        f"User={user}", f"Group={group}", f"WorkingDirectory={conf['APP_DIR']}",
        f"KillSignal={profile.graceful_stop.name}",
        "ExecStart=", f"ExecStart={_unit_escape(' '.join(exec_start.split()))}", ""])
    streams = [a[len("unix:"):] if a.startswith("unix:") else a for a in listen]
    socket = "\n".join([
        f"# generated from {CONF_DIR}/{app}.conf by unicorn-shim-generator", "[Socket]", "ListenStream=",
        *[f"ListenStream={_unit_escape(s)}" for s in streams],
        *([f"SocketUser={user}", f"SocketGroup={group}", "SocketMode=0660"]
          if any(s.startswith("/") for s in streams) else []), ""])
    return {f"unicorn-shim@{app}.service.d/{DROPIN}": service,
            f"unicorn-shim@{app}.socket.d/{DROPIN}": socket}


def generate(conf_dir: str, out_dir: str) -> List[str]:
    """Write the drop-ins; return the problems (one line each) for the log."""
    problems = []
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return problems
    for name in names:
        if not name.endswith(".conf"):
            continue
        app = name[:-len(".conf")]
        try:
            if not NAME.match(app):
                raise ConfError("the app's name may only have letters, digits, _ . -")
            with open(os.path.join(conf_dir, name)) as f:
                files = dropins(app, parse_conf(f.read()))
        except (ConfError, OSError, ValueError) as e:
            problems.append(f"unicorn-shim-generator: {conf_dir}/{name}: {e}; unicorn-shim@{app} not configured")
            continue
        for rel, text in files.items():
            path = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    return problems


KMSG = "/dev/kmsg"
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def report(problems: List[str]) -> None:
    """Generators run before the journal may be up: the kernel log always is, where
    there is one (journald reads it: `journalctl -t unicorn-shim-generator`).

    A container has no /dev/kmsg device: opening the path to write would create a
    plain file nobody reads, so it is opened without O_CREAT and used only when it
    is the character device. There the journal takes the line (a daemon-reload
    runs with journald up); stderr is the last resort: PID 1 may point it at
    /dev/null."""
    if not problems:
        return
    try:
        fd = os.open(KMSG, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0 and not stat.S_ISCHR(os.fstat(fd).st_mode):
        os.close(fd)
        fd = -1
    try:
        for problem in problems:
            if not (_to_kmsg(fd, problem) or _to_journal(problem)):
                print(problem, file=sys.stderr)
    finally:
        if fd >= 0:
            os.close(fd)


def _to_kmsg(fd: int, problem: str) -> bool:
    try:
        return fd >= 0 and os.write(fd, f"<4>{problem}\n".encode()) > 0
    except OSError:
        return False


def _to_journal(problem: str) -> bool:
    if _journal is None or not os.path.exists(JOURNAL_SOCKET):
        return False
    try:
        _journal.send(problem, SYSLOG_IDENTIFIER="unicorn-shim-generator", PRIORITY=4)
        return True
    except OSError:
        return False


def main(argv: List[str]) -> int:
    if len(argv) < 2:
        print("usage: unicorn-shim-generator NORMAL_DIR [EARLY_DIR LATE_DIR]", file=sys.stderr)
        return 2
    report(generate(os.environ.get("UNICORN_SHIM_CONF_DIR", CONF_DIR), argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
