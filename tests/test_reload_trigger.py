"""Issue 16: the shipped units reload with two ExecReload= lines, a shell's kill
to the shim (its pid in shim.pid of the runtime directory) and `unicorn-shim
reload --signalled`, which reports that reload. `systemctl reload` must mean
exactly what the one-line `unicorn-shim reload` meant: one reload per call, exit
0 once the new release serves, a failure with the reason when it is rolled back.
Real systemd user manager, real servers, load running."""
from __future__ import annotations

import os
import signal
import subprocess

from support.deploy import REPO, SHIM
from support.load import Load, get
from support.systemd import eventually


def trigger_lines() -> str:
    """units/app.service's ExecReload= lines (RuntimeDirectory=app, as the test unit's),
    running the shim of this checkout."""
    with open(os.path.join(REPO, "units", "app.service")) as f:
        lines = [line for line in f if line.startswith("ExecReload=")]
    assert len(lines) == 2 and "kill -HUP" in lines[0] and lines[1].rstrip().endswith("reload --signalled")
    return "ExecReload=\n" + "".join(line.replace("/usr/bin/unicorn-shim", SHIM) for line in lines)


def shim_pid_file(manager) -> str:
    return os.path.join(manager.runtime_dir, "app", "shim.pid")


def shim_pid(manager) -> int:
    with open(shim_pid_file(manager)) as f:
        return int(f.read().split()[0])


def client(manager, *args: str) -> subprocess.CompletedProcess:
    control = os.path.join(manager.runtime_dir, "app", "control.sock")
    return subprocess.run([SHIM, "reload", "--signalled", "--control", control, *args], capture_output=True,
                          text=True, timeout=120)


def test_systemctl_reload_through_the_signal_deploys_once_and_reports(deploy, manager):
    d = deploy(service_extra=trigger_lines())
    d.start()
    pid = shim_pid(manager)
    assert pid in manager.unit_processes() and "unicorn-shim" in open(f"/proc/{pid}/cmdline").read()
    with Load(d.port, clients=2) as load:
        name = d.app.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr + manager.journal_text()[-3000:]
        assert get(d.port).release == name
        d.assert_main_pid_is_live_master()
        # the signal started the reload; the client reported it and asked for no other
        assert [e["SIGNAL"] for e in manager.wait_events("signal")] == ["SIGHUP"]
        assert [e["GENERATION"] for e in manager.wait_events("reload-start")] == ["2"]
        assert "reloaded: generation 2" in manager.wait_journal("reloaded: generation 2")

        d.app.release(broken=True)
        r = d.reload()
        assert r.returncode != 0
        assert get(d.port).release == name
    assert load.failures() == [], load.failure_kinds()
    assert [e["GENERATION"] for e in manager.wait_events("reload-start", 2)] == ["2", "3"]
    assert [e["GENERATION"] for e in manager.wait_events("reload-failed")] == ["3"]
    client_lines = eventually(lambda: manager.journal_text() + "\n".join(
        str(e.get("MESSAGE")) for e in manager.journal("SYSLOG_IDENTIFIER=unicorn-shim")),
        lambda text: "reload failed" in text)
    assert "reload failed" in client_lines
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st


def test_a_reload_over_before_the_client_asks_is_reported_once(unicorn_deploy, manager):
    """The client may start after the hand-over ended (a busy host): it gets that
    reload's answer. A second `--signalled` with no signal since asks for a reload."""
    d = unicorn_deploy(service_extra=trigger_lines())
    d.start()
    first = d.app.release()
    os.kill(shim_pid(manager), signal.SIGHUP)
    assert len(manager.wait_events("reload-done")) == 1
    r = client(manager)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("reloaded: generation 2") and first in r.stdout
    assert len(manager.events("reload-start")) == 1

    second = d.app.release()
    r = client(manager)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("reloaded: generation 3") and second in r.stdout
    assert get(d.port).release == second


def test_without_the_pid_file_the_client_reloads_itself(unicorn_deploy, manager):
    """A shim started before the unit had the kill line has no shim.pid: the kill
    line fails (its "-" lets systemd go on) and `systemctl reload` still deploys, once."""
    d = unicorn_deploy(service_extra=trigger_lines())
    d.start()
    os.unlink(shim_pid_file(manager))
    name = d.app.release()
    r = d.reload()
    assert r.returncode == 0, r.stderr + manager.journal_text()[-3000:]
    assert get(d.port).release == name
    assert [e["GENERATION"] for e in manager.wait_events("reload-done")] == ["2"]
    assert manager.events("signal") == []


def test_a_pid_reused_after_a_crash_is_not_signalled(unicorn_deploy, manager):
    """shim.pid names a process that is not the shim any more (the shim crashed and
    its pid went to another process): the kill line leaves it alone, and the
    client asks for the reload itself."""
    d = unicorn_deploy(service_extra=trigger_lines())
    d.start()
    other = subprocess.Popen(["sleep", "600"])        # SIGHUP would end it
    try:
        with open(shim_pid_file(manager)) as f:
            start = f.read().split()[1]
        with open(shim_pid_file(manager), "w") as f:
            f.write(f"{other.pid} {start}\n")
        name = d.app.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr + manager.journal_text()[-3000:]
        assert other.poll() is None
        assert get(d.port).release == name
        assert [e["GENERATION"] for e in manager.wait_events("reload-done")] == ["2"]
        assert manager.events("signal") == []
    finally:
        other.kill()
        other.wait()


def test_a_signalled_reload_refused_while_starting_is_reported(unicorn_deploy, manager):
    d = unicorn_deploy(service_extra=trigger_lines())
    d.app.release(extra=d.app.slow_boot(8))
    d.write_units()
    assert manager.systemctl("start", "app.socket").returncode == 0
    assert manager.systemctl("start", "--no-block", "app.service").returncode == 0
    eventually(lambda: os.path.exists(shim_pid_file(manager)), bool, interval=0.05)
    os.kill(shim_pid(manager), signal.SIGHUP)
    r = client(manager)
    assert r.returncode == 10 and "still starting" in r.stderr, (r.stdout, r.stderr)
    assert manager.wait_for("app.service", timeout=60, ActiveState="active")["ActiveState"] == "active"
    assert manager.events("reload-start") == []


def test_the_pid_file_goes_when_the_shim_stops(unicorn_deploy, manager):
    d = unicorn_deploy(service_extra=trigger_lines() + "RuntimeDirectoryPreserve=yes\n")
    d.start()
    assert os.path.exists(shim_pid_file(manager))
    d.stop()
    assert os.path.isdir(os.path.dirname(shim_pid_file(manager)))
    assert not os.path.exists(shim_pid_file(manager))
