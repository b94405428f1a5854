"""The outcome reported is the outcome: when a reload's client goes away — systemd's
job timeout kills ExecReload=, `unicorn-shim reload --timeout` gives up — the
hand-over is rolled back at once and the new release never goes live afterwards.
Real systemd, real servers, load running."""
from __future__ import annotations

import signal
import subprocess
import threading
import time

from support.deploy import SHIM
from support.load import Load, get
from support.systemd import WAIT

BOOT = 12          # seconds the new release's config takes to load
GIVE_UP = 3        # when the reload's client goes away


def test_a_reload_whose_exec_reload_is_killed_never_goes_live(deploy, manager):
    """What systemd does when a reload job times out: it kills ExecReload= (its
    control process). Here at GIVE_UP s, with `systemctl kill --kill-whom=control`."""
    d = deploy(shim_args="--ready-timeout 60")

    def kill_exec_reload() -> None:
        time.sleep(GIVE_UP)
        manager.systemctl("kill", "--kill-whom=control", "-s", "SIGTERM", "app.service")
    _client_goes_away(d, manager, d.reload, kill_exec_reload)


def test_a_reload_client_interrupted_rolls_the_reload_back(unicorn_deploy, manager):
    """A Ctrl-C (or a dropped SSH session) of `unicorn-shim reload`: the client
    leaves without a word. (A --timeout is a deadline it announces: the shim ends the
    hand-over before it, tests/test_deadline.py.)"""
    d = unicorn_deploy(shim_args="--ready-timeout 60")

    def reload() -> subprocess.CompletedProcess:
        client = subprocess.Popen([SHIM, "reload", "--control", f"{manager.runtime_dir}/app/control.sock"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(GIVE_UP)
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=30)
        return subprocess.CompletedProcess(client.args, client.returncode, out, err)
    _client_goes_away(d, manager, reload, lambda: None)


def _client_goes_away(d, manager, reload, meanwhile) -> None:
    d.start()
    good = f"r{d.app.count}"
    old_master = d.assert_main_pid_is_live_master()
    with Load(d.port, clients=3) as load:
        d.app.release(extra=d.app.slow_boot(BOOT))
        t = time.monotonic()
        threading.Thread(target=meanwhile, daemon=True).start()
        r = reload()
        took = time.monotonic() - t
        assert r.returncode != 0, r.stderr
        assert took < GIVE_UP + 3, took
        failed = _event(manager, "reload-failed")
        assert "went away" in failed["REASON"], failed
        # past the moment the slow release would have finished booting
        deadline = t + BOOT + 4
        while time.monotonic() < deadline:
            assert get(d.port, timeout=5).release == good
            time.sleep(0.5)
        assert manager.events("reload-done") == []
    assert load.failures() == [], load.failure_kinds()
    assert d.assert_main_pid_is_live_master() == old_master
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert "went away" in st["StatusText"] or "failed" in st["StatusText"], st
    # the next deploy works as usual
    d.app.release()
    r = d.reload()
    assert r.returncode == 0, r.stderr + manager.journal_text()[-2000:]
    assert get(d.port).release == f"r{d.app.count}"


def _event(manager, name: str, timeout: float = WAIT) -> dict:
    """The first `name` event, waited for: journald may store it a moment later."""
    found = manager.wait_events(name, timeout=timeout)
    assert found, f"no {name} event within {timeout} s"
    return found[0]
