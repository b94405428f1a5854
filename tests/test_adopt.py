"""Adoption's pieces, fast and without systemd: the watcher's shell protocol (which
line makes it exec a new shim, which makes it leave), and the new shim's checks of
what it is handed, hostile input included. Under real systemd: test_failpaths_shim.py."""
from __future__ import annotations

import json
import signal
import os
import socket
import subprocess
import sys
import time

import pytest

from shim.errors import ShimError
from shim.runtime import adopt, procs
from shim.runtime.journal import Log
from shim.runtime.notify import Notifier

RECORD = {"shim": 100, "shim_start": 5, "master": 4242, "start": 77, "generation": 3,
          "probe": None, "probes": 3, "fallback": None, "degraded": None}


def run_watcher(tmp_path, lines: str, listener: socket.socket) -> dict:
    """The watcher's script fed `lines` then EOF; what the command it execs saw, or {}."""
    out = tmp_path / "exec.json"
    probe = ("import json, os, sys; json.dump({'adopt': os.environ.get('%s'), 'exec': os.environ.get('%s'),"
             " 'fd_open': os.path.exists('/proc/self/fd/%d'), 'stdin': os.readlink('/proc/self/fd/0')},"
             " open(sys.argv[1], 'w'))" % (adopt.ADOPT_ENV, adopt.EXEC_ENV, listener.fileno()))
    env = {"PATH": "/usr/bin:/bin", adopt.EXEC_ENV: f"{sys.executable} -c \"{probe}\" {out}"}
    r = subprocess.run(["/bin/sh", "-c", adopt.WATCHER, "shim-watcher"], input=lines.encode(), env=env,
                       pass_fds=[listener.fileno()], timeout=30)
    assert r.returncode == 0
    return json.loads(out.read_text()) if out.exists() else {}


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s
    s.close()


def test_the_watcher_execs_a_new_shim_only_after_a_masters_line(tmp_path, listener):
    line = json.dumps(RECORD)
    seen = run_watcher(tmp_path, f"hold\n{line}\n", listener)
    assert seen == {"adopt": line, "exec": None, "fd_open": True, "stdin": "/dev/null"}
    # A half-written line (the shim died mid-write) is not a record: the last whole one is.
    assert run_watcher(tmp_path, f"{line}\n{{\"shim\": 1", listener)["adopt"] == line


@pytest.mark.parametrize("lines", ["", "hold\n", "{}\nhold\n", "{}\nexit\n{}\n", "exit\n", "garbage\n"])
def test_the_watcher_leaves_quietly_otherwise(tmp_path, listener, lines):
    """A boot, a hand-over (MAINPID is the shim: systemd restarts the unit), a stop, an exit."""
    assert run_watcher(tmp_path, lines, listener) == {}


@pytest.mark.parametrize("text", [
    "", "null", "[]", "{", "[" * 100000, json.dumps({**RECORD, "master": 1}), json.dumps({**RECORD, "master": True}),
    json.dumps({**RECORD, "generation": 0}), json.dumps({**RECORD, "start": -1}), json.dumps({**RECORD, "start": 2.5}),
    json.dumps({**RECORD, "probe": ""}), json.dumps({**RECORD, "degraded": "x" * 5000}),
    json.dumps({**RECORD, "fallback": "a\0b"}), json.dumps({k: v for k, v in RECORD.items() if k != "shim"}),
    json.dumps({**RECORD, "pad": "x" * 20000}), json.dumps({**RECORD, "adoptions": [1.0] * 4}),
    json.dumps({**RECORD, "adoptions": ["1"]}), json.dumps({**RECORD, "adoptions": {}})])
def test_a_hostile_record_is_refused_and_said(tmp_path, monkeypatch, text):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    environ = {adopt.ADOPT_ENV: text, adopt.SOCKETS_ENV: json.dumps([[3, "listen", None]])}
    with pytest.raises(ShimError) as e:
        adopt.take_record(environ, Notifier(), Log(use_journal=False))
    assert "unreadable record" in str(e.value)
    assert environ == {}
    notify.settimeout(5)
    status = notify.recv(4096).decode()
    assert status.startswith("STATUS=supervision lost: the shim died; the master serves on unsupervised: "
                             "no new shim could take over"), status


def test_a_shim_that_keeps_dying_after_adoption_is_not_adopted_again(tmp_path, monkeypatch):
    """Three adoptions within a minute, and the shim died again: only said, not repeated
    (a shim that crashes the same way each time would otherwise loop for ever)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    held = json.dumps([[3, "listen", None]])
    now = time.monotonic()
    recent = json.dumps({**RECORD, "adoptions": [now - 50, now - 20, now - 1]})
    with pytest.raises(ShimError, match="died again after 3 adoptions within 60 s"):
        adopt.take_record({adopt.ADOPT_ENV: recent, adopt.SOCKETS_ENV: held}, Notifier(), Log(use_journal=False))
    notify.settimeout(5)
    assert "no new shim could take over (the shim died again after 3 adoptions within 60 s" in notify.recv(4096).decode()
    # Adoptions longer ago than the window do not count.
    old = json.dumps({**RECORD, "adoptions": [now - 200, now - 100, now - 1]})
    record = adopt.take_record({adopt.ADOPT_ENV: old, adopt.SOCKETS_ENV: held}, Notifier(), Log(use_journal=False))
    assert record.adoptions == [now - 1]


@pytest.mark.parametrize("held", ["", "{}", "[]", "[[2, \"listen\", null]]", "[[3, 4, null]]", "[[3, \"x\"]]",
                                  "[[true, \"x\", null]]", "[[3, \"x\", 5]]"])
def test_hostile_socket_lists_are_refused(held):
    with pytest.raises(ValueError):
        adopt.Record(json.dumps(RECORD), held)


def test_held_fds_that_are_not_listening_sockets_are_refused():
    r, w = os.pipe()
    try:
        record = adopt.Record(json.dumps(RECORD), json.dumps([[r, "listen", None]]))
        with pytest.raises(ShimError, match="not a socket"):
            record.sockets()
    finally:
        os.close(r)
        os.close(w)


def test_only_the_recorded_process_of_this_unit_is_adopted(tmp_path):
    me, cgroup = os.getpid(), procs.cgroup_of(os.getpid())
    start = procs.start_time(me)
    good = adopt.Record(json.dumps({**RECORD, "master": me, "start": start}), "[[3, \"listen\", null]]")
    master = good.pin(cgroup, str(tmp_path))
    assert (master.pid, master.generation, master.probe) == (me, 3, None)
    master.close()
    reused = adopt.Record(json.dumps({**RECORD, "master": me, "start": start + 1}), "[[3, \"listen\", null]]")
    with pytest.raises(ShimError, match="another start time"):
        reused.pin(cgroup, str(tmp_path))
    with pytest.raises(ShimError, match="not a process of this unit"):
        good.pin("/no/such.service", str(tmp_path))


def test_only_a_probe_socket_the_shim_made_in_its_runtime_directory_is_reattached(tmp_path):
    runtime = tmp_path / "app"
    runtime.mkdir()
    made = socket.socket(socket.AF_UNIX)
    made.bind(str(runtime / "probe.2.sock"))
    (runtime / "probe.3.sock").symlink_to(runtime / "probe.2.sock")
    (runtime / "probe.4.sock").write_text("")
    assert adopt._own_probe(str(runtime / "probe.2.sock"), str(runtime), 4)
    assert not adopt._own_probe(str(runtime / "probe.2.sock"), str(runtime), 1)      # never made
    assert not adopt._own_probe(str(runtime / "probe.3.sock"), str(runtime), 4)      # a symlink
    assert not adopt._own_probe(str(runtime / "probe.4.sock"), str(runtime), 4)      # not a socket
    assert not adopt._own_probe(str(runtime / "probe.2.sock"), str(tmp_path), 4)     # elsewhere
    assert not adopt._own_probe(str(runtime / "control.sock"), str(runtime), 4)
    made.close()


class Events:
    def __init__(self):
        self.seen = []

    def event(self, event, message, *args, **fields):
        self.seen.append(event)


@pytest.mark.parametrize("last", ["exit", "hold"])
def test_a_watcher_gone_is_said_except_when_the_stop_ended_it(last):
    """A stop's signal reaches the watcher as it reaches the shim: the shim's "exit" then
    finds it gone, which is no news. Gone at any other time, the shim says so."""
    log = Events()
    watcher = adopt.Watcher([], log)
    os.kill(watcher.pid, signal.SIGQUIT)
    os.waitpid(watcher.pid, 0)
    watcher.tell(last)
    assert log.seen == ([] if last == "exit" else ["watcher-gone"])
    assert watcher.fd == -1


def test_an_adopting_shim_that_cannot_go_on_says_so(tmp_path, monkeypatch):
    """A check of its command line failing now (the server's binary gone, the control socket
    taken): STATUS= says supervision is lost and why, not "adopting" for ever."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    record = adopt.Record(json.dumps(RECORD), "[[3, \"listen\", null]]")
    with pytest.raises(adopt.NotAdopted) as e:
        adopt.not_adopted(record, ShimError("cannot start 'bundle': not found", 5), Log(use_journal=False))
    assert "not found" in str(e.value)
    notify.settimeout(5)
    status = notify.recv(4096).decode()
    assert status.startswith("STATUS=supervision lost: the shim (pid 100) died; master 4242 serves on "
                             "unsupervised: no new shim could take over (cannot start 'bundle': not found)"), status
    adopt.not_adopted(None, ShimError("x", 2), Log(use_journal=False))          # not adopting: nothing to say
    adopt.not_adopted(record, e.value, Log(use_journal=False))                  # said already
