"""Gunicorn's gthread worker, 21 to 23, loses the connections it accepted but
has not read yet when it stops gracefully (the old master's retirement at each
deploy, a `max_requests` restart): since 21 it accepts a connection, then waits
in its poller until the request's bytes arrive; when its loop ends (`alive`
False) it closes the poller with those connections in it, and their clients
get a reset or an empty reply (benoitc/gunicorn#3380). Measured with Debian
13's Gunicorn 23 under load: 17 failed requests in 10 deploys with 2 workers,
101 with `max_requests = 50`.

Loaded by unicorn-shim's sitecustomize into the Gunicorn processes it starts:
when the module is imported, its ThreadWorker gets a thread pool that, when the
loop ends gracefully, first serves what the worker already accepted: it stops
accepting, waits up to DRAIN_SECONDS for each accepted connection's request
and hands it to the pool (the reply closes the connection: the worker is no
longer alive), and only then shuts the pool down as Gunicorn does. A quick
stop (QUIT, INT) stays quick. Gunicorn 20 (it hands a connection to the pool
at once) and versions without this method are left alone.
"""
import time
from concurrent import futures

DRAIN_SECONDS = 2.0      # a client sends its request right after connecting


class _DrainingPool(futures.ThreadPoolExecutor):
    worker = None

    def shutdown(self, wait=True, *, cancel_futures=False):
        worker, self.worker = self.worker, None
        if worker is not None and not worker.alive and not getattr(worker, "_shim_quick", False):
            try:
                _serve_accepted(worker)
            except Exception:     # never keep a worker from stopping
                pass
        super().shutdown(wait, cancel_futures=cancel_futures)


def _waiting(key, worker):
    """A connection the worker accepted (or kept alive) and waits to read."""
    callback = getattr(key.data, "func", None)
    return getattr(callback, "__func__", None) is type(worker).on_client_socket_readable


def _serve_accepted(worker):
    poller = worker.poller
    for sock in worker.sockets:                # stop accepting: the next master's workers take them
        try:
            poller.unregister(sock)
        except (KeyError, ValueError):
            pass
    deadline = time.monotonic() + DRAIN_SECONDS
    while True:
        pending = [k for k in poller.get_map().values() if _waiting(k, worker)]
        # only connections not read yet are waited for; one kept alive is served if it has a request
        if not any(not k.data.args[0].initialized for k in pending):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, _ in poller.select(min(left, 0.1)):
            if _waiting(key, worker):
                key.data(key.fileobj)


def patch(module):
    worker = getattr(module, "ThreadWorker", None)
    if worker is None or not hasattr(worker, "on_client_socket_readable") or hasattr(worker, "_shim_patched"):
        return
    make_pool, quit_now = worker.get_thread_pool, worker.handle_quit

    def get_thread_pool(self):
        pool = make_pool(self)
        if type(pool) is futures.ThreadPoolExecutor:      # not a pool of the app's own making
            pool = _DrainingPool(max_workers=self.cfg.threads)
            pool.worker = self
        return pool

    def handle_quit(self, sig, frame):
        self._shim_quick = True
        return quit_now(self, sig, frame)

    worker.get_thread_pool, worker.handle_quit, worker._shim_patched = get_thread_pool, handle_quit, True


class Finder:
    """Patches gunicorn.workers.gthread right after Gunicorn imports it."""

    NAME = "gunicorn.workers.gthread"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.NAME:
            return None
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                patch(module)
            except Exception:
                pass

        spec.loader.exec_module = exec_module
        return spec


def install():
    import sys
    if not any(isinstance(f, Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, Finder())
