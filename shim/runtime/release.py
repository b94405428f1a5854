"""Which release a master serves, and whether it is the one deployed.

A deploy flips a `current` symlink and reloads. The shim resolves `--chdir`
to the real release directory when a hand-over begins (the intended release)
and compares it with what the new master really runs: the Gemfile Bundler was
told to use, as soon as a re-exec'd master has exec'd (its environment is final
then, and it has loaded neither its gems nor its app), and, once it is ready,
that Gemfile again and its working directory (final only after its config
loaded). A config that pins itself to the first release (Unicorn's
`working_directory File.expand_path('../..', __FILE__)` read through a
relative `-c`, or a `BUNDLE_GEMFILE` that Unicorn's own re-exec carries over)
would otherwise make every later deploy a silent no-op.
"""
from __future__ import annotations

import os

from shim.runtime import procs

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence


def resolve(directory: Optional[str]) -> Optional[str]:
    """The real directory behind `directory` (a `current` symlink), now."""
    if not directory:
        return None
    return os.path.realpath(directory)


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def config_through(argv: Sequence[str], flags: Sequence[str], link: Optional[str],
                   chdir: Optional[str] = None) -> List[str]:
    """`argv` with a relative config file (`-c config/unicorn.rb`) named through
    `link` (`/srv/app/current/config/unicorn.rb`), and, when `link` is a release
    other than `chdir` (the last good one a boot falls back to), every path
    spelled through `chdir` (`-c /srv/app/current/config/unicorn.rb`, as the
    classic run script has it) named through that release instead.

    A relative path is resolved from the master's working directory, which is
    the real release: a config computing APP_PATH from __FILE__ would then name
    that one release for good (Unicorn's own re-exec reads the same path again).
    Through the symlink, __FILE__-based paths (working_directory, listen, pid)
    name `current` and read the same on every generation. A master of another
    release than the one `current` names must not read anything through
    `current`: its config would move it into the release that failed."""
    if not link:
        return list(argv)
    out = list(argv)
    if chdir and link != chdir:
        out = [_moved(word, chdir, link) for word in out]
    for i, word in enumerate(out):
        for flag in flags:
            if word == flag and i + 1 < len(out) and not os.path.isabs(out[i + 1]):
                out[i + 1] = os.path.join(link, out[i + 1])
            elif flag.startswith("--") and word.startswith(flag + "="):
                value = word[len(flag) + 1:]
                if not os.path.isabs(value):
                    out[i] = f"{flag}={os.path.join(link, value)}"
    return out


def _moved(word: str, chdir: str, link: str) -> str:
    """`word` (a path, or `--flag=path`) with a leading `chdir` replaced by `link`."""
    chdir = chdir.rstrip("/") or "/"
    flag, eq, value = word.partition("=") if word.startswith("--") else ("", "", word)
    if not eq:
        flag, value = "", word
    if _under(value, chdir):
        return flag + eq + link.rstrip("/") + value[len(chdir):]
    return word


def environ_bytes(pid: int) -> Optional[bytes]:
    """/proc/PID/environ: the environment of the process's last exec (later setenv
    calls change only its own copy), or, in a fork that has not exec'd yet, its parent's."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return None


def environ_of(pid: int) -> Dict[str, str]:
    """The environment `pid` was exec'd with (what Unicorn's re-exec passed on)."""
    items = (environ_bytes(pid) or b"").split(b"\0")
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def exec_seen(pid: int, parent_title: str, parent_environ: Optional[bytes]) -> Optional[bool]:
    """Whether `pid`, forked by a master whose command line and environment were
    `parent_title` and `parent_environ` when it forked, has exec'd since: until then
    /proc shows its parent's copies of both; in the midst of its exec, nothing (seen:
    an empty environ and cmdline). None: /proc cannot tell (not a process of this
    host's). A re-exec with both unchanged shows only once the new master renames
    itself or forks: then the ready check reads it."""
    now = environ_bytes(pid)
    if now is None:
        return None
    title = procs.title(pid)
    if not now or not title:
        return False
    return now != parent_environ or title != parent_title


def gemfile_mismatch(pid: int, intended: str) -> Optional[str]:
    """Why master `pid`'s Bundler loads another release's gems than `intended`'s, or None."""
    gemfile = environ_of(pid).get("BUNDLE_GEMFILE")
    if gemfile and not _under(os.path.realpath(gemfile), intended):
        return (f"the new master runs with BUNDLE_GEMFILE={gemfile}, which is not in the deployed release "
                f"{intended}: Bundler is pinned to an old release (Unicorn's re-exec keeps the first "
                "master's environment); fix: use the default `--upgrade spawn`, or reset it in "
                "`before_exec { |server| ENV['BUNDLE_GEMFILE'] = \"#{APP_PATH}/Gemfile\" }`")
    return None


def mismatch(pid: int, intended: str) -> Optional[str]:
    """Why master `pid` does not serve the `intended` release, or None when it does."""
    try:
        actual = os.path.realpath(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None      # gone: the caller sees that on its own
    if not _under(actual, intended):
        return (f"the new master serves {actual}, not the deployed release {intended}: its config "
                "pins an old release (a `working_directory` computed from __FILE__ of a config read from "
                "releases/, or an absolute path into releases/); fix: name the config through the "
                "`current` symlink (a relative `-c` with --chdir does that) and use the default "
                "`--upgrade spawn`")
    return gemfile_mismatch(pid, intended)
