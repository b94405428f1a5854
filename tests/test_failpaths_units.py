"""Fast unit tests for the failure paths: no systemd, no server."""
from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest

from shim.runtime.release import config_through
from shim.runtime.state import MAX_BYTES, State, fallback_refusal

FLAGS = ("-c", "--config-file")


def test_a_master_of_another_release_reads_nothing_through_current():
    argv = ["bundle", "exec", "unicorn", "-c", "/srv/app/current/config/unicorn.rb", "-E", "production",
            "--config-file=/srv/app/current/x.rb", "/srv/app/currently"]
    assert config_through(argv, FLAGS, "/srv/app/releases/r2", "/srv/app/current/") == [
        "bundle", "exec", "unicorn", "-c", "/srv/app/releases/r2/config/unicorn.rb", "-E", "production",
        "--config-file=/srv/app/releases/r2/x.rb", "/srv/app/currently"]


def test_a_relative_config_is_named_through_the_link():
    argv = ["unicorn", "-c", "config/unicorn.rb"]
    assert config_through(argv, FLAGS, "/srv/app/current", "/srv/app/current") == [
        "unicorn", "-c", "/srv/app/current/config/unicorn.rb"]
    assert config_through(argv, FLAGS, "/srv/app/releases/r2", "/srv/app/current") == [
        "unicorn", "-c", "/srv/app/releases/r2/config/unicorn.rb"]
    # the master of the deployed release keeps the path through current (Unicorn's re-exec reads it again)
    assert config_through(["unicorn", "-c", "/srv/app/current/c.rb"], FLAGS, "/srv/app/current",
                          "/srv/app/current") == ["unicorn", "-c", "/srv/app/current/c.rb"]


def state_from(tmp_path, content: bytes) -> State:
    (tmp_path / "state.json").write_bytes(content)
    return State(str(tmp_path))


def test_a_hostile_state_file_is_ignored_not_fatal(tmp_path):
    assert state_from(tmp_path, b"[" * 100000 + b"]" * 100000).data == {}
    assert state_from(tmp_path, b'{"last_good_release": ' + b"[" * 50000 + b"]" * 50000 + b"}").last_good is None
    assert state_from(tmp_path, b"\xff\xfe garbage").data == {}
    assert state_from(tmp_path, b'{"last_good_release": "' + b"a" * (MAX_BYTES + 10) + b'"}').data == {}
    assert state_from(tmp_path, b'{"last_good_release": 7, "other": "x"}').data == {}
    os.unlink(tmp_path / "state.json")
    os.mkfifo(tmp_path / "state.json")          # a FIFO would block a plain open()
    assert State(str(tmp_path)).data == {}
    os.unlink(tmp_path / "state.json")
    os.symlink("/dev/zero", tmp_path / "state.json")
    assert State(str(tmp_path)).data == {}


def test_the_state_file_is_written_for_the_unit_user_alone(tmp_path):
    (tmp_path / "state.json").write_text('{"last_good_release": "/srv/app/releases/r1"}')
    os.chmod(tmp_path / "state.json", 0o644)
    s = State(str(tmp_path))
    assert s.last_good == "/srv/app/releases/r1"
    s.served("/srv/app/releases/r2")
    assert stat.S_IMODE(os.stat(tmp_path / "state.json").st_mode) == 0o600
    assert State(str(tmp_path)).last_good == "/srv/app/releases/r2"


def test_only_a_real_release_directory_beside_the_deployed_one_is_a_fallback(tmp_path):
    releases = tmp_path / "releases"
    for d in ("r1", "r2"):
        (releases / d).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(releases / "r1", releases / "link")
    deployed = str(releases / "r2")
    assert fallback_refusal(str(releases / "r1"), deployed) is None
    assert "no longer exists" in fallback_refusal(str(releases / "r9"), deployed)
    assert "not beside" in fallback_refusal(str(tmp_path / "elsewhere"), deployed)
    assert "not beside" in fallback_refusal("/", deployed)
    assert "symlink" in fallback_refusal(str(releases / "link"), deployed)
    assert "normalised" in fallback_refusal(str(releases / "r2" / ".." / "r1"), deployed)
    assert "normalised" in fallback_refusal("releases/r1", deployed)


def test_a_reload_client_finding_a_dead_shim_says_so_in_status(tmp_path, monkeypatch):
    """kill -9 of the shim leaves control.sock and shim.pid behind: the client names the dead
    shim and the master that serves on, tells the operator to restart, and says it in STATUS=."""
    from shim import client
    from shim.errors import ShimError
    runtime = tmp_path / "app"
    runtime.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (runtime / "shim.pid").write_text(f"{dead.pid} 12345\n")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(runtime / "control.sock"))
    listener.close()                          # the file stays, nothing listens: ECONNREFUSED
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("MAINPID", "4242")
    with pytest.raises(ShimError) as e:
        client.request(str(runtime / "control.sock"), {"command": "reload"}, 5)
    assert f"the shim (pid {dead.pid}) died" in str(e.value) and "master 4242 serves on" in str(e.value)
    assert "restart" in str(e.value)
    notify.settimeout(5)
    status = notify.recv(4096).decode()
    assert status.startswith(f"STATUS=supervision lost: the shim (pid {dead.pid}) died; master 4242"), status
    # a live shim whose start time matches is not called dead
    (runtime / "shim.pid").write_text(f"{os.getpid()} {open('/proc/self/stat').read().rpartition(')')[2].split()[19]}")
    assert client._recorded_shim(str(runtime)) is None


def test_files_logrotate_renamed_are_found_among_a_process_open_files(tmp_path):
    from shim.runtime.logreopen import rotated_files
    names = ["app.log.1", "app.log-20261204", "gone.log.1", "live.log", "data.2", "wgunicorn-x"]
    files = [open(tmp_path / n, "a") for n in names]
    reading = open(tmp_path / "app.log.1")
    try:
        os.unlink(tmp_path / "gone.log.1")            # compressed away by logrotate
        os.unlink(tmp_path / "wgunicorn-x")           # Gunicorn's worker heartbeat file: not a log
        found = sorted(rotated_files(os.getpid()))
        assert found == sorted([str(tmp_path / "app.log.1"), str(tmp_path / "app.log-20261204"),
                                str(tmp_path / "gone.log.1") + " (deleted)"]), found
    finally:
        for f in files + [reading]:
            f.close()
