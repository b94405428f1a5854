"""Probation's signals to the old generation, against the fake process layer (see
test_statemachine): Unicorn's old master has its workers stopped (WINCH) when the
new generation's probation starts; a failure brings back exactly as many (TTIN, one
at a time), never a config reload (HUP); a good probation retires the workerless
master. Gunicorn's and Puma's old generation serves on beside and gets no signal."""
from __future__ import annotations

import signal

import pytest

from shim.runtime.servers import PROFILES
from support.fake_servers import FakeOS, install
from test_statemachine import Asker, fake, stop_signal, supervisor, when_serving  # noqa: F401 (fake: a fixture)

PROBATION = 0.6


def run_reload(sup, fake: FakeOS, break_new: bool, recycle: bool = False) -> dict:
    """Boot, deploy r2, reload it with --probation; with `break_new`, one of the new master's
    workers dies with an error its reporter sends once the probation began; with `recycle`,
    one exits cleanly, saying nothing (max_requests)."""
    sup.config.probation = PROBATION
    results, statuses = [], []

    def on_probation() -> None:
        status = next((m["STATUS"] for m in reversed(sup.notifier.messages) if "STATUS" in m), "")
        if "on probation" not in status:
            sup.loop.call_later(0.01, on_probation)
            return
        statuses.append(status)
        new = fake.started[-1]
        if break_new:
            worker = new.workers()[0]
            sup.reports.record(worker.pid, "error RuntimeError: boom (app.py:3)", [new.pid])
            fake.stop_worker(worker, graceful=False)
        if recycle:
            fake.stop_worker(new.workers()[0], graceful=True)

    def answered(answer) -> None:
        results.append(answer)
        results.append(fake.serving())
        stop_signal(signal.SIGQUIT)

    def begin() -> None:
        fake.deploy("r2")
        sup.request_reload(Asker(answered))
        sup.loop.call_later(0.01, on_probation)
    when_serving(sup, begin)
    assert sup.run() == 0
    return {"result": results[0], "serving": results[1], "status": statuses[0]}


def test_unicorn_probation_failure_brings_back_exactly_the_old_workers_never_a_hup(fake):
    sup = supervisor(fake, upgrade="spawn", retire_timeout=2.0)
    got = run_reload(sup, fake, break_new=True)
    old, new = fake.started
    assert not got["result"]["ok"], got
    assert "1 worker of new master" in got["result"]["error"] and "died during probation: RuntimeError: boom" \
        in got["result"]["error"], got
    assert got["serving"] == {"r1"}                      # what curl sees after the rollback
    assert f"old master {old.pid} standing by with its workers stopped" in got["status"], got["status"]
    # the final stop's QUIT aside: WINCH at the probation's start, then one TTIN per worker it had
    assert old.signals[:-1] == [signal.SIGWINCH] + [signal.SIGTTIN] * fake.workers, old.signals
    assert signal.SIGHUP not in old.signals
    assert not new.alive
    assert sup.notifier.mainpids()[-1] == old.pid


@pytest.mark.parametrize("recycle", [False, True], ids=["quiet", "a-worker-recycled"])
def test_unicorn_good_probation_retires_the_workerless_old_master(fake, recycle):
    """A worker recycled during the window (max_requests: a clean exit, replaced) is no failure."""
    sup = supervisor(fake, upgrade="spawn", retire_timeout=2.0)
    got = run_reload(sup, fake, break_new=False, recycle=recycle)
    old, new = fake.started
    assert got["result"]["ok"], got
    assert got["serving"] == {"r2"}
    assert old.signals == [signal.SIGWINCH, signal.SIGQUIT], old.signals    # stopped workers, then retired
    assert sup.notifier.mainpids()[-1] == new.pid


@pytest.mark.parametrize("server", ["gunicorn", "puma"])
def test_gunicorn_and_puma_old_generation_serves_beside_during_probation(monkeypatch, tmp_path, server):
    fake = FakeOS(str(tmp_path / "app"), server)
    install(monkeypatch, fake)
    try:
        sup = supervisor(fake, upgrade="spawn", retire_timeout=2.0)
        got = run_reload(sup, fake, break_new=True)
        old, new = fake.started
    finally:
        fake.close()
    assert not got["result"]["ok"] and "died during probation" in got["result"]["error"], got
    assert got["serving"] == {"r1"}
    assert f"old master {old.pid} serving beside it" in got["status"], got["status"]
    assert old.signals == [PROFILES[server].graceful_stop], old.signals    # only the final stop's
