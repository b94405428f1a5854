"""Real setups for the `unicorn-shim check` tests: a Capistrano layout
(releases/rN, shared/tmp, a `current` symlink) with a Gemfile and a
Gemfile.lock that Debian's Bundler resolves offline, in a directory the
unprivileged user `nobody` can read."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Optional

from support import classic
from support.deploy import REPO, SHIM

# The config from the widely read Capistrano + Unicorn deployment guides (the one the
# release-truth tests deploy), with Bundler's gemfile reset before a re-exec.
CLASSIC_UNICORN_RB = classic.CLASSIC_UNICORN_RB.format(preload="true", before_exec=classic.BEFORE_EXEC)

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
