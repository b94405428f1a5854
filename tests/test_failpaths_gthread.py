"""Gunicorn's gthread workers under load, deploy after deploy: the old master's
retirement (and a max_requests restart) must not cost a request. Real systemd
(a private user manager), real Gunicorn from Debian's package, a .socket unit,
load running. Gunicorn 21-23 lost about one request per stopping worker
(Debian 13's 23: 17 in 10 deploys, 101 with max_requests = 50); Debian 12's
20.1 did not: tests/test_failpaths_trixie.py runs these on Debian 13."""
from __future__ import annotations

import pytest

from support.load import Load, get

GTHREAD = 'worker_class = "gthread"\nthreads = 4'


@pytest.mark.parametrize("server", ["gunicorn"])
@pytest.mark.parametrize("extra", ["", "max_requests = 50\nmax_requests_jitter = 10"], ids=["plain", "max_requests"])
def test_gthread_deploys_under_load_lose_nothing(deploy, manager, extra):
    # 10 reloads in a row: a 1 s probation (the standby still taken each time; the default 5 s
    # would add 40 s to this test alone, see the README's "Tests")
    d = deploy(workers=2, shim_args="--probation 1")
    d.app.release(extra=f"{GTHREAD}\n{extra}")
    d.start()
    with Load(d.port, clients=8) as load:
        for _ in range(10):
            name = d.app.release(extra=f"{GTHREAD}\n{extra}")
            r = d.reload()
            assert r.returncode == 0, r.stderr
            assert get(d.port).release == name
    assert load.ok_count() > 500
    assert load.failures() == [], (load.failure_kinds(), [f.error for f in load.failures()][:5])
