"""The one wait point (shim/runtime/loop.py's run) and the rules it applies to every
step: reloads asked for during a hand-over are merged into the next one, and a
hand-over whose every client went away is rolled back before its point of no
return, completed after it. Against the fake process layer of test_statemachine."""
from __future__ import annotations

import signal
import time

import pytest

from shim.runtime.loop import Loop, Wait, pause
from test_statemachine import Asker, fake, supervisor, when_serving  # noqa: F401 (fake: a fixture)


class LeavingAsker(Asker):
    """A client that goes away (systemd's job timeout killed ExecReload=) at `leave_at`."""

    def __init__(self, answer, leave_at: float) -> None:
        super().__init__(answer)
        self.leave_at = leave_at

    def gone(self) -> bool:
        return time.monotonic() >= self.leave_at


def test_reloads_asked_for_during_a_hand_over_are_merged_into_one(fake):
    fake.boot_delay = 0.3
    sup = supervisor(fake)
    results = []

    def answered(answer) -> None:
        results.append(answer)
        if len(results) == 4:
            sup._on_stop_signal(signal.SIGTERM)

    def during_first() -> None:
        assert sup.state == "reloading"
        for _ in range(3):
            sup.request_reload(Asker(answered))
    when_serving(sup, lambda: (sup.request_reload(Asker(answered)), sup.loop.call_later(0.1, during_first)))
    assert sup.run() == 0
    assert [r["ok"] for r in results] == [True] * 4
    # the first hand-over answers its one asker; the three that came meanwhile share the second
    assert [r["generation"] for r in results] == [2, 3, 3, 3]
    assert len({r["master_pid"] for r in results[1:]}) == 1


def test_a_hand_over_whose_client_left_is_rolled_back_before_the_old_master_goes(fake):
    fake.boot_delay = 1.0          # the new master boots for a second: the client leaves at 0.3 s
    sup = supervisor(fake, ready_timeout=10.0)
    results, old = [], []

    def begin() -> None:
        old.append(sup.master.pid)
        sup.request_reload(LeavingAsker(results.append, time.monotonic() + 0.3))
        sup.loop.call_later(2.0, sup._on_stop_signal, signal.SIGTERM)
    when_serving(sup, begin)
    t = time.monotonic()
    assert sup.run() == 0
    [result] = results
    assert not result["ok"] and "went away" in result["error"], result
    assert sup.notifier.mainpids()[-1] == old[0]
    assert "the old release keeps serving" in result["error"]
    # the old master was never asked to stop before the stop itself
    assert fake.procs[old[0]].signals.count(signal.SIGQUIT) <= 1
    assert sup.generation == 1 and time.monotonic() - t < 5


def test_a_client_leaving_after_the_point_of_no_return_changes_nothing(fake):
    sup = supervisor(fake, retire_timeout=3.0)
    results = []

    def begin() -> None:
        fake.procs[sup.master.pid].drain = 0.6     # the old master finishes requests for 0.6 s
        sup.request_reload(LeavingAsker(results.append, time.monotonic() + 0.35))
        sup.loop.call_later(2.0, sup._on_stop_signal, signal.SIGTERM)
    when_serving(sup, begin)
    assert sup.run() == 0
    [result] = results
    assert result["ok"] and result["generation"] == 2, result


def test_a_stop_ends_any_wait_at_once():
    """The loop, not the step, ends a wait on an interruption: a 60 s wait ends in
    the round after the stop."""
    loop = Loop()
    stopped = []

    def task():
        try:
            yield pause("a long drain", 60.0)
        except KeyboardInterrupt:
            return "interrupted"
        return "slept"
    loop.call_later(0.05, stopped.append, True)
    t = time.monotonic()
    assert loop.run(task(), lambda wait: KeyboardInterrupt() if stopped else None) == "interrupted"
    assert time.monotonic() - t < 1.0
    loop.close()


def test_a_wait_ends_on_its_event_its_deadline_or_what_its_check_raises():
    loop = Loop()
    flag = []
    loop.call_later(0.05, flag.append, 1)

    def task():
        got = yield Wait("the flag", lambda wait: flag[0] if flag else None, deadline=time.monotonic() + 5)
        late = yield Wait("nothing", lambda wait: None, deadline=time.monotonic() + 0.05,
                          expired=lambda wait: "deadline")
        try:
            yield Wait("a failure", lambda wait: 1 / 0, deadline=time.monotonic() + 5)
        except ZeroDivisionError:
            return got, late, "raised"
    assert loop.run(task(), lambda wait: None) == (1, "deadline", "raised")
    loop.close()


def test_cleanup_waits_are_not_interrupted_and_each_interruption_comes_once(fake):
    sup = supervisor(fake)
    sup.stop_requested = True
    assert sup._interruption(Wait("retiring a failed master", interruptible=False)) is None
    assert isinstance(sup._interruption(Wait("a boot")), Exception)
    assert sup._interruption(Wait("the stop's own drain")) is None


def test_a_manager_that_never_confirms_mainpid_fails_the_reload_before_anything_starts(fake, tmp_path,
                                                                                         monkeypatch):
    """An unconfirmed MAINPID=<shim> barrier is not ignored: systemd may still take the
    old master for the main process, so no hand-over begins."""
    import socket
    from shim.runtime import supervisor as supervisor_module
    path = str(tmp_path / "notify")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)                     # receives, and never closes a barrier's fd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setattr(supervisor_module, "MAINPID_CONFIRM", 0.3)
    sup = supervisor(fake)
    results, old = [], []

    def begin() -> None:
        old.append(sup.master.pid)
        sup.request_reload(Asker(results.append))
        sup.loop.call_later(1.5, sup._on_stop_signal, signal.SIGTERM)
    when_serving(sup, begin)
    assert sup.run() == 0
    [result] = results
    assert not result["ok"] and "did not confirm MAINPID" in result["error"], result
    assert sup.generation == 1 and len([p for p in fake.procs.values() if "master" in p.title]) == 1
    manager.close()


def test_a_kept_master_of_a_failed_deploy_is_reported_degraded(fake, tmp_path, monkeypatch):
    """The config's hook QUIT the old master, and the new one serves the wrong release
    (issue: a mixed release reported as 'serving'): it is kept, since nothing else
    serves, and STATUS and `status` say degraded, not serving."""
    from shim.runtime import release
    current = tmp_path / "current"
    (tmp_path / "r2").mkdir()
    current.symlink_to(tmp_path / "r2")
    monkeypatch.setattr(release, "mismatch", lambda pid, intended: "the new master runs with BUNDLE_GEMFILE=r1")
    sup = supervisor(fake)
    sup.config.chdir = str(current)
    results = []

    def begin() -> None:
        fake.next_behaviour = "quits-old"
        sup.request_reload(Asker(results.append))
        sup.loop.call_later(2.0, sup._on_stop_signal, signal.SIGTERM)
    when_serving(sup, begin)
    assert sup.run() == 0
    [result] = results
    assert not result["ok"] and "serves on as it is" in result["error"], result
    ready = [m for m in sup.notifier.messages if m.get("READY")]
    assert ready[-1]["STATUS"].startswith("degraded: reload to generation 2 failed"), ready[-1]
    assert sup.status()["degraded"].startswith("degraded:")
