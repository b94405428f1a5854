"""The channel to unicorn-shim: one end of a socketpair the shim hands each master
it starts (its workers inherit it), named by UNICORN_SHIM_CHANNEL=FD:INODE:PID.
It is open only in the process the shim started and in its forks (Gunicorn's
workers): a program the master or a worker runs sees another pid, and the fd is
not inherited across exec. Outside the shim `say` does nothing.
"""
import os
import stat


def _find():
    try:
        fd, inode, pid = (int(part) for part in os.environ["UNICORN_SHIM_CHANNEL"].split(":"))
        if pid != os.getpid():
            return None
        found = os.fstat(fd)
        if not stat.S_ISSOCK(found.st_mode) or found.st_ino != inode:
            return None
        os.set_inheritable(fd, False)     # Gunicorn's workers fork; nothing exec'd gets it
        return fd
    except (KeyError, ValueError, OSError):
        return None


FD = _find()
_socket = None


def say(text):
    """One line to the shim; never blocks, never raises, never disturbs the server."""
    global _socket
    if FD is None:
        return
    try:
        import socket
        if _socket is None:
            _socket = socket.socket(fileno=FD)
        _socket.send(text.encode(errors="replace")[:500], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except Exception:
        pass      # the shim is gone or restarting: readiness falls back to its heuristic
