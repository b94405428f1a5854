"""Hostile input on both of the shim's sockets: the masters' report channels and
the control socket. Random and malformed datagrams and streams, floods, another
user (nobody, by setuid in a forked child), a process outside the unit's cgroup
that got hold of a channel: the shim keeps serving, its reasons stay true, and
nothing it records comes from outside the unit.

The first tests drive the real sockets and the real loop in this process (the
kernel's credentials, real forked senders); the last runs against a real shim
under a real systemd user manager with each real server (Unicorn, Gunicorn,
Puma) and load."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import re
import shutil
import stat
import socket
import struct
import tempfile
import time

from shim.runtime import procs
from shim.runtime.control import MAX_READING, ControlServer
from shim.runtime.loop import Loop
from shim.runtime.channel import MAX_ERRORS, MAX_MASTERS, ROUND, HookChannels, HookReports
from support.load import Load
from support.systemd import proc_environ

NOBODY = 65534
HOSTILE = [b"", b" ", b"hello", b"exec", b"error", b"error ", b"ready", b"ready worker=\xc2\xb2 workers=\xc2\xb2",
           b"ready worker=99999999999999999999 workers=1", b"error ppid=\xc2\xb2 boom", b"\xff\xfe\x00error x",
           b"ready worker=0 workers=0 worker=1", b"error " + b"A" * 5000, b"=\x00=\x00", b"hello " * 100]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _as_nobody(action) -> str:
    """Run `action()` in a forked child that dropped to nobody; what it returned (or raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                result = str(action())
            except OSError as e:
                result = errno.errorcode.get(e.errno, str(e.errno))
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        result = f.read()
    os.waitpid(pid, 0)
    return result


def _pidfd_getfd(pid: int, fd: int) -> int:
    """pidfd_getfd(2) (Python has no wrapper): another process's fd, if ptrace would be allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(438, pidfd, fd, 0)
        if got < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return got
    finally:
        os.close(pidfd)


def _senders(channel, count: int, messages, rights: bool = False) -> list:
    """Forked children holding the channel's far end that send `messages`, some with
    descriptors attached, then wait to be killed."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                for message in messages:
                    extra = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", 0))] if rights else []
                    try:
                        channel.peer.sendmsg([message], extra)
                    except BlockingIOError:
                        time.sleep(0.001)
                time.sleep(60)
            finally:
                os._exit(0)
        pids.append(pid)
    return pids


def _reap(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def test_random_and_hostile_reports_never_raise_and_stay_bounded():
    """No report can raise out of the loop (a Loop without on_error raises whatever a
    callback raises), descriptors sent along are closed, and what is recorded is
    bounded and only about the channel's own masters."""
    rng = random.Random(23)
    before = _fds()
    loop = Loop()
    channels = HookChannels(loop, HookReports(), procs.cgroup_of(os.getpid()))
    pids = []
    try:
        channel = channels.open()
        noise = HOSTILE + [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 700))) for _ in range(300)]
        noise += [rng.choice([b"hello", b"ready", b"error", b"exec"]) + b" " +
                  b" ".join(rng.choice([b"worker=", b"workers=", b"ppid=", b"x"]) + str(rng.randrange(-9, 10**6)).encode()
                            for _ in range(rng.randrange(0, 5))) for _ in range(300)]
        pids = _senders(channel, 4, noise, rights=True)
        channels.started(channel, 4242)     # a master that is not any of the senders' parent
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            loop.poll(0.01)
            try:
                channel.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break                       # all read
        reports = channels.reports
        assert reports.hello <= {4242} and set(reports.ready) <= {4242}
        assert len(reports.errors) <= MAX_ERRORS and len(reports.hello) <= MAX_MASTERS
        # the senders' parent is this process, not a master of the channel: their errors are no one's
        assert set(reports.errors) <= {4242}
    finally:
        _reap(pids)
        for _ in range(50):                 # end of file closes the channel
            loop.poll(0.02)
        channels.close()
        loop.close()
    assert _fds() == before


def test_a_flood_costs_a_bounded_round_and_true_reports_still_arrive():
    """Eight flooders on one channel once held a drain for 3.8 s: now one round reads
    at most ROUND reports per channel, and a master's report on its own channel
    is read in the next rounds."""
    loop = Loop()
    channels = HookChannels(loop, HookReports(), procs.cgroup_of(os.getpid()))
    flooders = []
    try:
        flooded, quiet = channels.open(), channels.open()
        flooders = _senders(flooded, 8, [b"error flood %d" % i for i in range(2000)])
        real = os.fork()
        if real == 0:
            quiet.peer.send(b"error the real reason (RuntimeError) at config.ru:3")
            os._exit(0)
        os.waitpid(real, 0)                 # gone when read: its master's channel speaks for it
        channels.started(flooded, 4242)
        channels.started(quiet, os.getpid())
        time.sleep(0.5)                     # let the flood fill its channel
        reports, counted = channels.reports, []
        record = reports.record
        reports.record = lambda *a: (counted.append(1), record(*a))
        slowest = 0.0
        for _ in range(20):
            counted.clear()
            t0 = time.monotonic()
            loop.poll(0)
            slowest = max(slowest, time.monotonic() - t0)
            assert len(counted) <= 2 * ROUND      # two readable channels
        assert slowest < 0.5, slowest
        assert reports.error_of(os.getpid()) == "the real reason (RuntimeError) at config.ru:3"
        assert "flood" not in str(reports.errors)
    finally:
        _reap(flooders)
        channels.close()
        loop.close()


def test_another_user_cannot_reach_a_channel_nor_control():
    """nobody cannot take a channel's fd from its holder, nor open it through /proc,
    and its control requests are refused (logged at most once a second)."""
    loop = Loop()
    channels = HookChannels(loop, HookReports(), procs.cgroup_of(os.getpid()))
    channel = channels.open()
    holder = _senders(channel, 1, [])[0]
    refused = []
    public = tempfile.mkdtemp()
    os.chmod(public, 0o755)          # where nobody can reach the socket: only SO_PEERCRED keeps it out
    path = os.path.join(public, "control.sock")
    control = ControlServer(path, 0o666, lambda req, reply: reply({"ok": True}),
                            refused.append, loop)
    try:
        fd = channel.peer.fileno()
        assert _as_nobody(lambda: _pidfd_getfd(holder, fd)) == "EPERM"
        assert _as_nobody(lambda: os.open(f"/proc/{holder}/fd/{fd}", os.O_WRONLY)) in ("EACCES", "EPERM", "ENXIO")

        def flood_control():
            answers = []
            for _ in range(50):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                s.connect(path)
                try:
                    s.sendall(b'{"command": "reload"}\n')
                except OSError:
                    pass                # answered and closed already
                answers.append(s.recv(4096))
                s.close()
            return all(b"permission denied" in a for a in answers)
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                os.write(w, b"ok" if flood_control() else b"no")
            except OSError as e:
                os.write(w, str(e).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.set_blocking(r, False)
        answer, deadline = b"", time.monotonic() + 30
        while not answer and time.monotonic() < deadline:
            loop.poll(0.01)
            try:
                answer = os.read(r, 10)
            except BlockingIOError:
                pass
        os.close(r)
        os.waitpid(child, 0)
        assert answer == b"ok"
        assert refused == [NOBODY] or refused == [NOBODY, NOBODY]      # 50 refusals, one or two events
        assert not channels.reports.errors
    finally:
        _reap([holder])
        control.close()
        channels.close()
        loop.close()
        shutil.rmtree(public, ignore_errors=True)


def test_hostile_control_streams_never_raise_and_stay_bounded(tmp_path):
    rng = random.Random(5)
    before = _fds()
    loop = Loop()                       # no on_error: anything raised in a callback fails the test
    asked = []
    path = str(tmp_path / "control.sock")
    control = ControlServer(path, 0o600, lambda req, reply: (asked.append(req), reply({"ok": True})),
                            lambda uid: None, loop)
    streams = [b"[" * 100000 + b"\n", b"{" * 3000 + b"\n", b"\xff\xfe\n", b"\n", b"null\n", b'{"command": null}\n',
               b'{"command": ["reload"]}\n', b'"reload"\n', b"x" * 9000, b'{"command": "status"}' + b" " * 5000 + b"\n"]
    streams += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000))) + b"\n" for _ in range(40)]
    clients = []
    try:
        for payload in streams:
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            s.connect(path)
            try:
                s.send(payload)
            except BlockingIOError:
                pass
            clients.append(s)
            loop.poll(0)
        silent = []
        for _ in range(MAX_READING + 40):       # more idle clients than the shim keeps
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            silent.append(s)
            loop.poll(0)
        for _ in range(20):
            loop.poll(0.01)
        assert len(control.reading) <= MAX_READING
        real = socket.socket(socket.AF_UNIX)
        real.connect(path)
        real.sendall(b'{"command": "status"}\n')
        real.setblocking(False)
        deadline, answer = time.monotonic() + 5, b""
        while not answer and time.monotonic() < deadline:
            loop.poll(0.01)
            try:
                answer = real.recv(100)
            except BlockingIOError:
                pass
        assert json.loads(answer) == {"ok": True}        # idle clients never keep a real one out
        assert all(isinstance(req.get("command"), str) for req in asked)
        for s in clients + silent + [real]:
            s.close()
    finally:
        control.close()
        loop.close()
    assert _fds() == before


def test_a_real_shim_trusts_no_one_outside_its_masters(deploy, manager):
    """Against a real shim and each server under load: nobody finds no socket to write to
    and no fd to take; root outside the unit takes the master's channel (pidfd_getfd)
    and floods it with forged reports and random bytes, and floods the control
    socket with garbage. The app serves throughout, a bad release is still rolled
    back with its true reason, a good one still deploys, the shim's fds stay flat."""
    d = deploy()
    d.start()
    shim = next(p for p in manager.unit_processes() if "unicorn-shim" in open(f"/proc/{p}/cmdline").read())
    master = d.assert_main_pid_is_live_master()
    fd = int(proc_environ(master)["UNICORN_SHIM_CHANNEL"].split(":")[0])
    runtime = os.path.join(manager.runtime_dir, "app")
    # no socket anyone can write reports to: the only other one is the master's probe socket (0600,
    # which the shim connects to and the master listens on)
    others = [f for f in os.listdir(runtime) if f not in ("control.sock", "shim.pid", "unicorn.pid")]
    assert all(re.fullmatch(r"probe\.\d+\.sock", f) for f in others), others
    assert all(stat.S_IMODE(os.stat(os.path.join(runtime, f)).st_mode) == 0o600 for f in others), others
    shim_fds = len(os.listdir(f"/proc/{shim}/fd"))
    rng = random.Random(7)
    forged = [b"error FORGED by an outsider", b"hello", b"ready worker=0 workers=1", b"ready worker=1 workers=2",
              b"exec"] + [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 600))) for _ in range(200)]
    with Load(d.port) as load:
        assert _as_nobody(lambda: _pidfd_getfd(master, fd)) == "EPERM"
        stolen = _pidfd_getfd(master, fd)     # root can: but it lives outside the unit's cgroup
        try:
            for _ in range(20):
                for message in forged:
                    try:
                        os.write(stolen, message)
                    except BlockingIOError:
                        time.sleep(0.001)
            control = os.path.join(runtime, "control.sock")
            for _ in range(30):
                s = socket.socket(socket.AF_UNIX)
                s.connect(control)
                s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 5000))) + b"\n")
                s.close()
            d.app.release(broken=True)
            bad = d.reload()
            failed = manager.wait_events("reload-failed")
            d.app.release()
            good = d.reload()
        finally:
            os.close(stolen)
    assert bad.returncode != 0 and good.returncode == 0, (bad.stderr, good.stderr)
    assert "release r2 is broken" in failed[-1]["SERVER_ERROR"], failed[-1]
    journal = "\n".join(json.dumps(e) for e in manager.journal("SYSLOG_IDENTIFIER=unicorn-shim"))
    assert "FORGED" not in journal and "internal-error" not in journal
    assert "FORGED" not in d.state()["StatusText"]
    assert load.failures() == [] and load.ok_count() > 0
    assert d.state()["ActiveState"] == "active"
    deadline = time.monotonic() + 10     # the old channels close once their masters' trees are gone
    while len(os.listdir(f"/proc/{shim}/fd")) > shim_fds and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(os.listdir(f"/proc/{shim}/fd")) <= shim_fds
