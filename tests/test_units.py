"""Fast unit tests of the pieces, no systemd and no server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from shim.runtime import procs, readiness, servers, sockets, spawn
from shim.errors import ShimError


@pytest.mark.parametrize("text,family,host,port", [
    ("127.0.0.1:8080", socket.AF_INET, "127.0.0.1", 8080),
    ("8080", socket.AF_INET, "0.0.0.0", 8080),
    ("*:81", socket.AF_INET, "0.0.0.0", 81),
    ("[::1]:8080", socket.AF_INET6, "::1", 8080),
    ("localhost:9000", socket.AF_INET, "127.0.0.1", 9000),
])
def test_parse_address(text, family, host, port):
    a = sockets.parse_address(text)
    assert (a.family, a.host, a.port) == (family, host, port)


def test_parse_unix_address():
    a = sockets.parse_address("unix:/run/app.sock")
    assert a.family == socket.AF_UNIX and a.path == "/run/app.sock" and str(a) == "unix:/run/app.sock"


@pytest.mark.parametrize("text", ["", ":", "host:", "1.2.3.4:0", "1.2.3.4:65536", "[::1]", "[nothex]:80",
                                  "unix:", "unix:rel", "no.such.host.invalid:80"])
def test_parse_address_rejects(text):
    with pytest.raises(ShimError) as e:
        sockets.parse_address(text)
    assert e.value.exit_status == 3


def test_server_names_match_unicorn_spelling():
    held = sockets.bind(sockets.Address(socket.AF_INET, "127.0.0.1", 0))
    try:
        host, port = held.sock.getsockname()
        assert held.name == f"127.0.0.1:{port}"
        assert servers.UNICORN.listen_args([held.name]) == [f"-l127.0.0.1:{port}"]
        assert servers.GUNICORN.listen_args([held.name]) == []
    finally:
        sockets.release([held])


@pytest.mark.parametrize("command,profile", [
    (["unicorn", "-c", "x"], "unicorn"),
    (["bundle", "exec", "--keep-file-descriptors", "unicorn"], "unicorn"),
    (["/usr/bin/unicorn_rails"], "unicorn"),
    (["gunicorn", "app:app"], "gunicorn"),
    (["python3", "-m", "gunicorn", "app:app"], "gunicorn"),
])
def test_detect_server(command, profile):
    assert servers.detect(command).name == profile


def test_detect_server_unknown_needs_override():
    with pytest.raises(ShimError):
        servers.detect(["ruby", "server.rb"])
    assert servers.detect(["ruby", "server.rb"], "unicorn") is servers.UNICORN


def test_socket_environment_per_server():
    assert servers.UNICORN.socket_env([3, 4]) == {"UNICORN_FD": "3,4"}
    assert servers.GUNICORN.socket_env([3, 4]) == {"LISTEN_FDS": "2"}
    assert servers.GUNICORN.sets_listen_pid and not servers.UNICORN.sets_listen_pid


def test_server_environment_drops_the_shims_variables():
    base = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2",
            "LISTEN_FDS": "1", "LISTEN_PID": "3", "LISTEN_FDNAMES": "x", "RAILS_ENV": "production"}
    env = spawn.server_environment(base, {"UNICORN_FD": "3"})
    assert env == {"PATH": "/bin", "RAILS_ENV": "production", "UNICORN_FD": "3"}


def test_spawn_hands_over_exactly_the_sockets(tmp_path):
    """The master gets the held sockets at 3, 4 and nothing else beyond stdio,
    in a session of its own, and its parent is not the spawner."""
    a = sockets.bind(sockets.Address(socket.AF_INET, "127.0.0.1", 0))
    b = sockets.bind(sockets.Address(socket.AF_INET, "127.0.0.1", 0))
    junk = os.open("/dev/null", os.O_RDONLY)        # an fd the master must not inherit
    os.set_inheritable(junk, True)
    out = tmp_path / "fds"
    script = ("import os,socket,sys; fds=sorted(int(f) for f in os.listdir('/proc/self/fd'));"
              "names=[socket.socket(fileno=f).getsockname()[1] for f in (3,4)];"
              f"open({str(out)!r},'w').write(repr((fds, names, os.getsid(0)==os.getpid() or os.getsid(0), "
              "os.environ.get('LISTEN_PID')==str(os.getpid()))))")
    try:
        pid = spawn.spawn([sys.executable, "-c", script], dict(os.environ), [b.fileno(), a.fileno()],
                          set_listen_pid=True)
        assert pid != os.getpid()
        for _ in range(200):
            if out.exists() and out.read_text():
                break
            __import__("time").sleep(0.02)
        fds, names, session, listen_pid = eval(out.read_text())
        assert [f for f in fds if f > 2][:2] == [3, 4] and len([f for f in fds if f > 2]) <= 3  # +listdir's own
        assert names == [b.sock.getsockname()[1], a.sock.getsockname()[1]]
        assert session != os.getsid(0)
        assert listen_pid
    finally:
        os.close(junk)
        sockets.release([a, b])


def test_spawn_reports_exec_failure(tmp_path):
    target = tmp_path / "not-exec"
    target.write_text("#!/bin/sh\n")
    os.chmod(target, 0o755)
    os.chmod(tmp_path, 0o755)
    with pytest.raises(ShimError) as e:
        spawn.spawn([str(target)], {}, [], chdir="/nonexistent-dir")
    assert e.value.exit_status == 5 and "nonexistent-dir" in str(e.value)


def test_pin_refuses_processes_outside_the_unit():
    me = procs.cgroup_of(os.getpid())
    with pytest.raises(procs.UntrustedPid):
        procs.pin(1, me)
    with pytest.raises(procs.UntrustedPid, match="not a process of this unit"):
        procs.pin(os.getpid(), "/some/other.service")


def test_pin_refuses_a_pid_older_than_the_reload():
    child = subprocess.Popen(["sleep", "5"])
    try:
        with pytest.raises(procs.UntrustedPid, match="older than the reload"):
            procs.pin(child.pid, procs.cgroup_of(os.getpid()), not_before=procs.now_ticks() + 100)
        p = procs.pin(child.pid, procs.cgroup_of(os.getpid()), parent=os.getpid())
        assert p.alive()
        child.kill()
        child.wait()
        assert not p.alive()
        assert p.signal(15) is False
        p.close()
    finally:
        child.kill()


def test_pid_file_reading_trusts_only_numbers(tmp_path):
    f = tmp_path / "u.pid"
    for text, want in [("123\n", 123), ("", None), ("garbage", None), ("-1", None), ("0x10", None)]:
        f.write_text(text)
        assert procs.read_pid_file(str(f)) == want
    assert procs.read_pid_file(str(tmp_path / "missing")) is None
    procs.write_pid_file(str(f), 42)
    assert f.read_text() == "42\n" and os.listdir(tmp_path) == ["u.pid"]


class FakeTree:
    """Stands in for /proc: the master's children and their titles."""

    def __init__(self, monkeypatch):
        self.kids = []
        self.zombies = []        # exited children the master has not waited for: no title
        self.ticks = {}          # CPU used so far, by pid; a pid missing here sleeps at 0
        monkeypatch.setattr(procs, "activity", lambda pid: ("S", self.ticks.get(pid, 0)))
        monkeypatch.setattr(procs, "wchan", lambda pid, thread=None: "")
        monkeypatch.setattr(procs, "children", lambda pid: self.kids + self.zombies)
        monkeypatch.setattr(procs, "title",
                            lambda pid: "" if pid in self.zombies else f"unicorn worker[{pid % 10}] -c x")
        monkeypatch.setattr(procs, "is_zombie", lambda pid: pid in self.zombies)
        monkeypatch.setattr(procs, "parent_of", lambda pid: 100)


def test_heuristic_ready_once_every_worker_waits_for_connections(monkeypatch):
    tree = FakeTree(monkeypatch)
    wchans = {}
    monkeypatch.setattr(procs, "wchan", lambda pid, thread=None: wchans.get(pid, ""))
    monkeypatch.setattr(procs, "activity", lambda pid: ("R", tree.ticks.get(pid, 0)))
    w = readiness.WorkerWatch(100, servers.UNICORN, readiness.HookReports(), settle=0.1, now=0.0)
    w.sample(0.05)
    assert w.verdict(0.05).state == "booting"       # no workers yet
    tree.kids = [101, 102]
    wchans[101] = "poll_schedule_timeout.constprop.0"
    for t in (0.10, 0.15, 0.20, 0.25):
        w.sample(t)                                 # 102 still loading the app
        assert w.verdict(t).state == "booting"
    wchans[102] = "do_select"
    wchans[101] = ""                                # serving a request now: it has waited before
    w.sample(0.30)
    v = w.verdict(0.30)
    assert v.state == "ready" and v.workers == 2 and v.since == 0.30
    tree.kids = [101, 102, 103]                     # a new worker: not settled any more
    w.sample(0.35)
    assert w.verdict(0.35).state == "booting"


def test_heuristic_counts_an_unreadable_wchan_asleep_without_cpu_as_waiting(monkeypatch):
    """A worker of another user: /proc/PID/wchan is unreadable, /proc/PID/stat is not."""
    tree = FakeTree(monkeypatch)
    monkeypatch.setattr(procs, "wchan", lambda pid, thread=None: "")
    w = readiness.WorkerWatch(100, servers.UNICORN, readiness.HookReports(), settle=0.1, now=0.0)
    tree.kids = [101]
    for i, t in enumerate((0.1, 0.15, 0.2)):
        tree.ticks[101] = i                         # using CPU: loading
        w.sample(t)
        assert w.verdict(t).state == "booting"
    w.sample(0.25)                                  # asleep, no tick used since the last look
    assert w.verdict(0.25).state == "ready"


def test_crash_loop_counted_from_births_and_deaths(monkeypatch):
    tree = FakeTree(monkeypatch)
    w = readiness.WorkerWatch(100, servers.UNICORN, readiness.HookReports(), settle=1.0, now=0.0)
    for i, kids in enumerate([[101], [102], [103], [104]]):
        tree.kids = kids
        w.sample(0.05 * i)
    v = w.verdict(0.2)
    assert v.state == "failed" and "crash-looping: 3 workers died" in v.detail


def test_master_leaving_its_dead_workers_unreaped_is_failing(monkeypatch):
    """Gunicorn 20.1 halting after a boot error can leave a worker unreaped for
    graceful_timeout: seen as a failure after UNREAPED_LIMIT, not at its exit."""
    tree = FakeTree(monkeypatch)
    w = readiness.WorkerWatch(100, servers.GUNICORN, readiness.HookReports(), settle=10.0, now=0.0)
    tree.zombies = [102]              # one reaped already, one dead and waiting
    w.sample(0.1)
    assert w.verdict(0.1).state == "booting"
    w.sample(1.0)
    assert w.verdict(1.0).state == "booting"      # a master may be busy for a moment
    w.sample(1.7)
    v = w.verdict(1.7)
    assert v.state == "failed" and "left 1 unreaped" in v.detail
    tree.kids, tree.zombies = [103], []          # a master that respawns is booting again
    w.sample(1.8)
    assert w.verdict(1.8).state == "booting"
    tree.kids, tree.zombies = [104], [103]       # a dead worker beside a live one is just a respawn
    w.sample(2.0)
    w.sample(4.0)
    assert w.verdict(4.0).state != "failed"


def test_hook_readiness_is_exact(monkeypatch):
    tree = FakeTree(monkeypatch)
    reports = readiness.HookReports()
    family = [100]                   # the masters of the channel the reports arrive on
    w = readiness.WorkerWatch(100, servers.UNICORN, reports, settle=0.01, now=0.0)
    reports.record(100, "hello", family)
    tree.kids = [101, 102]
    w.sample(5.0)
    assert w.verdict(5.0).state == "booting"        # the heuristic would say ready; the hook has not
    reports.record(101, "ready worker=0 workers=2", family)
    assert w.verdict(5.0).state == "booting"
    reports.record(102, "ready worker=1 workers=2", family)
    v = w.verdict(5.0)
    assert v.state == "ready" and v.workers == 2 and "hook" in v.detail
    reports.record(103, "ready worker=x workers=?", family)   # malformed: ignored
    reports.forget(100)
    assert 100 not in reports.hello and 100 not in reports.ready


def test_a_workers_error_stays_its_masters_reason_after_the_master_s_last_words(monkeypatch):
    """Gunicorn: the worker's traceback, then the master's HaltServer. The worker was reaped
    before the shim read its line: on its master's own channel, it was that master's."""
    monkeypatch.setattr(procs, "parent_of", lambda pid: None)        # both gone when read
    reports = readiness.HookReports()
    reports.record(201, "error RuntimeError: release r2 is broken at app.py:3", [200])
    reports.record(200, "error gunicorn.errors.HaltServer: <HaltServer 'Worker failed to boot.' 3>", [200])
    assert reports.error_of(200) == "RuntimeError: release r2 is broken at app.py:3"
    reports.record(202, "error deadlock; recursive locking (ThreadError)", [200])   # its aftermath
    assert reports.error_of(200) == "RuntimeError: release r2 is broken at app.py:3"
    reports.clear_errors(200)                                   # the next reload starts afresh
    assert reports.error_of(200) is None
    reports.record(300, "error SyntaxError in config/unicorn.rb", [300])   # a master's own: kept
    assert reports.error_of(300) == "SyntaxError in config/unicorn.rb"
    reports.record(400, "error ppid=300 a pid in the message names no one", [500])
    assert reports.error_of(300) == "SyntaxError in config/unicorn.rb" and 400 not in reports.errors


def test_generator_writes_dropins_and_skips_bad_confs(tmp_path):
    from shim.tooling import generator
    conf, out = tmp_path / "etc", tmp_path / "out"
    conf.mkdir()
    out.mkdir()
    (conf / "shop.conf").write_text(
        "APP_DIR=/srv/shop/current\nLISTEN=127.0.0.1:8080 unix:/run/shop.sock\nUSER=shop\n"
        "SERVER_COMMAND=gunicorn -c gunicorn.conf.py 'app:application'  # comment\n"
        "SHIM_OPTIONS=--ready-timeout 90\n")
    (conf / "broken.conf").write_text("APP_DIR=/x\n")
    (conf / "bad name.conf").write_text("APP_DIR=/x\n")
    problems = generator.generate(str(conf), str(out))
    assert len(problems) == 2 and all("not configured" in p for p in problems)
    service = (out / "unicorn-shim@shop.service.d" / generator.DROPIN).read_text()
    assert "User=shop" in service and "Group=shop" in service and "KillSignal=SIGTERM" in service
    assert ("ExecStart=/usr/bin/unicorn-shim run --pid-file /run/unicorn-shim/shop/server.pid --chdir "
            "/srv/shop/current --ready-timeout 90 -- gunicorn -c gunicorn.conf.py app:application") in service
    socket_ = (out / "unicorn-shim@shop.socket.d" / generator.DROPIN).read_text()
    assert "ListenStream=\nListenStream=127.0.0.1:8080\nListenStream=/run/shop.sock\n" in socket_
    assert "SocketUser=shop" in socket_
    assert sorted(os.listdir(out)) == ["unicorn-shim@shop.service.d", "unicorn-shim@shop.socket.d"]


def test_man_page_covers_every_option():
    from shim.options import build_parser
    from shim.tooling import manpage
    page = manpage.render()
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in subs.items():
        assert f'.SS "unicorn\\-shim {name}"' in page
        for action in sub._actions:
            for flag in action.option_strings if action.dest != "help" else ():
                assert flag.replace("-", "\\-") in page, flag


def test_heuristic_falls_back_to_steady_workers_when_none_is_seen_waiting(monkeypatch):
    """Every worker busy serving at every look (a saturated host): the same workers
    alive for STEADY seconds count as booted, as the settle window did."""
    tree = FakeTree(monkeypatch)
    monkeypatch.setattr(procs, "activity", lambda pid: ("R", tree.ticks.get(pid, 0)))
    w = readiness.WorkerWatch(100, servers.UNICORN, readiness.HookReports(), settle=0.1, now=0.0)
    tree.kids = [101, 102]
    for t in (0.1, 0.5, 1.0):
        w.sample(t)
        assert w.verdict(t).state == "booting"
    w.sample(1.35)
    v = w.verdict(1.35)
    assert v.state == "ready" and "unchanged" in v.detail
