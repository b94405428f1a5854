"""Workers that come and go on their own, or run as another user, are not a
failed boot: real systemd, real servers, load running."""
from __future__ import annotations

import pytest

from support.load import Load, get

# A worker that exits on its own after serving a while, as max_requests makes it.
RECYCLE = {
    "unicorn": "after_worker_ready { |s, w| Thread.new { sleep(1 + rand); Process.kill(:QUIT, Process.pid) } }",
    "gunicorn": "max_requests = 150\nmax_requests_jitter = 50",
}


# Without the hook, a worker counts as booted once seen waiting for connections; a
# saturated Gunicorn worker is almost never seen so before max_requests ends it (a
# limit the README states: use the hook). Unicorn's workers are.
@pytest.mark.parametrize("server,ready_hook", [("unicorn", True), ("gunicorn", True), ("unicorn", False)],
                         ids=["unicorn-hook", "gunicorn-hook", "unicorn-heuristic"])
def test_recycled_workers_are_not_a_crash_loop(deploy, manager, server, ready_hook):
    d = deploy(preload=True, workers=4, ready_hook=ready_hook)
    d.app.release(extra=RECYCLE[server])
    d.start()
    with Load(d.port, clients=6) as load:
        for _ in range(4):
            name = d.app.release(extra=RECYCLE[server])
            r = d.reload()
            assert r.returncode == 0, r.stderr + str([e["REASON"] for e in manager.events("reload-failed")])
            assert get(d.port).release == name
    assert load.failures() == [], load.failure_kinds()
    st = d.state()
    assert (st["ActiveState"], st["NRestarts"]) == ("active", "0"), st


def test_workers_that_cannot_reach_the_readiness_socket_fall_back_to_the_heuristic(manager, tmp_path):
    """A root master whose workers switch to another user, behind a runtime directory
    that user cannot enter: the hook's worker reports never arrive."""
    from support.deploy import Deployment
    d = Deployment(manager, str(tmp_path), server="gunicorn", preload=True,
                   service_extra="RuntimeDirectoryMode=0700")
    d.app.release(extra='user = "nobody"\ngroup = "nogroup"')
    try:
        d.start()
        assert get(d.port).release == "r1"
        assert "never arrived" in manager.wait_events("ready")[-1]["MESSAGE"]
        name = d.app.release(extra='user = "nobody"\ngroup = "nogroup"')
        r = d.reload()
        assert r.returncode == 0, r.stderr
        assert get(d.port).release == name
    finally:
        d.stop()
