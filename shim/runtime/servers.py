"""Per-server profiles: everything that differs between Unicorn, Gunicorn and Puma.

The supervisor never asks which server it runs; it asks the profile.
"""
from __future__ import annotations

import os
import re
import signal
from types import SimpleNamespace

from shim.errors import EXIT_USAGE, ShimError

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Sequence


def _as_is(name: str) -> str:
    return name


def _bind_url(name: str) -> str:
    """Puma's spelling of a held socket: the URL its socket activation matches."""
    return f"unix://{name}" if name.startswith("/") else f"tcp://{name}"


class ServerProfile(SimpleNamespace):
    """Built once per server below, by keyword; a field not given takes the default here."""

    name: str
    graceful_stop: int               # finish requests in flight, then exit (the unit's KillSignal=)
    reexec: int                      # the server's own re-exec (usr2 upgrade)
    stop_workers: Optional[int]      # stop workers, keep the master (None: not supported)
    respawn_workers: Optional[int]   # one worker back after stop_workers (sent once per worker)
    default_upgrade: str             # "usr2" or "spawn"
    usr2_carries_sockets: bool       # can its own re-exec keep a socket it inherited?
    worker_title: "re.Pattern[str]"  # how a worker's title reads (the readiness heuristic)
    fd_handover: str                 # "UNICORN_FD" (list of fds) or "LISTEN_FDS" (sd_listen_fds)
    listen_flag: Optional[str]       # flag naming a held socket on the command line, if any
    listen_spelling: Callable[[str], str] = staticmethod(_as_is)  # a held socket's name as listen_flag takes it
    daemon_flags: Sequence[str] = ()
    config_flags: Sequence[str] = ()   # flags naming the server's config file
    # The worker thread that accepts connections, when it is not the main one (by its
    # /proc comm name): the readiness heuristic looks for that thread waiting.
    accept_thread: Optional[str] = None
    socket_args: Sequence[str] = ()   # arguments that make it serve the held sockets only
    # Why --upgrade usr2 is refused (when usr2_carries_sockets is False)
    usr2_refusal: str = ""
    # The signal that makes the master reopen its log files (and pass it to its
    # workers), which the shim passes on to a master that missed it; None: none
    # (Puma's USR1 is a phased restart, its HUP a stop without stdout_redirect).
    log_reopen: Optional[int] = None
    # The old generation during a new one's --probation (shim/runtime/standby.py):
    # "stopped": its workers stopped (stop_workers), its master kept, and on a failure
    # as many workers forked again (respawn_workers, one at a time); "beside": it
    # serves on beside the new one, nothing of it to restore.
    probation_standby: str = "beside"
    stop_workers_needs_no_tty: bool = False   # stop_workers is ignored while the master's stdin is a tty

    @property
    def sets_listen_pid(self) -> bool:
        return self.fd_handover == "LISTEN_FDS"

    def socket_env(self, fds: List[int]) -> Dict[str, str]:
        """Environment that hands the held sockets (at fds 3..) to a new master.
        For LISTEN_FDS, spawn adds LISTEN_PID after fork: it must be the master's own pid."""
        if self.fd_handover == "UNICORN_FD":
            return {"UNICORN_FD": ",".join(str(fd) for fd in fds)}
        return {"LISTEN_FDS": str(len(fds))}

    def listen_args(self, names: List[str]) -> List[str]:
        """Arguments naming each held socket, so a config reload (HUP) never
        closes one: Unicorn drops inherited sockets that its config does not name;
        Puma binds what its config names (its default tcp://0.0.0.0:9292 when none)."""
        if not self.listen_flag:
            return list(self.socket_args)
        return [f"{self.listen_flag}{self.listen_spelling(name)}" for name in names] + list(self.socket_args)


UNICORN = ServerProfile(
    name="unicorn",
    graceful_stop=signal.SIGQUIT,
    reexec=signal.SIGUSR2,
    stop_workers=signal.SIGWINCH,
    # One more worker per signal; never HUP, which re-reads the config (through
    # `current`, the new release's) and would move the old master into it.
    respawn_workers=signal.SIGTTIN,
    # spawn: each master starts in the release `current` names, with a fresh
    # environment. Unicorn's own USR2 re-execs with the first master's config
    # path, working_directory and BUNDLE_GEMFILE: the classic config pins
    # every later deploy to the first release.
    default_upgrade="spawn",
    usr2_carries_sockets=True,
    worker_title=re.compile(r"\bworker\[\d+\]"),
    fd_handover="UNICORN_FD",
    listen_flag="-l",
    daemon_flags=("-D", "--daemonize"),
    config_flags=("-c", "--config-file"),
    log_reopen=signal.SIGUSR1,
    probation_standby="stopped",
    stop_workers_needs_no_tty=True,    # "SIGWINCH ignored because $stdin is a tty" (a shim run in a terminal)
)

GUNICORN = ServerProfile(
    name="gunicorn",
    graceful_stop=signal.SIGTERM,    # the reverse of Unicorn: QUIT is Gunicorn's quick stop
    reexec=signal.SIGUSR2,
    stop_workers=None,            # WINCH only acts when Gunicorn daemonized itself
    respawn_workers=None,
    default_upgrade="spawn",
    # Measured with 20.1: the re-exec'd master dies with "OSError: [Errno 88] Socket
    # operation on non-socket" for a socket it inherited (benoitc/gunicorn#2856).
    usr2_carries_sockets=False,
    worker_title=re.compile(r""),     # titles need setproctitle: count every child
    fd_handover="LISTEN_FDS",
    listen_flag=None,
    daemon_flags=("-D", "--daemon"),
    config_flags=("-c", "--config"),
    log_reopen=signal.SIGUSR1,
    usr2_refusal="gunicorn's own re-exec cannot keep the sockets the shim holds "
                 "(its new master dies with ENOTSOCK)",
)

PUMA = ServerProfile(
    name="puma",
    graceful_stop=signal.SIGTERM,    # INT too; Puma 5 has no QUIT handler (Ruby's default: die at once)
    reexec=signal.SIGUSR2,
    stop_workers=None,            # TTOU never goes below one worker
    respawn_workers=None,
    default_upgrade="spawn",
    # Its USR2 hot restart execs the new release in the same process: no second
    # master exists to verify, and a release that fails to boot takes the only master down.
    usr2_carries_sockets=False,
    worker_title=re.compile(r"\bcluster worker \d+:"),   # "puma: cluster worker 0: MASTERPID [tag]"
    fd_handover="LISTEN_FDS",
    # A --bind per held socket replaces every bind of the config (and Puma's default
    # tcp://0.0.0.0:9292), and keeps naming the socket if the master ever re-execs
    # itself (a USR2 sent by hand: the inherited socket is matched by this URL);
    # --bind-to-activated-sockets=only drops any bind that would not match one.
    listen_flag="--bind=",
    listen_spelling=_bind_url,
    socket_args=("--bind-to-activated-sockets=only",),
    usr2_refusal="puma's USR2 hot restart re-execs the new release in place (same pid): there is no "
                 "new master to verify beside the old one, and a release that fails to boot takes the "
                 "only master down",
    config_flags=("-C", "--config"),
    # Puma names its threads; "puma srv" exists once the worker serves and waits in
    # select for connections (the main thread and "puma wrkr check" sleep from the start).
    accept_thread="puma srv",
)

PROFILES = {p.name: p for p in (UNICORN, GUNICORN, PUMA)}


def detect(command: Sequence[str], override: Optional[str] = None) -> ServerProfile:
    """The profile for a server command: `unicorn ...`, `bundle exec unicorn ...`,
    `gunicorn ...`, `python3 -m gunicorn ...`, `puma ...`, `bin/puma ...`; --server overrides."""
    if override:
        return PROFILES[override]
    for word in command:
        base = os.path.basename(word)
        if base in ("unicorn", "unicorn_rails"):
            return UNICORN
        if base in ("gunicorn", "gunicorn3"):
            return GUNICORN
        if base == "puma":
            return PUMA
    raise ShimError(f"cannot tell the server from {' '.join(command)!r}: "
                    f"pass --server {'|'.join(PROFILES)}", EXIT_USAGE)
