"""Exact readiness for unicorn-shim under Gunicorn. In the Gunicorn config file:

    from unicorn_shim_gunicorn import post_worker_init

(or call unicorn_shim_gunicorn.post_worker_init(worker) from your own
post_worker_init). The shim puts this module on PYTHONPATH for its masters.
The master says hello when the config loads; each worker reports once it has
loaded the app. Outside the shim (no UNICORN_SHIM_READY_SOCKET) it does nothing.
"""
import os
import socket

PATH = os.environ.get("UNICORN_SHIM_READY_SOCKET")


def say(text):
    if not PATH:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(text.encode(), PATH)
    except OSError:
        pass    # the shim is gone or restarting: readiness falls back to its heuristic


def post_worker_init(worker):
    say(f"ready worker={worker.pid} workers={worker.cfg.workers}")


say("hello")
