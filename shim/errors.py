"""Errors that end the shim with one clear line and a distinct exit status, and how
that line is said (shared by the running shim, the client and the tooling)."""
import os
import socket
import sys


# Exit statuses, stable for unit files and scripts (documented in the README).
EXIT_USAGE = 2          # bad command line (argparse uses 2 as well)
EXIT_LISTEN = 3         # a --listen address that cannot be parsed or bound
EXIT_ACTIVATION = 4     # bad socket activation: LISTEN_PID not ours, fd not a listening socket
EXIT_SERVER = 5         # the server command cannot be run (not found, not executable)
EXIT_PIDFILE = 6        # the pid file's directory is not writable
EXIT_START = 7          # the master died or was not ready in time
EXIT_MASTER_EXIT = 8    # the master exited in steady state (systemd restarts the unit)
EXIT_CONTROL = 9        # reload/status: no shim answers on the control socket
EXIT_RELOAD = 10        # reload: the new release was rolled back or could not start
EXIT_START_RETRY = 11   # the release that last served failed to start, retries too: systemd may try again


class ShimError(Exception):
    """A failure to report as one line on stderr, ending with `exit_status`."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class ReloadFailed(Exception):
    """A new master cannot serve; the message is the one line the operator sees."""

    master: "int | None" = None     # the master that failed, once known


class WrongRelease(ReloadFailed):
    """The new master is ready but serves another release than the one deployed."""


class Abandoned(ReloadFailed):
    """Every client that asked for a reload went away before its point of no return."""


class Stopping(Exception):
    """A stop was requested while a master was booting or a hand-over ran."""


JOURNAL_SOCKET = "/run/systemd/journal/socket"


def complain(line: str) -> None:
    """An error line on stderr; as the unit's ExecReload=/ExecStart= (stderr is the
    journal), straight to journald instead, tagged unicorn-shim and at priority err
    rather than with the app's SyslogIdentifier= (journald's native protocol: one
    datagram of KEY=value lines; no systemd-python needed)."""
    if stderr_is_journal():
        entry = f"SYSLOG_IDENTIFIER=unicorn-shim\nPRIORITY=3\nMESSAGE={line.replace(chr(10), ' ')}\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(entry.encode(errors="replace"), JOURNAL_SOCKET)
            return
        except OSError:
            pass
    print(line, file=sys.stderr)


def stderr_is_journal() -> bool:
    """Is stderr the journal stream systemd connected (JOURNAL_STREAM=dev:inode)?"""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))
