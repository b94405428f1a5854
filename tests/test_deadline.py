"""A reload's deadline (issue 22): the client reads when systemd will end its reload
job and sends it; the shim never passes its point of no return when it could not
finish before it, and ends the hand-over before it with a rollback that says why.
Fast: the fake process layer (as tests/test_statemachine.py) and fake `systemctl
show` answers. The real thing, under real systemd and load: tests/test_jobtimeout.py."""
from __future__ import annotations

import os
import signal
import time

import pytest

from shim import jobdeadline
from shim.runtime import deadline
from shim.runtime.deadline import FINISH_MARGIN
from test_statemachine import Asker, Recorder, fake, stop_signal, supervisor, when_serving  # noqa: F401


class Heard(Recorder):
    """Messages kept, as if a service manager heard them (EXTEND_TIMEOUT_USEC= counts)."""

    def managed(self) -> bool:
        return True


def run_one_reload(sup, deadlines, during=None) -> tuple:
    """Boot, one reload asked for with `deadlines`, then stop: (answer, seconds it took)."""
    got = []
    t0 = []

    def ask() -> None:
        t0.append(time.monotonic())
        sup.handle_request({"command": "reload", "deadlines": deadlines},
                           Asker(lambda answer: (got.append((answer, time.monotonic() - t0[0])),
                                                 stop_signal(signal.SIGQUIT))))
        if during:
            during()
    when_serving(sup, ask)
    assert sup.run() == 0
    assert len(got) == 1, got
    return got[0]


def systemd_timeout(left: float, setting: float = 6.0) -> list:
    return [{"in": left, "by": "TimeoutStartSec", "setting": setting, "extends": True}]


def test_a_reload_that_cannot_finish_before_the_job_timeout_is_rolled_back_before_it(fake):
    fake.boot_delays = [0.1, 3.0]                 # the new master is ready after 3 s
    sup = supervisor(fake, ready_timeout=10, retire_timeout=0.5, upgrade="spawn")
    left = 2.0 + 0.5 + FINISH_MARGIN              # it must give up at 2 s, long before 3
    answer, took = run_one_reload(sup, systemd_timeout(left))
    assert not answer["ok"], answer
    assert 1.8 < took < left - 0.4, took          # ended before the client's deadline, with a margin
    assert "systemd's reload timeout (TimeoutStartSec=6 s)" in answer["error"], answer
    assert "while waiting for new master" in answer["error"], answer
    assert "raise TimeoutStartSec= or lower --ready-timeout" in answer["error"], answer
    assert "the old release keeps serving" in answer["error"], answer
    assert sup.notifier.ready_pids()[-1] == fake.started[0].pid     # the old master, READY again
    booted = next(i for i, m in enumerate(sup.notifier.messages) if m.get("READY"))
    assert not [m for m in sup.notifier.messages[booted:] if "EXTEND_TIMEOUT_USEC" in m], \
        "no reload-wide extension undoes TimeoutStartSec="


def test_a_deadline_already_too_close_never_starts_the_new_release_serving(fake):
    sup = supervisor(fake, ready_timeout=10, retire_timeout=1.0, upgrade="spawn")
    answer, took = run_one_reload(sup, systemd_timeout(1.0))
    assert not answer["ok"] and "ends in" in answer["error"], answer
    assert took < 1.0, took
    assert sup.notifier.ready_pids()[-1] == fake.started[0].pid


def test_a_reload_that_fits_its_deadline_goes_live(fake):
    sup = supervisor(fake, ready_timeout=10, retire_timeout=0.5, upgrade="spawn")
    answer, _ = run_one_reload(sup, systemd_timeout(30.0, 30.0) + [
        {"in": 40.0, "by": "--timeout", "setting": 40.0, "extends": False}])
    assert answer["ok"], answer


@pytest.mark.parametrize("extends", [True, False])
def test_the_shims_own_extension_moves_systemds_deadline_and_nothing_else(fake, extends):
    """EXTEND_TIMEOUT_USEC= moves systemd's reload timer (the shim's belief moves with
    it); a client's own --timeout does not move."""
    fake.boot_delays = [0.1, 2.0]
    sup = supervisor(fake, ready_timeout=10, retire_timeout=0.5, upgrade="spawn")
    sup.notifier = Heard()
    sup.notifier.on_extend = lambda until: sup.deadlines.extended(sup.askers + sup.reloads, until)
    given = [{"in": 1.0 + 0.5 + FINISH_MARGIN, "by": "TimeoutStartSec" if extends else "--timeout",
              "setting": 6.0, "extends": extends}]
    answer, _ = run_one_reload(sup, given, during=lambda: sup.notifier.extend_timeout(30))
    assert answer["ok"] is extends, answer
    if not extends:
        assert "the reload client's --timeout (6 s)" in answer["error"], answer


@pytest.mark.parametrize("given", [
    "soon", [1], [{"in": 1, "by": "TimeoutStopSec", "setting": 1}], [{"in": "1", "by": "--timeout", "setting": 1}],
    [{"in": float("nan"), "by": "--timeout", "setting": 1}], [{"in": 1, "by": "--timeout", "setting": 0}],
    [{"in": True, "by": "--timeout", "setting": 1}], [{"in": 1, "by": "--timeout", "setting": 1, "extends": 1}],
    [{"in": 1, "by": "--timeout", "setting": 1e300}], [{"in": 1, "by": "--timeout", "setting": 1}] * 9,
])
def test_hostile_deadlines_are_refused(given):
    with pytest.raises(ValueError):
        deadline.from_request({"command": "reload", "deadlines": given})


def test_deadlines_are_bounded():
    [d] = deadline.from_request({"deadlines": [{"in": -5, "by": "--timeout", "setting": 3}]}, now=100.0)
    assert d.at == 100.0                          # passed already: now, not in the past
    [d] = deadline.from_request({"deadlines": [{"in": 1e6, "by": "TimeoutStartSec", "setting": 6}]}, now=0.0)
    assert d.at == 6.0                            # never more than the setting itself
    assert deadline.from_request({"deadlines": [{"in": 1e12, "by": "--timeout", "setting": 1e8}]}) == []
    assert deadline.from_request({"command": "reload"}) == []


def test_a_malformed_deadline_is_answered_and_the_shim_serves_on(fake):
    sup = supervisor(fake)
    answers = []

    def ask() -> None:
        sup.handle_request({"command": "reload", "deadlines": [{"in": "x"}]}, Asker(answers.append))
        sup.handle_request({"command": "reload-wait", "deadlines": {}}, Asker(answers.append))
        stop_signal(signal.SIGQUIT)
    when_serving(sup, ask)
    assert sup.run() == 0
    assert [a["ok"] for a in answers] == [False, False], answers
    assert all(a["error"].startswith("malformed request: deadlines") for a in answers), answers
    assert len(fake.started) == 1                 # no reload was begun


# -- the client's side: what systemd says --------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("6s", 6.0), ("2min 30s", 150.0), ("1.500s", 1.5), ("500ms", 0.5), ("1h 2min 3s", 3723.0),
    ("infinity", None), ("", None), ("0", None), ("5", None), ("-1s", None), ("abc", None)])
def test_timespans_as_systemctl_show_prints_them(text, seconds):
    assert jobdeadline.timespan(text) == seconds


def _show(**props):
    def show(unit, user, names):
        assert set(names) == set(jobdeadline.PROPERTIES)
        return props
    return show


def test_the_client_reads_its_own_reload_jobs_timeout():
    """Its control process (here: this very process) started a moment ago: the
    deadline is TimeoutStartSec= from then, the job's own from the state change."""
    since = int((time.monotonic() - 1.0) * 1e6)
    found = jobdeadline.job_deadlines("app.service", False, _show(
        ActiveState="reloading", ControlPID=str(os.getpid()), TimeoutStartUSec="1h",
        JobTimeoutUSec="10s", JobRunningTimeoutUSec="infinity", StateChangeTimestampMonotonic=str(since)))
    started = jobdeadline._started(os.getpid())
    alive = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    by = {d["by"]: d for d in found}
    assert set(by) == {"TimeoutStartSec", "JobTimeoutSec"}, found
    assert abs(by["TimeoutStartSec"]["in"] - (3600 - alive)) < 0.5 and by["TimeoutStartSec"]["extends"]
    assert 8.5 < by["JobTimeoutSec"]["in"] < 9.1 and not by["JobTimeoutSec"]["extends"]


@pytest.mark.parametrize("props", [
    dict(ActiveState="active", ControlPID=str(os.getpid()), TimeoutStartUSec="6s"),     # not reloading
    dict(ActiveState="reloading", ControlPID="1", TimeoutStartUSec="6s"),               # not ours... see below
    dict(ActiveState="reloading", ControlPID="0", TimeoutStartUSec="6s"),
    dict(ActiveState="reloading", ControlPID=str(os.getpid()), TimeoutStartUSec="infinity"),
])
def test_no_deadline_outside_the_units_reload_job(props):
    if props["ControlPID"] == "1":
        props["ControlPID"] = str(os.getppid() if os.getppid() != 1 else 0) + "0"   # some other process
    assert jobdeadline.job_deadlines("app.service", False, _show(**props)) == []


def test_the_client_sends_the_earlier_of_timeout_and_the_job(monkeypatch):
    monkeypatch.setattr(jobdeadline, "job_deadlines", lambda unit, user, show: [
        {"in": 5.0, "by": "TimeoutStartSec", "setting": 6.0, "extends": True}])
    sent = jobdeadline.deadlines(3.0, "app.service", None)
    assert [d["by"] for d in sent] == ["--timeout", "TimeoutStartSec"]
    assert jobdeadline.deadlines(None, None, None) == []


def test_a_cpu_wait_moves_systemds_reload_timer_by_the_seconds_waited_only(fake):
    """On a busy host the ready timeout counts the master's own time; systemd's
    reload timer moves by the same seconds (EXTEND_TIMEOUT_USEC= to the client's
    deadline + the wait), not to the shim's whole remaining need."""
    fake.boot_delays = [0.1, 1.2]
    sup = supervisor(fake, ready_timeout=0.5, retire_timeout=0.5, upgrade="spawn")
    sup.notifier = Heard()
    sup.notifier.on_extend = lambda until: sup.deadlines.extended(sup.askers + sup.reloads, until)
    t0 = []

    def busy_host() -> None:                   # the new master waits 0.9 s of every second
        if len(fake.started) == 2:
            fake.cpu_wait[fake.started[1].pid] = 0.9 * (time.monotonic() - t0[0])
        sup.loop.call_later(0.05, busy_host)
    answer, took = run_one_reload(sup, systemd_timeout(30.0, 30.0),
                                  during=lambda: (t0.append(time.monotonic()), busy_host()))
    assert answer["ok"], answer
    booted = next(i for i, m in enumerate(sup.notifier.messages) if m.get("READY"))
    [extension] = [m["EXTEND_TIMEOUT_USEC"] for m in sup.notifier.messages[booted:] if "EXTEND_TIMEOUT_USEC" in m]
    moved = 30.0 + 1.0 - 1.1                   # the deadline + about 1 s waited, from about 1.1 s in
    assert abs(extension / 1e6 - moved) < 0.6, extension


def test_a_timeout_no_reload_can_fit_names_the_drain_as_the_limit(fake):
    """TimeoutStartSec=4 with --retire-timeout 3: even a master ready at once could not
    finish; the advice is the one that helps (a lower --ready-timeout would not), and
    the release, which did nothing wrong, is not recorded as failed."""
    sup = supervisor(fake, ready_timeout=10, retire_timeout=3.0, upgrade="spawn")
    sup.remembered.path = str(fake.root) + "/state.json"
    answer, _took = run_one_reload(sup, systemd_timeout(4.0, setting=4.0), during=lambda: fake.deploy("r2"))
    assert not answer["ok"], answer
    assert "lower --retire-timeout below 2 s or raise TimeoutStartSec=" in answer["error"], answer
    assert "last_failed_release" not in sup.remembered.data, sup.remembered.data
