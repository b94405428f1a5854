"""Issue 17: what only Puma needs. The guarantees shared with Unicorn and Gunicorn
run for Puma through the `server` fixture of the core, reload, fault and control tests."""
from __future__ import annotations

import os
import re
import subprocess
import time

import psutil
import pytest

from shim.runtime import servers
from shim.tooling import generator
from shim.errors import ShimError
from support.apps import free_port
from support.load import Load, get

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(REPO, "bin", "unicorn-shim")


@pytest.mark.parametrize("command", [
    ["puma", "-C", "config/puma.rb"],
    ["bundle", "exec", "--keep-file-descriptors", "puma", "-C", "config/puma.rb"],
    ["bin/puma"],
    ["/usr/bin/ruby3.1", "/srv/app/current/bin/puma", "-e", "production"],
])
def test_puma_is_told_from_its_command(command):
    assert servers.detect(command) is servers.PUMA
    assert servers.detect(["ruby", "app.rb"], "puma") is servers.PUMA


def test_pumactl_is_not_a_server():
    with pytest.raises(ShimError, match=re.escape("--server unicorn|gunicorn|puma")):
        servers.detect(["pumactl", "start"])


def test_puma_serves_the_held_sockets_only():
    """LISTEN_FDS (LISTEN_PID is set after fork), a --bind per held socket in the URL
    Puma's socket activation matches, and a flag that drops every other bind."""
    assert servers.PUMA.socket_env([3, 4]) == {"LISTEN_FDS": "2"} and servers.PUMA.sets_listen_pid
    assert servers.PUMA.listen_args(["127.0.0.1:8080", "[::1]:8080", "/run/app.sock"]) == [
        "--bind=tcp://127.0.0.1:8080", "--bind=tcp://[::1]:8080", "--bind=unix:///run/app.sock",
        "--bind-to-activated-sockets=only"]
    assert servers.PUMA.graceful_stop.name == "SIGTERM" and servers.PUMA.default_upgrade == "spawn"
    assert not servers.PUMA.usr2_carries_sockets and "same pid" in servers.PUMA.usr2_refusal


def test_puma_worker_titles():
    title = servers.PUMA.worker_title
    assert title.search("puma: cluster worker 0: 4242 [app]")
    assert title.search("puma: cluster worker 12: 4242")
    assert not title.search("puma 5.6.5 (tcp://127.0.0.1:8080) [app]")


def test_usr2_is_refused_for_puma():
    r = subprocess.run([SHIM, "run", "--listen", f"127.0.0.1:{free_port()}", "--upgrade", "usr2", "--",
                        "puma", "-C", "config/puma.rb"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usr2" in r.stderr and "spawn" in r.stderr, r.stderr


def test_generator_takes_bundle_exec_puma(tmp_path):
    conf, out = tmp_path / "etc", tmp_path / "out"
    conf.mkdir()
    out.mkdir()
    (conf / "shop.conf").write_text(
        "APP_DIR=/srv/shop/current\nLISTEN=127.0.0.1:8080\n"
        "SERVER_COMMAND=bundle exec --keep-file-descriptors puma -C config/puma.rb -e production\n")
    assert generator.generate(str(conf), str(out)) == []
    service = (out / "unicorn-shim@shop.service.d" / generator.DROPIN).read_text()
    assert "KillSignal=SIGTERM" in service
    assert ("-- bundle exec --keep-file-descriptors puma -C config/puma.rb -e production") in service


# -- under a real systemd ----------------------------------------------------

def listening(pids):
    """Addresses the processes listen on, as "host:port"."""
    found = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found |= {f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN}
    return found


@pytest.mark.parametrize("server", ["puma"])
def test_puma_binds_nothing_of_its_own_and_stays_quiet_to_systemd(deploy, manager, server):
    """A config bind for another port is dropped; Puma's systemd plugin (ruby-sd-notify
    is installed) never starts, because the shim keeps NOTIFY_SOCKET to itself."""
    other = free_port()
    d = deploy(service_extra="WatchdogSec=30")
    d.app.release(extra=f'bind "tcp://127.0.0.1:{other}"')
    d.start()
    with Load(d.port) as load:
        d.app.release(extra=f'bind "tcp://127.0.0.1:{other}"')
        assert d.reload().returncode == 0
    assert load.failures() == [], load.failure_kinds()
    assert listening(manager.unit_processes()) == {f"127.0.0.1:{d.port}"}
    text = manager.wait_journal("Activated tcp://127.0.0.1:%d" % d.port)
    assert "Activated tcp://127.0.0.1:%d" % d.port in text          # Puma's own word for LISTEN_FDS
    # what Puma logs when it finds NOTIFY_SOCKET and WATCHDOG_USEC
    assert "Enabling systemd notification integration" not in text and "Pinging systemd watchdog" not in text


@pytest.mark.parametrize("server", ["puma"])
def test_puma_pid_file_names_the_serving_master(deploy, manager, server):
    """Puma deletes its pid file on exit whatever it names; with the hook an old
    master leaves the new master's file alone."""
    d = deploy()
    d.start()
    for _ in range(2):
        d.app.release()
        assert d.reload().returncode == 0
        time.sleep(0.3)      # the old master's exit, which used to delete the file
        with open(d.app.pid_file) as f:
            assert int(f.read()) == d.assert_main_pid_is_live_master()
    assert not os.path.exists(d.app.pid_file + ".oldbin")
    assert manager.events("pid-file-repaired") == []


@pytest.mark.parametrize("server", ["puma"])
@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_puma_bad_release_fails_in_seconds_with_its_own_error(deploy, manager, server, preload):
    """preload_app!: the new master dies loading the app. Without it Puma's master
    respawns failing workers forever: the shim counts their deaths."""
    d = deploy(preload=preload, shim_args="--ready-timeout 60")
    d.start()
    old = d.assert_main_pid_is_live_master()
    with Load(d.port) as load:
        d.app.release(broken=True)
        t = time.monotonic()
        r = d.reload()
        took = time.monotonic() - t
        assert get(d.port, timeout=5).release == "r1"
    assert r.returncode != 0 and took < 5, took
    reason = manager.wait_events("reload-failed")[-1]["REASON"]
    assert ("exited" if preload else "crash-looping") in reason, reason
    # the server's own error: preload names the exception; a worker, only where it was raised
    said = "release r2 is broken" if preload else "Unable to start worker"
    assert said in manager.wait_journal(said)
    assert load.failures() == [], load.failure_kinds()
    assert d.assert_main_pid_is_live_master() == old
