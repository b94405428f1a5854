"""Exact readiness for unicorn-shim under Gunicorn. In the Gunicorn config file:

    from unicorn_shim_gunicorn import post_worker_init

(or call unicorn_shim_gunicorn.post_worker_init(worker) from your own
post_worker_init). The shim puts this module on PYTHONPATH for its masters.
The master says hello when the config loads; each worker reports once it has
loaded the app. Outside the shim (no UNICORN_SHIM_CHANNEL) it does nothing.
"""
from unicorn_shim_channel import say


def post_worker_init(worker):
    say(f"ready worker={worker.pid} workers={worker.cfg.workers}")


say("hello")
