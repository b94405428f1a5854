"""The rules of `unicorn-shim check` that need more than the unit's own text:
timeouts and sockets against systemd's behaviour, this machine's users and
directories as the unit's user sees them, the server's config as the server
evaluates it (shim.tooling.config_eval), and the shim's record of the last reload.
"""
from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import re
import shlex
import sys
import subprocess
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from shim.tooling import config_eval, generator
from shim.tooling.findings import CANNOT, ERROR, WARNING, Finding, last
from shim.tooling.check_setup import SYSTEMD_PATH, Setup, environment_files
from shim.tooling.placement import Place
from shim.runtime.deadline import FINISH_MARGIN
from shim.runtime.readiness import hook_environment
from shim.runtime.release import config_through
from shim.runtime.servers import ServerProfile

DEFAULT_TIMEOUT_START = 90.0      # systemd's DefaultTimeoutStartSec=
_SPAN_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "": 1.0, "s": 1.0, "sec": 1.0,
               "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
               "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0,
               "days": 86400.0}
PROBE = ("import json, os, sys\n"
         "modes = {'r': os.R_OK, 'w': os.W_OK, 'x': os.X_OK}\n"
         "print(json.dumps([os.access(p, sum(modes[c] for c in m)) for p, m in json.loads(sys.argv[1])]))")


@dataclass
class Context:
    setup: Setup
    service: Dict[str, List[str]]
    shim: argparse.Namespace          # `unicorn-shim run`'s options from ExecStart=
    command: List[str]
    profile: ServerProfile
    held: List[str]
    found: List[Finding] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)     # the master's environment, once host_rules knows it

    @property
    def upgrade(self) -> str:
        return self.shim.upgrade or self.profile.default_upgrade

    @property
    def chdir(self) -> Optional[str]:
        return os.path.normpath(self.shim.chdir) if self.shim.chdir else None

    @property
    def workdir(self) -> Optional[str]:
        value = last(self.service, "WorkingDirectory")
        return value.lstrip("-") if value else None

    @property
    def app_dir(self) -> Optional[str]:
        return self.chdir or self.workdir

    @property
    def start_dir(self) -> Optional[str]:
        """Where the shim starts a master (and what PWD says): under spawn the real
        release behind --chdir, under usr2 --chdir itself (Unicorn's re-exec follows PWD)."""
        if self.chdir and self.upgrade == "spawn":
            return os.path.realpath(self.chdir)
        return self.app_dir

    @property
    def server_command(self) -> List[str]:
        """The command as the shim runs it: a relative config file named through --chdir."""
        return config_through(self.command, self.profile.config_flags, self.chdir)

    @property
    def runtime_dirs(self) -> List[str]:
        return [os.path.join("/run", d) for v in self.service.get("RuntimeDirectory", []) for d in v.split()]

    @property
    def place(self) -> Place:
        return Place(self.setup)

    def key(self, unit_key: str) -> str:
        return self.place.key(unit_key)

    def add(self, level: str, what: str, fix: str = "") -> None:
        self.found.append(Finding(level, what, fix))


def _span(text: str) -> Optional[float]:
    """A systemd time span in seconds; None for infinity (or 0: no timeout)."""
    text = text.strip()
    if text in ("infinity", "0"):
        return None
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)\s*([a-z]*)", text):
        total += float(number) * _SPAN_UNITS.get(unit, 1.0)
    return total or None


def inside(path: str, directory: str) -> bool:
    path, directory = os.path.normpath(path), os.path.normpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


# --- rules on the unit alone ------------------------------------------------------------------

def unit_rules(ctx: Context) -> List[Finding]:
    ctx.found = []
    _timeouts(ctx)
    _sockets_in_runtime_directory(ctx)
    return ctx.found


def _timeouts(ctx: Context) -> None:
    text = last(ctx.service, "TimeoutStartSec") or last(ctx.service, "TimeoutSec")
    limit = _span(text) if text else DEFAULT_TIMEOUT_START
    if limit is None:
        return
    ready, retire = ctx.shim.ready_timeout, ctx.shim.retire_timeout
    probation = getattr(ctx.shim, "probation", 0.0)
    watched = f" + --probation {probation:g} s" if probation else ""
    setting = f"TimeoutStartSec={text or '90s (default)'}"
    fix = ctx.place.setting("TimeoutStartSec", str(generator.job_timeout(ctx.shim)))
    if retire + FINISH_MARGIN >= limit:
        ctx.add(ERROR, f"--retire-timeout {retire:g} s + {FINISH_MARGIN:g} s is not below {setting}, which "
                "also bounds ExecReload=: the shim must allow for the old master's drain before it commits, "
                "so no reload can ever finish and every one is rolled back",
                fix + ("" if ctx.place.packaged else f" (or --retire-timeout below {limit - FINISH_MARGIN:g})"))
    if ready >= limit:
        ctx.add(ERROR, f"--ready-timeout {ready:g} s is not below {setting}: systemd kills a slow start or "
                "reload before the shim can give up and say why",
                fix + ("" if ctx.place.packaged else " (or a lower --ready-timeout)"))
    elif ready + probation + retire + FINISH_MARGIN > limit and retire + FINISH_MARGIN < limit:
        ctx.add(WARNING, f"--ready-timeout {ready:g} s{watched} + --retire-timeout {retire:g} s + {FINISH_MARGIN:g} s is "
                f"more than {setting}, which also bounds ExecReload=: the shim rolls back a reload whose new "
                f"master has not passed its checks {retire + FINISH_MARGIN:g} s before it ends (systemd's reload timeout "
                "... ends in ...: rolled back)", fix)


def _sockets_in_runtime_directory(ctx: Context) -> None:
    preserve = (last(ctx.service, "RuntimeDirectoryPreserve") or "no").lower() in ("yes", "true", "1", "on")
    mode_text = last(ctx.service, "RuntimeDirectoryMode") or "0755"
    streams = ctx.setup.socket.get("Socket", {}).get("ListenStream", [])
    for address in (a for a in ctx.held if a.startswith("/")):
        for directory in (d for d in ctx.runtime_dirs if inside(address, d)):
            if address in streams and not preserve:
                # The shim re-binds a --listen socket at each start; a .socket unit's is bound once.
                ctx.add(ERROR, f"the socket {address} lives in RuntimeDirectory= {directory}, which systemd "
                        "removes when the service stops or restarts: the .socket unit stays active but "
                        "every connection fails from then on",
                        "put the socket outside the service's runtime directory (e.g. "
                        f"ListenStream=/run/{os.path.basename(address)} or a directory of its own made by "
                        "tmpfiles.d), or RuntimeDirectoryPreserve=yes")
            elif mode_text.isdigit() and not int(mode_text, 8) & 0o001:
                ctx.add(WARNING, f"the socket {address} is in {directory} (RuntimeDirectoryMode={mode_text}): "
                        "only the unit's user and group can reach it, not a web server running as www-data",
                        _socket_outside(ctx, address))


def _socket_outside(ctx: Context, address: str) -> str:
    if ctx.place.packaged:
        return (f"LISTEN=unix:/run/unicorn-shim/{ctx.setup.app}.sock in {ctx.place.conf_path} instead of --listen "
                "in SHIM_OPTIONS=: its socket unit owns it (group www-data, mode 0660; SOCKET_GROUP=, SOCKET_MODE=)")
    group = last(ctx.service, "Group") or last(ctx.service, "User") or "GROUP"
    return (f"let a .socket unit own it (ListenStream=/run/{os.path.basename(address)}, SocketGroup=www-data, "
            f"SocketMode=0660), or let the web server in through the unit's group: adduser www-data {group}, "
            "with RuntimeDirectoryMode=0750")


# --- rules on this machine --------------------------------------------------------------------

def host_rules(ctx: Context, config_rules: Any) -> List[Finding]:
    """`config_rules`: check_config.ConfigRules, the rules on the server's evaluated config."""
    ctx.found = []
    run_as, unknown = _run_as(ctx)
    env, env_uncertain = _environment(ctx, run_as)
    ctx.env = env
    _directories(ctx, run_as)
    _server_command(ctx, run_as, env)
    if ctx.shim.pid_file:
        writable_dir(ctx, run_as, ctx.shim.pid_file, "--pid-file")
    if ctx.app_dir is None or os.path.isdir(ctx.app_dir):
        if run_as is None:
            evaluation = config_eval.refused(ctx.profile, unknown, _by_hand(ctx, env, unknown))
        else:
            evaluation = config_eval.evaluate(ctx.profile, ctx.server_command, ctx.start_dir, env, run_as)
        config_rules(ctx, run_as, evaluation, env_uncertain, env).run()
    return ctx.found


def _run_as(ctx: Context) -> Tuple[Optional[config_eval.RunAs], str]:
    """The unit's user, or (None, why it cannot be told here)."""
    if (last(ctx.service, "DynamicUser") or "no").lower() in ("yes", "true", "1", "on"):
        ctx.add(CANNOT, "DynamicUser=: the unit's user exists only while it runs; what it may read and write "
                "is not checked")
        return None, "DynamicUser=yes: the unit's user exists only while it runs"
    user = last(ctx.service, "User") or "root"
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        ctx.add(ERROR, f"User={user}: no such user; systemd fails the start with status=217/USER",
                f"adduser --system --group --home /srv/{user} {user} (or correct {ctx.key('User')})")
        return None, f"User={user} is no user on this machine"
    group = last(ctx.service, "Group")
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            ctx.add(ERROR, f"Group={group}: no such group; systemd fails the start with status=216/GROUP",
                    f"addgroup --system {group} (or correct {ctx.key('Group')})")
            return None, f"Group={group} is no group on this machine"
    extra = []
    for value in ctx.service.get("SupplementaryGroups", []):
        for name in value.split():
            try:
                extra.append(grp.getgrnam(name).gr_gid)
            except KeyError:
                ctx.add(ERROR, f"SupplementaryGroups={name}: no such group; systemd fails the start with "
                        "status=216/GROUP", f"addgroup --system {name}")
    extra += [g for g in os.getgrouplist(entry.pw_name, gid) if g not in extra]
    run_as = config_eval.RunAs(entry.pw_name, entry.pw_uid, gid, extra)
    if not run_as.can_switch:
        ctx.add(CANNOT, f"what {entry.pw_name} may read, write and run: this check runs as uid {os.geteuid()} "
                "and cannot become it", "run the check as root")
    return run_as, ""


def _by_hand(ctx: Context, env: Dict[str, str], unknown: str) -> str:
    """How an operator sees the config load as the unit's own user, where check will not run it
    (`unknown`: why _run_as could not tell who that is)."""
    key = unknown.split("=", 1)[0]
    if key != "DynamicUser":       # User= or Group=, not on this machine
        return f"correct {ctx.key(key)} (or create that {key.lower()}), then check again"
    argv, _why = config_eval.evaluator_argv(ctx.profile, ctx.server_command, ctx.start_dir, env)
    if argv is None:
        return (f"start it where a failure costs nothing (systemctl start {ctx.setup.name or 'UNIT'}) "
                f"and read journalctl -u {ctx.setup.name or 'UNIT'}")
    words = ["systemd-run", "--wait", "--pipe", "-p", "DynamicUser=yes",
             *[f"-p{key}={value}" for key in ("EnvironmentFile", "Environment")
               for value in ctx.service.get(key, [])],
             *[f"-E{key}={value}" for key, value in hook_environment({}).items()],
             f"--working-directory={ctx.start_dir or '/'}", "--", *argv]
    return "run what check would, as a dynamic user (it prints the config as the server loads it): " + \
        shlex.join(words)


def _environment(ctx: Context, run_as: Optional[config_eval.RunAs]) -> Tuple[Dict[str, str], bool]:
    """What the shim's master will see: systemd's environment for the unit plus the shim's additions.
    Also whether it may hold more than this (PassEnvironment=, an unreadable EnvironmentFile=)."""
    env = {"PATH": SYSTEMD_PATH, "LANG": os.environ.get("LANG", "C.UTF-8")}
    if run_as:
        entry = pwd.getpwuid(run_as.uid)
        env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name, SHELL=entry.pw_shell)
    if ctx.runtime_dirs:
        env["RUNTIME_DIRECTORY"] = ":".join(ctx.runtime_dirs)
    unit_env, unread = environment_files(ctx.service)
    env.update(unit_env)
    env.update(hook_environment(env))
    if ctx.chdir:
        env["PWD"] = ctx.start_dir or ctx.chdir
    for path in unread:
        if not os.path.exists(path):
            ctx.add(ERROR, f"EnvironmentFile={path} does not exist: systemd fails the start",
                    f"create it, or EnvironmentFile=-{path} if it is optional")
        else:
            ctx.add(CANNOT, f"EnvironmentFile={path} cannot be read here: the config was evaluated without it",
                    "run the check as root")
    return env, bool(unread or ctx.service.get("PassEnvironment"))


def _probe(run_as: Optional[config_eval.RunAs], checks: List[Tuple[str, str]]) -> Optional[List[bool]]:
    """os.access for each (path, "rwx" letters) as the unit's user; None if this process cannot tell."""
    if run_as is None or not run_as.can_switch:
        return None
    try:
        r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(checks)], capture_output=True, text=True,
                           timeout=10, cwd="/", **run_as.popen_args())
        return json.loads(r.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _directories(ctx: Context, run_as: Optional[config_eval.RunAs]) -> None:
    workdir = ctx.workdir
    raw = last(ctx.service, "WorkingDirectory") or ""
    if workdir and workdir != "~" and not raw.startswith("-") and not os.path.isdir(workdir):
        ctx.add(ERROR, f"WorkingDirectory={workdir} does not exist: systemd fails the start with status=200/CHDIR",
                "create it, or correct WorkingDirectory= (a `-` prefix makes it optional)")
    chdir = ctx.chdir
    if chdir is None:
        if workdir and os.path.islink(workdir):
            ctx.add(ERROR, f"no --chdir, and WorkingDirectory={workdir} is a symlink: every new master starts "
                    f"in the release it pointed to when the service started, so no deploy takes effect",
                    f"--chdir {workdir} in ExecStart= (SHIM_OPTIONS= in the packaged conf)")
        else:
            ctx.add(CANNOT, "without --chdir, whether a new master serves the release you deployed cannot be "
                    "verified (by the shim or here)",
                    "--chdir /srv/APP/current in ExecStart= (the `current` symlink of your deploys)")
        return
    if not os.path.isdir(chdir):
        ctx.add(ERROR, f"--chdir {chdir}: not a directory (the shim refuses to start)",
                "deploy a release and point the symlink at it, or correct " + ctx.place.key("WorkingDirectory")
                if ctx.place.packaged else "deploy a release and point the symlink at it, or correct --chdir")
        return
    allowed = _probe(run_as, [(chdir, "rx")])
    if run_as and allowed is not None and not allowed[0]:
        ctx.add(ERROR, f"--chdir {chdir}: {run_as.name} cannot enter it or read it",
                f"chown -R {run_as.name} the release, or chmod o+rx its parent directories")


def _server_command(ctx: Context, run_as: Optional[config_eval.RunAs], env: Dict[str, str]) -> None:
    word = ctx.command[0]
    path = config_eval.resolve_executable(word, ctx.app_dir, env.get("PATH", SYSTEMD_PATH))
    where = f"in {ctx.app_dir}" if "/" in word and not os.path.isabs(word) else f"on PATH={env['PATH']}"
    if not path or not os.path.exists(path):
        ctx.add(ERROR, f"the server command {word!r} does not exist {where}: the shim exits 5 at start",
                ctx.place.command("its path relative to the release (e.g. venv/bin/gunicorn, bin/unicorn) or "
                                  "its absolute path") +
                (f", or ENV_PATH= in {ctx.place.conf_path}" if ctx.place.packaged else ", or PATH in Environment="))
        return
    allowed = _probe(run_as, [(path, "x")])
    if (allowed is not None and not allowed[0]) or (allowed is None and not os.access(path, os.X_OK)):
        ctx.add(ERROR, f"the server command {path} is not executable"
                f"{' by ' + run_as.name if run_as else ''}: the shim exits 5 at start", f"chmod +x {path}")


def writable_dir(ctx: Context, run_as: Optional[config_eval.RunAs], path: str, what: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if any(inside(directory, d) for d in ctx.runtime_dirs):
        return          # systemd creates it for the unit's user at each start
    if not os.path.isdir(directory):
        ctx.add(ERROR, f"{what} {path}: the directory {directory} does not exist",
                f"mkdir -p {directory} && chown {run_as.name if run_as else 'USER'} {directory}, or a path in "
                + (f"/run/unicorn-shim/{ctx.setup.app}/, the service's runtime directory" if ctx.place.packaged
                   else "the unit's RuntimeDirectory="))
        return
    allowed = _probe(run_as, [(directory, "wx")])
    if allowed is not None and not allowed[0] and run_as:
        ctx.add(ERROR, f"{what} {path}: {run_as.name} cannot write in {directory}",
                f"chown {run_as.name} {directory}")
