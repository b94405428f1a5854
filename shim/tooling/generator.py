"""systemd generator: /etc/unicorn-shim/APP.conf -> drop-ins for the templated
units unicorn-shim@APP.service and unicorn-shim@APP.socket.

Some settings a config file must decide cannot come from an EnvironmentFile=
(User=, WorkingDirectory=, a socket's ListenStream=), so they are written as
drop-ins each time systemd loads its units (boot, daemon-reload). Installed as
/usr/lib/systemd/system-generators/unicorn-shim-generator.

APP.conf, shell-style KEY=VALUE lines (an unknown key is an error):
    APP_DIR=/srv/myapp/current          # required: the release directory (a symlink is fine)
    SERVER_COMMAND=bundle exec --keep-file-descriptors unicorn -c config/unicorn.rb -E production
    LISTEN=127.0.0.1:8080               # required: one or more, space-separated (or unix:/path)
    USER=myapp                          # default: the app's name
    GROUP=myapp                         # default: USER
    PID_FILE=/run/unicorn-shim/myapp/server.pid   # must match the server's config
    SHIM_OPTIONS=--ready-timeout 120    # more `unicorn-shim run` options (TimeoutStartSec= follows them)
    FALLBACK=no                         # never boot the last good release instead (default yes)
    ENV_SECRET_KEY_BASE=...             # Environment=SECRET_KEY_BASE=... for the server
    ENVIRONMENT_FILE=/etc/myapp.env     # EnvironmentFile= (a leading - : optional)
    SOCKET_USER=, SOCKET_GROUP=, SOCKET_MODE=   # unix sockets: default USER, www-data, 0660

TimeoutStartSec=, which also bounds each `systemctl reload`, is derived from
SHIM_OPTIONS=: --ready-timeout + --retire-timeout + 30 s, or + --probation + 12 s
when that is more (150 by default), so that systemd never kills a start or reload
the shim is still working on.

Values are escaped for systemd (`%`, `$`, quotes, backslashes): what the conf
says is what the server gets. Control characters are refused.
"""
from __future__ import annotations

import argparse
import contextlib
import grp
import io
import os
import re
import shlex
import stat
import sys
from typing import Dict, List, Optional, Tuple

from shim.runtime import servers
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


KEYS = {"APP_DIR", "SERVER_COMMAND", "LISTEN", "USER", "GROUP", "PID_FILE", "SHIM_OPTIONS", "FALLBACK",
        "SERVER", "ENVIRONMENT_FILE", "SOCKET_USER", "SOCKET_GROUP", "SOCKET_MODE"}
ENV_PREFIX = "ENV_"
COMMANDS = ("SERVER_COMMAND", "SHIM_OPTIONS")
# Debian's nginx and Apache run as www-data: a unix socket they can reach by default.
WEB_SERVER_GROUP = "www-data"
# What a start or reload job needs beyond the shim's own timeouts: the master's exec, the shim's answer.
JOB_MARGIN = 30


def run_options(words: List[str]) -> Tuple[Optional[argparse.Namespace], str]:
    """`unicorn-shim run WORDS` as its own parser reads them, or (None, its complaint)."""
    from shim.options import build_parser
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(["run", *words])
    except SystemExit:
        return None, (err.getvalue().strip().splitlines() or ["invalid options"])[-1]
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return args, ""


def job_timeout(options: argparse.Namespace) -> int:
    """The TimeoutStartSec= (seconds) under which systemd never cuts a start or reload the shim is still in."""
    # the margin covers a probation up to 18 s beside the 2 s the shim keeps to finish
    margin = max(JOB_MARGIN, getattr(options, "probation", 0.0) + 12)
    return int(options.ready_timeout + options.retire_timeout + margin)


def parse_conf(text: str) -> Dict[str, str]:
    conf = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ConfError(f"line {number}: expected KEY=VALUE")
        if key not in KEYS and not (key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX)):
            raise ConfError(f"line {number}: unknown key {key} (known: {', '.join(sorted(KEYS))}, "
                            f"{ENV_PREFIX}NAME for an environment variable)")
        words = shlex.split(value, comments=True)
        conf[key] = " ".join(words) if key not in COMMANDS else " ".join(shlex.quote(w) for w in words)
        _reject_control(key, conf[key])
    return conf


def _reject_control(key: str, value: str) -> None:
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ConfError(f"{key}= has a control character (a newline, a tab...): not allowed")


# What systemd would interpret in a unit file's value, escaped (systemd.syntax(7),
# systemd.unit(5) "Specifiers", systemd.service(5) "Command lines").
def _specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _plain(key: str, value: str) -> str:
    """A value systemd takes verbatim but for specifiers: a backslash cannot be
    written there (a trailing one continues the line and swallows the next directive)."""
    _reject_control(key, value)
    if "\\" in value:
        raise ConfError(f"{key}={value}: a backslash is not allowed here")
    if value != value.strip():
        raise ConfError(f"{key}={value!r}: leading or trailing blanks are not allowed")
    return _specifiers(value)


def _path(key: str, value: str) -> str:
    if not value.startswith("/"):
        raise ConfError(f"{key}={value}: an absolute path is required")
    return _plain(key, value)


def _name(key: str, value: str) -> str:
    """A user or group: the names useradd accepts, or a number."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]+", value):
        raise ConfError(f"{key}={value}: not a user or group name")
    return value


def _quoted(value: str) -> str:
    """One word in double quotes, C-escaped: what systemd unquotes back to `value`."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _exec_word(word: str) -> str:
    """One argument of ExecStart=: `$` is doubled (no variable expansion), `%` too
    (no specifier), and anything else systemd would split or unquote is quoted."""
    _reject_control("ExecStart", word)
    word = _specifiers(word).replace("$", "$$")
    if word and re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", word) and word != ";":
        return word
    return _quoted(word)


def _environment(name: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfError(f"{ENV_PREFIX}{name}: not a valid environment variable name")
    return "Environment=" + _quoted(_specifiers(f"{name}={value}"))


def _runtime_directory(app: str) -> str:
    return f"/run/unicorn-shim/{app}/"


def _listen_stream(app: str, address: str) -> str:
    if not address.startswith("unix:"):
        return _plain("LISTEN", address)
    path = address[len("unix:"):]
    if os.path.normpath(path).startswith(_runtime_directory(app)):
        raise ConfError(f"LISTEN={address}: {_runtime_directory(app)} is the service's RuntimeDirectory=, "
                        f"removed with the service while its socket unit stays active; "
                        f"use e.g. unix:/run/unicorn-shim/{app}.sock")
    return _path("LISTEN", path)


def _socket_group(conf: Dict[str, str], group: str) -> str:
    if "SOCKET_GROUP" in conf:
        return _name("SOCKET_GROUP", conf["SOCKET_GROUP"])
    try:
        grp.getgrnam(WEB_SERVER_GROUP)
        return WEB_SERVER_GROUP
    except KeyError:
        return group


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
    user = _name("USER", conf.get("USER", app))
    group = _name("GROUP", conf.get("GROUP", user))
    app_dir = _path("APP_DIR", conf["APP_DIR"])
    pid_file = conf.get("PID_FILE", f"/run/unicorn-shim/{app}/server.pid")
    _path("PID_FILE", pid_file)
    fallback = conf.get("FALLBACK", "yes").lower()
    if fallback not in ("yes", "no"):
        raise ConfError(f"FALLBACK={conf['FALLBACK']}: expected yes or no")
    argv = [SHIM, "run", "--pid-file", pid_file, "--chdir", conf["APP_DIR"],
            *(["--no-fallback"] if fallback == "no" else []),
            *shlex.split(conf.get("SHIM_OPTIONS", "")), "--", *command]
    options, why = run_options(argv[2:])
    if options is None:
        raise ConfError(f"SHIM_OPTIONS={conf.get('SHIM_OPTIONS', '')}: unicorn-shim run would refuse it: {why}")
    environment = [_environment(key[len(ENV_PREFIX):], value) for key, value in sorted(conf.items())
                   if key.startswith(ENV_PREFIX)]
    if conf.get("ENVIRONMENT_FILE"):
        optional = conf["ENVIRONMENT_FILE"].startswith("-")
        environment.append("EnvironmentFile=" + "-" * optional +
                           _path("ENVIRONMENT_FILE", conf["ENVIRONMENT_FILE"].lstrip("-")))
    service = "\n".join([
        f"# generated from {CONF_DIR}/{app}.conf by unicorn-shim-generator", "[Service]",
        f"User={user}", f"Group={group}", f"WorkingDirectory={app_dir}", *environment,
        f"KillSignal={profile.graceful_stop.name}", f"TimeoutStartSec={job_timeout(options)}",
        "ExecStart=", "ExecStart=" + " ".join(_exec_word(w) for w in argv), ""])
    streams = [_listen_stream(app, a) for a in conf["LISTEN"].split()]
    mode = conf.get("SOCKET_MODE", "0660")
    if not re.fullmatch(r"0?[0-7]{3}", mode):
        raise ConfError(f"SOCKET_MODE={mode}: expected an octal mode such as 0660")
    owner = [f"SocketUser={_name('SOCKET_USER', conf.get('SOCKET_USER', user))}",
             f"SocketGroup={_socket_group(conf, group)}", f"SocketMode={mode.zfill(4)}"]
    socket = "\n".join([
        f"# generated from {CONF_DIR}/{app}.conf by unicorn-shim-generator", "[Socket]", "ListenStream=",
        *[f"ListenStream={s}" for s in streams],
        *(owner if any(s.startswith("/") for s in streams) else []), ""])
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
