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


def test_workers_that_switch_user_still_report_readiness(manager, tmp_path):
    """A root master whose workers switch to another user, behind a runtime directory
    that user cannot enter: their reports go over the channel they inherited, which
    needs no path, so readiness is the hook's, exact."""
    from support.deploy import Deployment
    d = Deployment(manager, str(tmp_path), server="gunicorn", preload=True,
                   service_extra="RuntimeDirectoryMode=0700")
    d.app.release(extra='user = "nobody"\ngroup = "nogroup"')
    try:
        d.start()
        assert get(d.port).release == "r1"
        assert "by the readiness hook" in manager.wait_events("ready")[-1]["MESSAGE"]
        assert "2/2 workers ready" in d.state()["StatusText"]
        name = d.app.release(extra='user = "nobody"\ngroup = "nogroup"')
        r = d.reload()
        assert r.returncode == 0, r.stderr
        assert get(d.port).release == name and "2/2 workers ready" in d.state()["StatusText"]
    finally:
        d.stop()


def test_workers_whose_reports_never_arrive_fall_back_to_the_heuristic(manager, tmp_path):
    """The hook is loaded, but the workers close the channel they inherited (as code
    that closes every fd it does not know would): the heuristic takes over."""
    from support.deploy import Deployment
    closes = ("import os\ndef post_fork(server, worker):\n"
              "    os.close(int(os.environ['UNICORN_SHIM_CHANNEL'].split(':')[0]))")
    d = Deployment(manager, str(tmp_path), server="gunicorn", preload=True)
    d.app.release(extra=closes)
    try:
        d.start()
        assert get(d.port).release == "r1"
        assert "never arrived" in manager.wait_events("ready")[-1]["MESSAGE"]
        name = d.app.release(extra=closes)
        r = d.reload()
        assert r.returncode == 0, r.stderr
        assert get(d.port).release == name
    finally:
        d.stop()
