"""Issue 11 item 2 and issue 16: `unicorn-shim reload`/`status` find a unit's
shim through systemd (--unit), admit the socket's group when the mode says so,
and say what to do when they cannot. Under a real systemd user manager, with
real Unicorn/Gunicorn. (`reload APP` for the packaged units and the deploy
user's sudoers example run against the .deb in tests/test_package.py.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from support.deploy import SHIM
from support.load import Load, get


def shim(manager, *args, user=None):
    argv = [SHIM, *args]
    if user:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", user, *argv]
    env = {k: v for k, v in manager.env.items() if k != "RUNTIME_DIRECTORY"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def one_line(r):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_unit_option_finds_the_shim_through_systemd(deploy, manager):
    d = deploy()
    d.start()
    for unit in ("app", "app.service"):
        r = shim(manager, "status", "--unit", unit, "--user", "--json")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["master_pid"] == int(d.state()["MainPID"]) and status["state"] == "serving"
    with Load(d.port, clients=2) as load:
        name = d.app.release()
        r = shim(manager, "reload", "--unit", "app", "--user", "--timeout", "90")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("reloaded: generation 2") and name in r.stdout
    assert load.failures() == [] and get(d.port).release == name
    assert [e["GENERATION"] for e in manager.wait_events("reload-done")] == ["2"]

    d.app.release(broken=True)
    r = shim(manager, "reload", "--unit", "app", "--user")
    assert r.returncode == 10 and "reload failed" in one_line(r)
    assert get(d.port).release == name


def test_unit_option_follows_the_control_option_of_execstart(unicorn_deploy, manager):
    path = os.path.join(tempfile.mkdtemp(), "ctl.sock")
    d = unicorn_deploy(shim_args=f"--control {path}")
    d.start()
    r = shim(manager, "status", "--unit", "app", "--user")
    assert r.returncode == 0, r.stderr
    assert f"master {d.state()['MainPID']}" in r.stdout
    shutil.rmtree(os.path.dirname(path))


def test_unit_option_errors_say_what_is_wrong(unicorn_deploy, manager):
    r = shim(manager, "status", "--unit", "nothing-here", "--user")
    assert r.returncode == 9 and "no such unit nothing-here.service" in one_line(r)
    manager.write_unit("plain.service", "[Service]\nExecStart=/bin/sleep 600\n")
    r = shim(manager, "reload", "--unit", "plain", "--user")
    assert r.returncode == 9 and "plain.service has no RuntimeDirectory=" in one_line(r)

    d = unicorn_deploy()
    d.start()
    d.stop()
    r = shim(manager, "reload", "--unit", "app", "--user")
    assert r.returncode == 9
    assert "no shim is running" in one_line(r) and "systemctl status app.service" in one_line(r)


def test_control_mode_0660_admits_the_group_and_only_it(unicorn_deploy, manager):
    """The shim runs as root (group root); a peer of uid 65534 is admitted with root
    among its supplementary groups, refused without, and refused under 0600."""
    public = tempfile.mkdtemp()
    os.chmod(public, 0o755)
    path = os.path.join(public, "control.sock")
    d = unicorn_deploy(shim_args=f"--control-mode 0660 --control {path}")
    d.start()
    os.chmod(path, 0o666)          # let the outsider connect: the shim's own check must refuse it
    r = shim(manager, "status", "--control", path, user="--clear-groups")
    assert r.returncode == 10 and "permission denied" in one_line(r)
    assert [e["UID"] for e in manager.wait_events("control-refused")] == ["65534"]

    name = d.app.release()
    r = shim(manager, "reload", "--control", path, user="--groups=0")
    assert r.returncode == 0, r.stderr
    assert get(d.port).release == name
    shutil.rmtree(public)


def test_signalled_is_parsed_as_argparse_parses_it():
    from shim.options import build_parser
    from shim.client import parse
    for argv in (["reload", "--signalled"], ["reload", "--signalled", "--timeout", "3", "shop"]):
        fast, full = parse(argv), build_parser().parse_args(argv)
        assert fast is not None and fast.signalled is full.signalled is True
        assert (fast.app, fast.timeout) == (full.app, full.timeout)
    assert parse(["status", "--signalled"]) is None       # argparse refuses it


def answering(path: str, answers: list) -> "tuple":
    """A fake shim (unit test only): answers each connection with the next answer,
    recording the requests."""
    import json
    import socket
    import threading
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    requests = []

    def serve():
        for answer in answers:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as f:
                requests.append(json.loads(f.readline()))
                conn.sendall(json.dumps(answer).encode() + b"\n")
        listener.close()
    thread = threading.Thread(target=serve)
    thread.start()
    return thread, requests


DONE = {"ok": True, "master_pid": 2, "old_master_pid": 1, "generation": 2, "release": "r2", "duration_ms": 5}


def test_signalled_falls_back_to_asking_when_no_signalled_reload_waits(tmp_path):
    """An older shim ("unknown command") or no signal received: the client asks for
    the reload itself; a signalled reload's answer is reported as it is."""
    from shim.client import Target, reload
    path = str(tmp_path / "control.sock")
    for first in ({"ok": False, "error": "unknown command 'reload-wait'"},
                  {"ok": False, "error": "no signalled reload to report", "no_signalled_reload": True}):
        thread, requests = answering(path, [first, DONE])
        assert reload(Target(path), True, 10) == DONE
        thread.join()
        os.unlink(path)
        assert [r["command"] for r in requests] == ["reload-wait", "reload"]
    refused = {"ok": False, "error": "the service is still starting"}
    thread, requests = answering(path, [refused])
    assert reload(Target(path), True, 10) == refused
    thread.join()
    assert [r["command"] for r in requests] == ["reload-wait"]
