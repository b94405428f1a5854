"""Issue 21, item 1: every master gets a private probe socket, and the real servers'
workers answer on it, whatever the config's own listen/bind says (real systemd,
Debian's Unicorn, Gunicorn with sync and gthread workers, Puma)."""
from __future__ import annotations

import os
import signal
import stat
import time

import pytest

from support.apps import free_port
from support.deploy import Deployment
from support.load import Load, get
from support.probing import probe_sockets, wait_answer

# A config that names addresses of its own. Unicorn closes every inherited socket its
# config's `listen` lines do not name, at start and at each HUP (the config names the
# public socket, as the classic config does; another port cannot be bound twice while
# the old master holds it): the probe socket survives because the shim names it with
# -l. Gunicorn ignores `bind` when handed sockets through LISTEN_FDS; Puma drops it
# (--bind-to-activated-sockets=only).
SETUPS = {
    "unicorn": ("unicorn", 'listen "127.0.0.1:{held}"'),
    "gunicorn-sync": ("gunicorn", 'bind = ["127.0.0.1:{port}"]'),
    "gunicorn-gthread": ("gunicorn", 'bind = ["127.0.0.1:{port}"]\nworker_class = "gthread"\nthreads = 2'),
    "puma": ("puma", 'bind "tcp://127.0.0.1:{port}"'),
}


@pytest.fixture(params=sorted(SETUPS))
def setup(request, manager, tmp_path):
    server, extra = SETUPS[request.param]
    d = Deployment(manager, str(tmp_path), server=server)
    d.extra = extra.format(port=free_port(), held=d.port)
    yield d
    d.stop()


def test_each_generation_answers_over_its_own_private_probe_socket(setup, manager):
    d = setup
    d.app.release(extra=d.extra)
    d.start()
    runtime = os.path.join(manager.runtime_dir, "app")
    [first] = probe_sockets(runtime)
    st = os.stat(first)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    shim = [p for p in manager.unit_processes() if p not in d.master_pids()
            and p not in sum((d.app_workers(m) for m in d.master_pids()), [])]
    assert shim and st.st_uid == os.stat(f"/proc/{shim[0]}").st_uid     # the service's user, the shim's
    status, body = wait_answer(first, "release=r1")
    assert (status, "release=r1" in body) == (200, True), body
    if d.app.server == "unicorn":
        # HUP: Unicorn re-reads the config and applies its listeners again
        master = d.assert_main_pid_is_live_master()
        before = set(d.app_workers(master))
        os.kill(master, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while (before & set(d.app_workers(master))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not before & set(d.app_workers(master)), "HUP did not replace the workers"
        status, body = wait_answer(first, "release=r1")
        assert status == 200 and int(body.split("pid=")[1].split()[0]) not in before, body
    with Load(d.port, clients=2) as load:
        d.app.release(extra=d.extra)
        r = d.reload()
        assert r.returncode == 0, r.stderr + manager.journal_text()[-2000:]
        deadline = time.monotonic() + 20
        while len(probe_sockets(runtime)) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        [second] = probe_sockets(runtime)
        assert second != first and not os.path.exists(first)     # the old master's went with it
        status, body = wait_answer(second, "release=r2")
        assert (status, "release=r2" in body) == (200, True), body
        assert get(d.port, timeout=5).release == "r2"             # the public socket serves as before
    assert load.failures() == [], load.failure_kinds()

