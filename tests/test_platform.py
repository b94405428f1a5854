"""What differs between the systems the shim runs on (Debian 12 / systemd 252 on a
hybrid cgroup host, Debian 13 / systemd 257 in a container): the cgroup hierarchy
that names a unit's processes, the kernel log a generator writes to, the
notifications systemd >= 253 reads differently, templates that verify on their
own. Fast tests against fabricated /proc, /sys and sockets; the same behaviour
under real systemd 257 is in tests/test_trixie.py and tests/test_package.py."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from shim.runtime import notify, procs
from shim.tooling import generator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MOUNT = "{n} 1 0:{n} / {point} rw,relatime shared:{n} - {fstype} {source} rw{opts}\n"
UNIT = "/system.slice/unicorn-shim@myapp.service"


@pytest.fixture
def fake_system(tmp_path, monkeypatch):
    """fake(mounts, cgroup_lines, procs_dir): a /proc with self/mountinfo and
    4242/cgroup, and a cgroup file system under tmp_path/sys/fs/cgroup with UNIT's
    cgroup.procs in `procs_dir` (relative)."""
    proc, cgfs = tmp_path / "proc", tmp_path / "sys" / "fs" / "cgroup"

    def fake(mounts, cgroup_lines, procs_dir):
        (proc / "self").mkdir(parents=True)
        (proc / "4242").mkdir()
        (proc / "self" / "mountinfo").write_text("".join(
            MOUNT.format(n=20 + i, point=str(cgfs) + sub, fstype=fstype, source=fstype,
                         opts="," + opts if opts else "")
            for i, (sub, fstype, opts) in enumerate(mounts)))
        (proc / "4242" / "cgroup").write_text("".join(line + "\n" for line in cgroup_lines))
        unit_dir = cgfs / procs_dir / UNIT.lstrip("/")
        unit_dir.mkdir(parents=True)
        (unit_dir / "cgroup.procs").write_text("4242\n4243\n")
        monkeypatch.setattr(procs, "PROC", str(proc))
        monkeypatch.setattr(procs, "CGROUP_FS", str(cgfs))
        procs.systemd_hierarchy.cache_clear()
    yield fake
    procs.systemd_hierarchy.cache_clear()      # the real system's, for the next test


V1 = [("/cpu", "cgroup", "cpu"), ("/memory", "cgroup", "memory"), ("/systemd", "cgroup", "name=systemd")]


def test_container_on_a_hybrid_host_reads_the_unified_line(fake_system):
    """Debian 13 in nspawn with the unified hierarchy, on a hybrid host: the host's
    name=systemd line says "/" for every process, journald included."""
    fake_system([("", "cgroup2", "")],
                ["9:name=systemd:/", "4:memory:/", f"0::{UNIT}"], "")
    assert procs.cgroup_of(4242) == UNIT
    assert procs.cgroup_members(UNIT) == [4242, 4243]


def test_hybrid_host_reads_the_unified_hierarchy(fake_system, tmp_path):
    fake_system(V1 + [("/unified", "cgroup2", "")],
                ["9:name=systemd:" + UNIT, "4:memory:/", "0::" + UNIT], "unified")
    assert procs.systemd_hierarchy() == ("", str(tmp_path / "sys/fs/cgroup/unified"))
    assert procs.cgroup_of(4242) == UNIT
    assert procs.cgroup_members(UNIT) == [4242, 4243]


def test_legacy_host_reads_name_systemd(fake_system):
    fake_system(V1, ["9:name=systemd:" + UNIT, "4:memory:/", "0::/"], "systemd")
    assert procs.cgroup_of(4242) == UNIT
    assert procs.cgroup_members(UNIT) == [4242, 4243]


def test_a_process_outside_the_unit_is_not_in_it_inside_a_container(fake_system):
    fake_system([("", "cgroup2", "")],
                ["9:name=systemd:/", "0::/system.slice/systemd-journald.service"], "")
    assert not procs.in_cgroup(4242, UNIT)


def test_this_machine_finds_its_own_process_among_its_cgroups_members():
    """No fakes: whatever this machine mounts, both read the same hierarchy."""
    me = procs.cgroup_of(os.getpid())
    assert me is not None
    assert os.getpid() in procs.cgroup_members(me)


def test_a_cgroup_of_its_own_holds_exactly_the_process_moved_into_it():
    """No fakes: a child moved into a new cgroup below ours, in the hierarchy systemd
    tracks units in, is in it and alone in it; we are not. Inside a Debian 13
    container on a hybrid host, reading name=systemd put every process in "/"."""
    root = procs.systemd_hierarchy()[1]
    path = procs.cgroup_of(os.getpid()).rstrip("/") + f"/unicorn-shim-test-{os.getpid()}"
    os.mkdir(root + path)
    child = subprocess.Popen(["sleep", "30"])
    try:
        with open(f"{root}{path}/cgroup.procs", "w") as f:
            f.write(str(child.pid))
        assert procs.cgroup_of(child.pid) == path
        assert procs.in_cgroup(child.pid, path) and not procs.in_cgroup(os.getpid(), path)
        assert procs.cgroup_members(path) == [child.pid]
    finally:
        child.kill()
        child.wait()
        for _ in range(50):        # the kernel empties the cgroup right after the reap
            try:
                os.rmdir(root + path)
                break
            except OSError:
                time.sleep(0.02)


# --- the generator's problems: the kernel log only when it is the device ---

BAD_CONF = "APP_DIR=/srv/bad/current\n"      # no SERVER_COMMAND=, no LISTEN=


def run_generator(tmp_path, monkeypatch, capsys, kmsg):
    conf, out = tmp_path / "conf", tmp_path / "out"
    conf.mkdir()
    (conf / "bad.conf").write_text(BAD_CONF)
    monkeypatch.setenv("UNICORN_SHIM_CONF_DIR", str(conf))
    monkeypatch.setattr(generator, "KMSG", kmsg)
    monkeypatch.setattr(generator, "JOURNAL_SOCKET", str(tmp_path / "no-journald"))
    assert generator.main(["unicorn-shim-generator", str(out), str(out), str(out)]) == 0
    return capsys.readouterr().err


def test_generator_without_kmsg_writes_stderr_and_creates_nothing(tmp_path, monkeypatch, capsys):
    kmsg = str(tmp_path / "dev-kmsg")          # a container: no such device (nor journald here)
    err = run_generator(tmp_path, monkeypatch, capsys, kmsg)
    assert "bad.conf: SERVER_COMMAND= is missing" in err
    assert not os.path.exists(kmsg)


def test_generator_leaves_a_plain_file_at_the_kmsg_path_alone(tmp_path, monkeypatch, capsys):
    kmsg = tmp_path / "dev-kmsg"
    kmsg.write_text("")                        # what the old generator left behind
    err = run_generator(tmp_path, monkeypatch, capsys, str(kmsg))
    assert "bad.conf" in err and kmsg.read_text() == ""


def test_generator_writes_the_kernel_log_when_it_is_a_character_device(tmp_path, monkeypatch, capsys):
    master, slave = os.openpty()               # a character device we can read back
    try:
        err = run_generator(tmp_path, monkeypatch, capsys, os.ttyname(slave))
        written = os.read(master, 4096).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert err == ""
    assert written.startswith("<4>unicorn-shim-generator:") and "bad.conf" in written


# --- the hand-over's notifications ---

class FakeManager:
    """A notify socket that records datagrams and holds BARRIER=1's fd until told."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages, self.barrier_fds = [], []

    def receive(self, count: int) -> None:
        for _ in range(count):
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 4)
            self.messages.append(dict(line.split("=", 1) for line in msg.decode().splitlines()))
            if "BARRIER" in self.messages[-1]:
                self.barrier_fds += fds
            else:
                for fd in fds:
                    os.close(fd)


def test_hand_over_moves_mainpid_without_reloading_and_waits_for_the_manager(tmp_path, monkeypatch):
    """systemd >= 253 waits for READY=1 after ExecReload= when the last word was
    RELOADING=1, even with the main process dead: the hand-over must not say it.
    And MAINPID=<shim> is in force before the shim signals the old master: the
    barrier's fd becomes readable only once the manager has processed it (the
    supervisor's loop waits for that; test_steps covers a manager that never does)."""
    from shim.runtime.loop import readable_now
    path = str(tmp_path / "notify")
    manager = FakeManager(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    barrier = notify.Notifier().reloading(1234, "reloading: ...")
    manager.receive(2)
    assert manager.messages[0] == {"MAINPID": "1234", "STATUS": "reloading: ..."}
    assert manager.messages[1] == {"BARRIER": "1"} and len(manager.barrier_fds) == 1
    assert barrier is not None and not readable_now(barrier)     # still waiting for the manager
    os.close(manager.barrier_fds[0])
    assert readable_now(barrier)
    os.close(barrier)
    manager.sock.close()


# --- the templates as installed ---

def test_templates_verify_on_their_own(tmp_path):
    """`systemd-analyze verify` of the shipped templates, without the generator's
    drop-ins (the checkout's unicorn-shim stands in for /usr/bin/unicorn-shim)."""
    units = []
    for name in ("unicorn-shim@.service", "unicorn-shim@.socket"):
        text = open(os.path.join(REPO, "units", name)).read()
        (tmp_path / name).write_text(text.replace("/usr/bin/unicorn-shim", os.path.join(REPO, "bin", "unicorn-shim")))
        units.append(str(tmp_path / name))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unicorn-shim@" not in r.stdout + r.stderr, r.stdout + r.stderr
