"""The server's configuration as the server itself sees it, for `unicorn-shim check`.

A regex over a Unicorn config cannot see `APP_PATH + '/tmp/pids/unicorn.pid'`,
`ENV.fetch("LISTEN", ...)` or where `File.expand_path('../..', __FILE__)`
lands. So the config is loaded by the server's own code (Unicorn's
Configurator, Gunicorn's config loader) in a short-lived process run the way
the shim will run the master: as the unit's user, in the app directory, with
the unit's environment plus what the shim adds. Nothing is bound and no app
is loaded. Whatever cannot be evaluated comes back as a reason, never as a
guess.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from shim.runtime.readiness import HOOKS_DIR
from shim.runtime.servers import ServerProfile

MARK = "unicorn-shim-eval: "
TIMEOUT = 20.0
UNICORN_WORDS = ("unicorn", "unicorn_rails")
GUNICORN_WORDS = ("gunicorn", "gunicorn3")
RUBY_SERVERS = {"unicorn": (UNICORN_WORDS, ("-E", "--env"), []),
                "puma": (("puma",), ("-e", "--environment"), ["--puma"])}   # words, env flags, evaluator mode
EVALUATED = ("unicorn", "gunicorn", "puma")   # the servers whose config check loads with their own code


@dataclass
class RunAs:
    """Who runs the server's master, and whether this process can become it.

    Release code (the server's config, a Gemfile) is run only as this user: as
    root with the unit's groups, gid and uid set before the exec, or by the
    user itself. Anyone else would run it with privileges the service lacks."""
    name: str
    uid: int
    gid: int
    groups: List[int] = field(default_factory=list)

    @property
    def can_switch(self) -> bool:
        return os.geteuid() == 0 or os.geteuid() == self.uid

    def popen_args(self) -> Dict[str, Any]:
        """subprocess's setgroups, setgid, setuid in the child, before the exec."""
        if not self.can_switch:
            raise PermissionError(f"uid {os.geteuid()} cannot become {self.name}")
        if os.geteuid() == self.uid:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups}


@dataclass
class Evaluation:
    server: str
    values: Dict[str, Any]              # the evaluator's report
    cannot: Optional[str] = None        # why nothing could be evaluated
    as_user: bool = False               # evaluated as the unit's user
    by_hand: str = ""                   # how to see it another way, when it was not evaluated

    @property
    def unset_env(self) -> List[str]:
        """Variables the config read that were not set."""
        return sorted(k for k, present in self.values.get("env_reads", {}).items() if not present)


def config_option(profile: ServerProfile, command: Sequence[str]) -> Optional[str]:
    """The server's config file as the command gives it (relative or absolute)."""
    found = None
    for i, word in enumerate(command):
        for flag in profile.config_flags:
            if word == flag and i + 1 < len(command):
                found = command[i + 1]
            elif flag.startswith("--") and word.startswith(flag + "="):
                found = word.split("=", 1)[1]
            elif not flag.startswith("--") and word.startswith(flag) and len(word) > len(flag):
                found = word[len(flag):]
    return found


def resolve_executable(word: str, app_dir: Optional[str], path: str) -> Optional[str]:
    """Where the shim will find the server command: a relative path with a
    slash (bin/unicorn, venv/bin/gunicorn) in the release, a bare name on PATH."""
    if "/" in word:
        return os.path.join(app_dir or "/", word) if not os.path.isabs(word) else word
    return shutil.which(word, path=path)


def _shebang(executable: str) -> Tuple[List[str], str]:
    try:
        with open(executable, "rb") as f:
            text = f.read(4096).decode(errors="replace")
    except OSError:
        return [], ""
    first = text.splitlines()[0] if text else ""
    return (first[2:].split() if first.startswith("#!") else []), text


def _server_index(command: Sequence[str], words: Sequence[str]) -> Optional[int]:
    for i, word in enumerate(command):
        if os.path.basename(word) in words:
            return i
    return None


def evaluator_argv(profile: ServerProfile, command: Sequence[str], app_dir: Optional[str],
                   env: Dict[str, str]) -> Tuple[Optional[List[str]], str]:
    """The command that evaluates the config with the server's interpreter, or (None, why not)."""
    path = env.get("PATH", os.defpath)
    if profile.name not in EVALUATED:
        return None, f"`check` evaluates {', '.join(EVALUATED)} configs, not {profile.name}'s"
    if profile.name in RUBY_SERVERS:
        words, env_flags, mode = RUBY_SERVERS[profile.name]
        index = _server_index(command, words)
        if index is None:
            return None, f"the command does not name {profile.name}"
        script = os.path.join(HOOKS_DIR, "ruby", "unicorn_shim_eval.rb")
        rack_env = ""
        args = list(command[index + 1:])
        for i, word in enumerate(args):
            if word in env_flags and i + 1 < len(args):
                rack_env = args[i + 1]
            elif word.startswith(env_flags[-1] + "="):
                rack_env = word.split("=", 1)[1]
        tail = [script, *mode, config_option(profile, command) or "", rack_env]
        prefix = list(command[:index])
        if prefix and os.path.basename(prefix[0]) == "bundle" and "exec" in prefix:
            bundle = resolve_executable(prefix[0], app_dir, path)
            if not bundle:
                return None, f"{prefix[0]} is not on PATH ({path})"
            gemfile = os.path.join(app_dir or ".", env.get("BUNDLE_GEMFILE") or "Gemfile")
            if os.path.exists(gemfile) and not os.path.exists(gemfile + ".lock"):
                return None, (f"no {gemfile}.lock: Bundler would resolve and write it when the master starts, "
                              "and check does not change the release (`bundle lock --local` there writes it)")
            return [bundle, *prefix[1:], "ruby", *tail], ""
        lang = "ruby"
    else:
        index = _server_index(command, GUNICORN_WORDS)
        if index is None:
            return None, "the command does not name gunicorn"
        script = os.path.join(HOOKS_DIR, "python", "unicorn_shim_eval_gunicorn.py")
        tail = [script, *command[index + 1:]]
        if index >= 2 and command[index - 1] == "-m":     # python3 -m gunicorn
            python = resolve_executable(command[index - 2], app_dir, path)
            if not python:
                return None, f"{command[index - 2]} is not on PATH ({path})"
            return [python, *tail], ""
        lang = "python"
    executable = resolve_executable(command[index], app_dir, path)
    if not executable or not os.path.exists(executable):
        return None, f"{command[index]} was not found (PATH={path}, app directory {app_dir})"
    shebang, text = _shebang(executable)
    if not shebang or not any(os.path.basename(w).startswith(lang) for w in shebang):
        return None, f"{executable} is not a {lang} script (no #! line naming {lang})"
    extra = ["-rbundler/setup"] if lang == "ruby" and "bundler/setup" in text else []
    return [*shebang, *extra, *tail], ""


def evaluate(profile: ServerProfile, command: Sequence[str], app_dir: Optional[str], env: Dict[str, str],
             run_as: RunAs, timeout: float = TIMEOUT) -> Evaluation:
    """Load the config of `command` with the server's own code, in `app_dir`, with `env`, as `run_as`
    (never as anyone else: see refused())."""
    profile_name = profile.name
    argv, why = evaluator_argv(profile, command, app_dir, env)
    if argv is None:
        return Evaluation(profile_name, {}, why)
    if not run_as.can_switch:
        return refused(profile, f"this check runs as uid {os.geteuid()} and the unit as {run_as.name}",
                       f"check as root (it evaluates as {run_as.name}), or as {run_as.name} itself")
    as_user = True
    # Bundler resolves and writes a missing Gemfile.lock: a check must not change the release.
    env = dict(env, BUNDLE_FROZEN="true")
    if app_dir and not os.path.isdir(app_dir):
        return Evaluation(profile_name, {}, f"the app directory {app_dir} does not exist")
    try:
        process = subprocess.Popen(argv, cwd=app_dir or "/", env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True, **run_as.popen_args())
    except (OSError, subprocess.SubprocessError) as e:
        return Evaluation(profile_name, {}, f"cannot run {argv[0]}: {e}", as_user)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return Evaluation(profile_name, {}, f"the config did not load within {timeout:g} s", as_user)
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            values = json.loads(line[len(MARK):])
            return Evaluation(profile_name, values, values.get("cannot"), as_user)
    lines = [line for line in err.strip().splitlines() if line.strip()] or [f"exit status {process.returncode}"]
    # Ruby prints the exception first and the backtrace after it; Python the traceback, then the exception.
    reason = lines[0] if profile_name in RUBY_SERVERS else lines[-1]
    return Evaluation(profile_name, {}, f"{' '.join(argv[:2])} failed: {reason[:300]}", as_user)


def refused(profile: ServerProfile, why: str, by_hand: str) -> Evaluation:
    """Not evaluated: the config is release code, and this check runs it only as the unit's user."""
    return Evaluation(profile.name, {}, f"not evaluated: {why}; check runs release code only as the unit's user",
                      by_hand=by_hand)
