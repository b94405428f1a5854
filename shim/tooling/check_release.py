"""`unicorn-shim check`'s rules on the release: what the shim recorded of its last
start or reload (state.json in its state directory), and a server command that
ignores the release's virtualenv or pins one release for good."""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional

from shim.runtime import procs
from shim.runtime.supervisor import SHIM_PID_FILE
from shim.tooling.check_rules import Context, inside
from shim.tooling.check_setup import SYSTEMD_PATH
from shim.tooling.findings import CANNOT, ERROR, WARNING, Finding

STATE_ROOT = "/var/lib/unicorn-shim"
# Ruby 3.2 removed File.exists? (and Dir.exists?): the classic guides' before_fork calls it.
RUBY_32_GONE = re.compile(r"undefined method [`']exists\?' for (?:class )?(?:File|Dir)\b|\b(?:File|Dir)\.exists\?")
GONE_NOTE = "File.exists? is gone since Ruby 3.2 (the classic config's before_fork calls it)"
PYTHON_WORDS = ("gunicorn", "gunicorn3", "python", "python3")


def release_rules(ctx: Context) -> List[Finding]:
    ctx.found = []
    _server_command(ctx)
    last_release(ctx)
    return ctx.found


def shim_running(ctx: Context) -> bool:
    """Whether the unit's shim runs now: its shim.pid names a live process started when it says."""
    for directory in ctx.runtime_dirs:
        try:
            with open(os.path.join(directory, SHIM_PID_FILE)) as f:
                pid, start = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        if pid.isdigit() and str(procs.start_time(int(pid))) == start:
            return True
    return False


MAX_STATE = 65536      # the shim itself reads no more of state.json


def last_release(ctx: Context) -> None:
    if not ctx.chdir or not os.path.isdir(ctx.chdir):
        return
    path = state_file(ctx)
    question = f"whether {ctx.chdir} points at a release that failed its last start or reload"
    try:
        with open(path) as f:
            state: Dict[str, Any] = json.loads(f.read(MAX_STATE))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        ctx.add(CANNOT, f"{question}: no record at {path} (none yet, or the shim has not run this app)")
        return
    except (OSError, ValueError, RecursionError) as e:     # RecursionError: a file nested deeper than json goes
        ctx.add(CANNOT, f"{question}: {path}: {type(e).__name__}: {e}")
        return
    real = os.path.realpath(ctx.chdir)
    failed, good = state.get("last_failed_release"), state.get("last_good_release")
    if not failed or os.path.realpath(failed) != real or (good and os.path.realpath(good) == real):
        return
    reason = str(state.get("last_failed_reason") or "")
    gone = bool(RUBY_32_GONE.search(reason))
    running = shim_running(ctx)
    unit = ctx.setup.name or "the service"
    what = f"{ctx.chdir} points at {real}, the release whose last start or reload failed"
    if reason:
        what += f" ({reason}{'; ' + GONE_NOTE if gone else ''})"
    if running:
        what += (f"; the running master serves {good}" if good else "") + \
            ": a restart or reboot would start the broken release"
    else:
        what += f"; no shim is running: `systemctl start {unit}` would start the broken release first"
    fixed = ("deploy a release whose config calls File.exist? instead" if gone else "deploy a fixed release")
    fix = f"{fixed}, then systemctl {'reload' if running else 'start'} {unit}"
    if good:
        flip = f"ln -sfn {good} {ctx.chdir}.tmp && mv -T {ctx.chdir}.tmp {ctx.chdir}"
        fix = f"flip it back: {flip}{'' if running else f', then systemctl start {unit}'}; or {fix}"
    ctx.add(ERROR, what, fix)


def state_file(ctx: Context) -> str:
    if os.environ.get("STATE_DIRECTORY"):
        return os.path.join(os.environ["STATE_DIRECTORY"].split(":")[0], "state.json")
    state_dirs = [d for v in ctx.service.get("StateDirectory", []) for d in v.split()]
    if state_dirs:
        return os.path.join("/var/lib", state_dirs[0], "state.json")
    name = ctx.setup.app or (ctx.setup.name or "app").rsplit(".", 1)[0]
    return os.path.join(STATE_ROOT, name, "state.json")


def _server_command(ctx: Context) -> None:
    word = ctx.command[0]
    if not ctx.chdir or not os.path.isdir(ctx.chdir):
        return
    release = os.path.realpath(ctx.chdir)
    if "/" not in word:
        _bare_name_beside_a_venv(ctx, word, release)
    elif os.path.isabs(word) and os.path.islink(ctx.chdir) and not inside(word, ctx.chdir):
        _pinned_release(ctx, word, release)


def _virtualenvs(release: str) -> List[str]:
    try:
        names = sorted(os.listdir(release))
    except OSError:
        return []
    return [n for n in names if os.path.isfile(os.path.join(release, n, "pyvenv.cfg"))]


def _bare_name_beside_a_venv(ctx: Context, word: str, release: str) -> None:
    """Measured: a bare `gunicorn` is found on the unit's PATH (/usr/bin/gunicorn, the
    system's Python and packages) whatever virtualenv the release has."""
    if os.path.basename(word) not in PYTHON_WORDS:
        return
    venvs = _virtualenvs(release)
    found: Optional[str] = shutil.which(word, path=ctx.env.get("PATH", SYSTEMD_PATH))
    if not venvs or not found or inside(os.path.realpath(found), release):
        return
    venv = venvs[0]
    own = os.path.join(venv, "bin", word)
    if os.path.exists(os.path.join(release, own)):
        replacement = own
    else:       # e.g. a venv made with --system-site-packages, where pip installs no gunicorn of its own
        replacement = f"{venv}/bin/python3 -m gunicorn" if word.startswith("gunicorn") else os.path.join(venv, "bin",
                                                                                                          "python3")
    rest = " ".join(ctx.command[1:])
    ctx.add(WARNING, f"the server command {word!r} is {found}, found on the unit's PATH: the master runs the "
            f"system's Python and packages, not those of the release's virtualenv {venv}/",
            ctx.place.command(f"{replacement} {rest}".strip()) +
            " (a path relative to the release: the shim resolves it in each release it starts)")


def _pinned_release(ctx: Context, word: str, release: str) -> None:
    """An absolute path into releases/rN: every master runs rN's server (and its
    virtualenv's packages or its bundle) whatever `current` names."""
    releases = os.path.dirname(release)
    real = os.path.realpath(word)
    if not inside(real, releases) or real == releases:
        return
    pinned = os.path.join(releases, os.path.relpath(real, releases).split(os.sep)[0])
    within = os.path.relpath(real, pinned)
    now = "the release current points at now" if pinned == release else "not the release current points at"
    rest = " ".join(ctx.command[1:])
    ctx.add(ERROR, f"the server command {word} is in {pinned}, {now}: every master runs that release's "
            f"{os.path.basename(word)} and its packages whatever {ctx.chdir} names, and none starts once "
            "that release is removed",
            ctx.place.command(f"{within} {rest}".strip()) +
            " (relative to the release: the shim resolves it in each release it starts)")
