"""Starting a master so that its parent is the service manager, not the shim.

systemd only watches a MAINPID properly when that process is its own child
(measured on 252 and 257): so the shim double-forks, and the intermediate
process exits at once, leaving the master to be reparented to the manager
(PID 1, or the user manager, which is a child subreaper).
"""
from __future__ import annotations

import os
import signal

from shim.errors import EXIT_SERVER, ShimError

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence

FD_START = 3
# Variables that belong to the shim alone: it is the only notifier, and the
# sockets are handed over by the profile's own variables.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
               "LISTEN_FDNAMES")


def resolve_command(argv: Sequence[str], release: Optional[str] = None) -> str:
    """The executable's path, or a clear error before anything is started.

    A relative command with a slash (`bin/unicorn`, `venv/bin/gunicorn`) names a
    file of the release being started, not of the directory the shim started in
    (that release may have been pruned since)."""
    if not argv:
        raise ShimError("no server command after `--` (e.g. -- unicorn -c config/unicorn.rb)", 2)
    name = argv[0]
    if "/" in name and not os.path.isabs(name) and release:
        name = os.path.join(release, name)
        path = name if os.access(name, os.X_OK) and os.path.isfile(name) else None
    else:
        path = _which(name)
    if path is None:
        what = "does not exist" if not os.path.exists(name) else "is not executable"
        where = f"in {release}" if "/" in argv[0] and release else f"on PATH={os.environ.get('PATH', '')}"
        hint = ("; a server installed in a virtualenv or by Bundler's binstubs is named by its path "
                "in the release, e.g. venv/bin/gunicorn or bin/unicorn") if "/" not in argv[0] else ""
        raise ShimError(f"server command {argv[0]!r} {what} {where}{hint}", EXIT_SERVER)
    return path


def _which(name: str) -> Optional[str]:
    """shutil.which for a command name, without the module (and the compression
    modules it loads) in every shim's memory."""
    if "/" in name:
        return name if os.access(name, os.X_OK) and os.path.isfile(name) else None
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    return None


def server_environment(base: Dict[str, str], extra: Dict[str, str]) -> Dict[str, str]:
    env = {k: v for k, v in base.items() if k not in PRIVATE_ENV}
    env.update(extra)
    return env


def spawn(argv: Sequence[str], env: Dict[str, str], fds: List[int], *,
          chdir: Optional[str] = None, pwd: Optional[str] = None, set_listen_pid: bool = False,
          pid_env: Sequence[str] = ()) -> int:
    """Start `argv` in `chdir` with `fds` at 3, 4, ... in a new session; return its pid.

    Each variable of `pid_env` that `env` has gets ":<the master's pid>" appended,
    set in the master itself before exec (as LISTEN_PID with `set_listen_pid`).

    PWD is set to `pwd` (default `chdir`): Unicorn re-execs into $PWD and
    Gunicorn puts it on sys.path, so it decides which release later code loads
    come from. Raises ShimError if exec fails (the error comes back through a
    pipe that exec closes).
    """
    executable = resolve_command(argv, chdir)
    pid_r, pid_w = os.pipe()
    err_r, err_w = os.pipe()        # O_CLOEXEC: EOF on a successful exec
    try:
        child = os.fork()
    except OSError as e:
        for fd in (pid_r, pid_w, err_r, err_w):
            os.close(fd)
        raise ShimError(f"cannot fork the master: {e.strerror}", EXIT_SERVER) from None
    if child == 0:                  # intermediate: new session, fork, leave
        try:
            os.close(pid_r)
            os.close(err_r)
            os.setsid()
            master = os.fork()
            if master == 0:
                _exec_master(executable, argv, env, fds, chdir, pwd or chdir, set_listen_pid, pid_env, err_w)
            os.write(pid_w, str(master).encode())
        finally:
            os._exit(0)
    os.close(pid_w)
    os.close(err_w)
    os.waitpid(child, 0)
    with os.fdopen(pid_r, "rb") as f:
        master_text = f.read()
    with os.fdopen(err_r, "rb") as f:
        error = f.read()
    if error:
        raise ShimError(f"cannot start {argv[0]!r}: {error.decode(errors='replace')}", EXIT_SERVER)
    if not master_text:
        raise ShimError("could not fork the master", EXIT_SERVER)
    return int(master_text)


def _exec_master(executable: str, argv: Sequence[str], env: Dict[str, str], fds: List[int],
                 chdir: Optional[str], pwd: Optional[str], set_listen_pid: bool, pid_env: Sequence[str],
                 err_w: int) -> None:
    try:
        # Move everything out of the way first: a held socket may sit at 3 already.
        high = [os.dup(fd) for fd in fds]
        err_w = os.dup(err_w)
        for i, fd in enumerate(high):
            os.dup2(fd, FD_START + i, inheritable=True)
        keep = set(range(FD_START + len(fds))) | {err_w}
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.set_inheritable(err_w, False)
        # exec keeps ignored signals ignored: undo Python's SIGPIPE/SIGXFSZ choice.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        if chdir:
            os.chdir(chdir)
            env = dict(env, PWD=pwd)
        if set_listen_pid:
            env = dict(env, LISTEN_PID=str(os.getpid()))
        env = dict(env, **{var: f"{env[var]}:{os.getpid()}" for var in pid_env if var in env})
        os.execve(executable, list(argv), env)
    except BaseException as e:  # noqa: B036 - whatever happens, report it and never return
        try:
            os.write(err_w, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(127)
