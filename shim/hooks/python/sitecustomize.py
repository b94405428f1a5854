"""unicorn-shim's failure reporter, loaded by Python at start (the shim puts
this directory on PYTHONPATH) in a master the shim started, and so in its
workers: when a master or a worker fails, it tells the shim why in one line,
the last line of the traceback and where it was raised, so that a failed
reload shows the server's own error. It wraps no output: it catches the error
where the process ends with it — sys.excepthook for an uncaught exception, and
sys.exit called while handling one (Gunicorn's worker that failed to boot, its
"Error: ..." exits, its HaltServer). The shim reads nothing of the journal for
this: it works under any User=.

In that master it takes its directory off PYTHONPATH again, so nothing the
master or its workers run loads it; outside the shim it does nothing. Either
way it hands over to the sitecustomize it shadows (Debian ships one).
"""
import os
import sys

import unicorn_shim_channel

_LIMIT = 5                       # reports per process: a crash, not a log stream
_sent = 0


def _say(text):
    global _sent
    if _sent < _LIMIT:
        _sent += 1
        unicorn_shim_channel.say(f"error {text.strip()[:480]}")


def _describe(error):
    """'RuntimeError: boom at /srv/app/releases/r2/app.py:4'"""
    import traceback
    last = traceback.format_exception_only(type(error), error)[-1].strip()
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else None
    if isinstance(error, SyntaxError) and error.filename:
        where = f"{error.filename}:{error.lineno}"
    return f"{last} at {where}" if where else last


def _failed(error):
    try:
        if error is not None and not isinstance(error, (SystemExit, KeyboardInterrupt)):
            _say(_describe(error))
    except Exception:
        pass


def _install():
    previous_hook, exit_ = sys.excepthook, sys.exit

    def excepthook(kind, error, tb):
        _failed(error)
        previous_hook(kind, error, tb)

    def exit(status=None):
        if status not in (None, 0):
            _failed(sys.exc_info()[1])
        exit_(status)

    sys.excepthook, sys.exit = excepthook, exit
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != here]
    if rest:
        os.environ["PYTHONPATH"] = os.pathsep.join(rest)
    else:
        os.environ.pop("PYTHONPATH", None)


if unicorn_shim_channel.FD is not None:
    _install()
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
