"""Issue 4: the control socket trusts nobody it should not, and nothing a client
does to it affects the app. Issue 7: status reflects reality."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import tempfile
import time

from support.deploy import SHIM
from support.load import Load


def control_path(manager):
    return os.path.join(manager.runtime_dir, "app", "control.sock")


def test_control_socket_mode_owner_and_peer_check(unicorn_deploy, manager):
    public = tempfile.mkdtemp()
    os.chmod(public, 0o755)          # the runtime directory is 0700: put it where others can reach
    path = os.path.join(public, "control.sock")
    d = unicorn_deploy(shim_args=f"--control-mode 0666 --control {path}")
    d.start()
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0 and oct(st.st_mode & 0o777) == "0o666"
    # a second, unprivileged user: connected (mode 0666) but refused by SO_PEERCRED
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        SHIM, "reload", "--control", path], capture_output=True, text=True, timeout=30)
    assert r.returncode == 10 and "permission denied" in r.stderr
    refused = manager.wait_events("control-refused")
    assert len(refused) == 1 and refused[0]["UID"] == "65534"
    assert manager.events("reload-start") == []


def test_default_control_socket_is_private(unicorn_deploy, manager):
    d = unicorn_deploy()
    d.start()
    path = control_path(manager)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        SHIM, "status", "--control", path], capture_output=True, text=True, timeout=30)
    assert r.returncode == 9 and "Permission denied" in r.stderr


def test_hostile_clients_do_not_disturb_the_app(deploy, manager):
    d = deploy()
    d.start()
    path = control_path(manager)
    with Load(d.port) as load:
        silent = []
        for _ in range(100):             # 100 concurrent clients that never speak
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            silent.append(s)
        for payload in (b"garbage\n", b"{\"command\": 42}\n", b"[1,2]\n", b"x" * 100000 + b"\n", b"\xff\xfe\n"):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            try:
                s.sendall(payload)
                answer = s.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
            s.close()
            assert answer == b"" or json.loads(answer)["ok"] is False
        status = subprocess.run([SHIM, "status", "--json", "--control", path], capture_output=True, text=True,
                                timeout=30)
        time.sleep(6)                    # the silent ones time out on the shim's side
        for s in silent:
            s.settimeout(1)
            assert b"malformed request" in s.recv(65536)
            s.close()
    assert status.returncode == 0, status.stderr
    assert load.failures() == [] and load.ok_count() > 0
    st = d.state()
    assert st["ActiveState"] == "active" and json.loads(status.stdout)["master_pid"] == int(st["MainPID"])


def test_status_matches_systemd(deploy, manager):
    d = deploy()
    d.start()
    d.app.release()
    assert d.reload().returncode == 0
    r = subprocess.run([SHIM, "status", "--json", "--control", control_path(manager)], capture_output=True,
                       text=True, timeout=30)
    status = json.loads(r.stdout)
    st = d.state()
    assert status["master_pid"] == int(st["MainPID"]) == d.assert_main_pid_is_live_master()
    assert status["state"] == "serving" and status["generation"] == 2
    assert status["release"].endswith("/releases/r2")
    assert status["status_line"] == st["StatusText"]
    assert "last reload ok" in st["StatusText"]
    assert status["sockets"][0]["address"] == f"127.0.0.1:{d.port}"
    human = subprocess.run([SHIM, "status", "--control", control_path(manager)], capture_output=True, text=True)
    assert human.returncode == 0 and f"master {status['master_pid']}" in human.stdout
