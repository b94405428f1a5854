"""The outcome reported is the outcome: when a reload's client goes away — systemd
kills ExecReload=, a Ctrl-C — the hand-over is rolled back at once and the new
release never goes live afterwards. Real systemd, real servers, load running: the
fixture app of each server, the classic Unicorn setup with a non-root User= (here),
the packaged unicorn-shim@.service on the system manager (tests/test_jobtimeout_packaged.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from support.classic import classic  # noqa: F401 (a fixture)
from support.deploy import SHIM
from support.load import Load, get
from support.systemd import WAIT, eventually

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


def test_classic_setup_as_a_non_root_user_rolls_an_abandoned_reload_back(classic, manager):
    """The setup real Unicorn shops run (tests/support/classic.py): the run script's
    `unicorn -c $APP_ROOT/config/unicorn.rb`, the classic config (its before_fork
    QUITs the .oldbin master), User=shimtest; ExecReload= killed mid hand-over."""
    d = classic(absolute_config=True, bundler=False, shim_args="--ready-timeout 60")
    d.start()
    good = f"r{d.count}"
    old_master = int(d.state()["MainPID"])
    with Load(d.port, clients=3) as load:
        slow = os.path.join(d.root, "releases", d.release())
        with open(os.path.join(slow, "config", "unicorn.rb"), "a") as f:
            f.write(f"sleep {BOOT}\n")                # the master reads its config for BOOT s
        t = time.monotonic()

        def kill_exec_reload() -> None:
            time.sleep(GIVE_UP)
            manager.systemctl("kill", "--kill-whom=control", "-s", "SIGTERM", "app.service")
        threading.Thread(target=kill_exec_reload, daemon=True).start()
        r = d.reload()
        assert r.returncode != 0, r.stderr
        assert time.monotonic() - t < GIVE_UP + 3
        failed = _event(manager, "reload-failed")
        assert "went away" in failed["REASON"], failed
        while time.monotonic() < t + BOOT + 4:
            assert get(d.port, timeout=5).release == good
            assert d.unix_get().startswith(f"release={good} ")       # the config's own unix socket too
            time.sleep(0.5)
        assert manager.events("reload-done") == []
    assert load.failures() == [], load.failure_kinds()
    st = eventually(d.state, lambda s: s["SubState"] == "running")
    assert (st["ActiveState"], st["SubState"], st["User"]) == ("active", "running", "shimtest"), st
    assert int(st["MainPID"]) == old_master
    left = eventually(lambda: [p for p in manager.unit_processes() if _cwd(p) == slow], lambda p: p == [])
    assert left == [], f"processes of the abandoned release left: {left}"
    fixed = d.release()
    r = d.reload()
    assert r.returncode == 0, r.stderr + d.journal_text()[-3000:]
    assert get(d.port).release == fixed


def _cwd(pid: int) -> str:
    try:
        return os.path.realpath(f"/proc/{pid}/cwd")
    except OSError:
        return ""
