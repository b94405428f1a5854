"""Real setups for the `unicorn-shim check` tests: a Capistrano layout
(releases/rN, shared/tmp, a `current` symlink) with a Gemfile and a
Gemfile.lock that Debian's Bundler resolves offline, in a directory the
unprivileged user `nobody` can read."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional

import pytest

from support import classic
from support.deploy import REPO, SHIM

# The config from the widely read Capistrano + Unicorn deployment guides (the one the
# release-truth tests deploy), with Bundler's gemfile reset before a re-exec.
CLASSIC_UNICORN_RB = classic.CLASSIC_UNICORN_RB.format(preload="true", before_exec=classic.BEFORE_EXEC,
                                                    quit_oldbin=classic.QUIT_OLDBIN)

UNIT = """\
[Service]
Type=notify
NotifyAccess=all
User=nobody
Group=nogroup
RuntimeDirectory=app
TimeoutStartSec=150
ExecStart=/usr/bin/unicorn-shim run --pid-file {pid_file} --chdir {current} {options} -- {command}
ExecReload=/usr/bin/unicorn-shim reload
KillSignal={kill_signal}
Restart=on-failure
{extra}
"""

_lock_text: Optional[str] = None


def gemfile_lock() -> str:
    """A Gemfile.lock for `gem "unicorn"`, resolved offline against Debian's gems, once per run."""
    global _lock_text
    if _lock_text is None:
        d = tempfile.mkdtemp()
        try:
            with open(os.path.join(d, "Gemfile"), "w") as f:
                f.write('gem "unicorn"\n')
            subprocess.run(["bundle", "lock", "--local"], cwd=d, check=True, capture_output=True, timeout=120)
            with open(os.path.join(d, "Gemfile.lock")) as f:
                _lock_text = f.read()
        finally:
            shutil.rmtree(d)
    return _lock_text


class Layout:
    """root/releases/rN + root/shared/tmp/{pids,sockets} + root/current -> releases/rN."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.current = os.path.join(root, "current")
        self.shared = os.path.join(root, "shared")
        for sub in ("tmp/pids", "tmp/sockets", "log"):
            os.makedirs(os.path.join(self.shared, sub), exist_ok=True)
        shutil.chown(os.path.join(self.shared, "tmp", "pids"), "nobody", "nogroup")

    def release(self, name: str, files: dict, flip: bool = True) -> str:
        path = os.path.join(self.root, "releases", name)
        os.makedirs(os.path.join(path, "config"), exist_ok=True)
        os.symlink(os.path.join(self.shared, "tmp"), os.path.join(path, "tmp"))
        for rel, text in files.items():
            target = os.path.join(path, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as f:
                f.write(text)
        if flip:
            tmp = self.current + ".tmp"
            os.symlink(path, tmp)
            os.replace(tmp, self.current)
        return path

    def unicorn_release(self, name: str, config: str, flip: bool = True) -> str:
        return self.release(name, {"config/unicorn.rb": config, "Gemfile": 'gem "unicorn"\n',
                                   "Gemfile.lock": gemfile_lock(), "config.ru": "run ->(e) { [200, {}, []] }\n"},
                            flip)


def world_readable_dir() -> str:
    """A temp dir the unit's user (nobody) can enter: pytest's tmp_path is root's alone."""
    d = tempfile.mkdtemp(prefix="unicorn-shim-check.")
    os.chmod(d, 0o755)
    return d


def run_check(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([SHIM, "check", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


UNITS_DIR = os.path.join(REPO, "units")


@pytest.fixture
def layout():
    root = world_readable_dir()
    yield Layout(root)
    shutil.rmtree(root)


def write_unit(layout: Layout, command: str, pid_file: str, socket: str = "", options: str = "",
               extra: str = "", kill_signal: str = "SIGQUIT") -> str:
    path = os.path.join(layout.root, "app.service")
    with open(path, "w") as f:
        f.write(UNIT.format(pid_file=pid_file, current=layout.current, options=options, command=command,
                            kill_signal=kill_signal, extra=extra))
    if socket:
        with open(os.path.join(layout.root, "app.socket"), "w") as f:
            f.write(f"[Socket]\nListenStream={socket}\n")
    return path


def errors(r) -> list:
    return [line for line in r.stdout.splitlines() if line.startswith("error:")]


def gunicorn_release(layout: Layout, name: str, config: str, venv: bool = True) -> None:
    files = {"gunicorn.conf.py": config, "app.py": "def application(env, start):\n    pass\n"}
    if venv:
        files["venv/bin/gunicorn"] = ("#!/usr/bin/python3\nimport sys\nfrom gunicorn.app.wsgiapp import run\n"
                                      "sys.exit(run())\n")
    path = layout.release(name, files)
    if venv:
        os.chmod(os.path.join(path, "venv/bin/gunicorn"), 0o755)


GUNICORN_CONF = """\
import os
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
pidfile = "/run/app/gunicorn.pid"
from unicorn_shim_gunicorn import post_worker_init
"""


def gunicorn_unit(layout: Layout) -> str:
    return write_unit(layout, "venv/bin/gunicorn -c gunicorn.conf.py app:application",
                      pid_file="/run/app/gunicorn.pid", socket="127.0.0.1:8000", kill_signal="SIGTERM")





class Packaged:
    """An app `shop` of the packaged units: ROOT/etc/shop.conf, the templates of units/,
    an operator's drop-ins under ROOT/systemd; checked by its name, as `check shop`."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.conf_dir = os.path.join(layout.root, "etc")
        self.unit_dir = os.path.join(layout.root, "systemd")
        os.makedirs(self.conf_dir, exist_ok=True)
        os.makedirs(self.unit_dir, exist_ok=True)
        self.conf_path = os.path.join(self.conf_dir, "shop.conf")
        self.env = {"UNICORN_SHIM_CONF_DIR": self.conf_dir, "SYSTEMD_UNIT_PATH": f"{self.unit_dir}:{UNITS_DIR}"}

    def conf(self, text: str) -> None:
        with open(self.conf_path, "w") as f:
            f.write(text)

    def dropin(self, text: Optional[str]) -> None:
        d = os.path.join(self.unit_dir, "unicorn-shim@shop.service.d")
        os.makedirs(d, exist_ok=True)
        if text is None:
            os.unlink(os.path.join(d, "override.conf"))
            return
        with open(os.path.join(d, "override.conf"), "w") as f:
            f.write(text)

    def check(self) -> subprocess.CompletedProcess:
        return run_check("shop", env=self.env)


def finding(stdout: str, start: str) -> str:
    """The finding that starts with `start`, with its fix line."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(start):
            return "\n".join(lines[i:i + 2])
    raise AssertionError(f"no finding {start!r} in:\n{stdout}")


def fix_of(found: str) -> str:
    """A finding's `fix:` line (`to tell:` for what cannot be told here)."""
    return re.split(r"\n    (?:fix|to tell): ", found, maxsplit=1)[1]
