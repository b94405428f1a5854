"""Loaded by Python at start in every process unicorn-shim starts (the shim
puts this directory on PYTHONPATH): when a Gunicorn master or worker fails,
tells the shim why in one line — the last line of the traceback and where it
was raised, or Gunicorn's own reason — so that a failed reload shows the
server's own error. The shim reads nothing of the journal for this: it works
under any User=. Outside the shim (no UNICORN_SHIM_READY_SOCKET) it does
nothing but hand over to the sitecustomize it shadows (Debian ships one).
"""
import os
import re
import sys

_PATH = os.environ.get("UNICORN_SHIM_READY_SOCKET")
_LIMIT = 5                       # reports per process: a crash, not a log stream
_FRAME = re.compile(r'^\s+File "([^"]+)", line (\d+)')
_REASON = re.compile(r"^(Error: .+|Reason: .+|.*\[(?:ERROR|CRITICAL)\] .*(?:failed|Failed|Error|error).*)$")


class _Reporter:
    def __init__(self, stream):
        self._stream = stream
        self._sent = 0
        self._pending = ""
        self._frame = None
        self._in_traceback = False

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def write(self, text):
        try:
            self._scan(text)
        except Exception:
            pass
        return self._stream.write(text)

    def _scan(self, text):
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if line.startswith("Traceback (most recent call last):"):
                self._in_traceback, self._frame = True, None
            elif self._in_traceback:
                frame = _FRAME.match(line)
                if frame:
                    self._frame = f"{frame.group(1)}:{frame.group(2)}"
                elif line and not line[0].isspace():
                    self._in_traceback = False
                    self._say(f"{line} at {self._frame}" if self._frame else line)
            elif _REASON.match(line):
                self._say(line)

    def _say(self, text):
        if self._sent >= _LIMIT:
            return
        self._sent += 1
        import socket
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(f"error ppid={os.getppid()} {text.strip()[:480]}".encode(errors="replace"), _PATH)
        except OSError:
            pass                 # the shim is gone or restarting; never disturb the server


if _PATH and sys.stderr is not None:
    sys.stderr = _Reporter(sys.stderr)
if _PATH:
    try:
        import unicorn_shim_gthread          # gthread's graceful stop serves what it accepted
        unicorn_shim_gthread.install()
    except Exception:
        pass


def _chain():
    """Run the sitecustomize this file shadows, if there is one further on sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.abspath(entry or ".") != here and os.path.isfile(candidate):
            with open(candidate) as f:
                code = compile(f.read(), candidate, "exec")
            exec(code, {"__name__": "sitecustomize", "__file__": candidate})
            return


_chain()
