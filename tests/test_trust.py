"""Input the shim must not trust: pid files, environment numbers, a planted link."""
from __future__ import annotations

import os
import threading
import time

import pytest

from shim.runtime import procs, sockets
from shim.errors import EXIT_ACTIVATION, EXIT_LISTEN, ShimError


def test_pid_file_write_never_follows_a_planted_link(tmp_path):
    """The old temporary name was predictable (PATH.shim-PID): a link planted there by
    whoever can write the pid directory made the shim overwrite the link's target."""
    target = tmp_path / "victim"
    target.write_text("precious\n")
    pid_file = tmp_path / "server.pid"
    for name in (f"server.pid.shim-{os.getpid()}", "server.pid.tmp"):
        os.symlink(target, tmp_path / name)
    procs.write_pid_file(str(pid_file), 4242)
    assert target.read_text() == "precious\n"
    assert pid_file.read_text() == "4242\n" and not pid_file.is_symlink()


def test_pid_file_read_never_blocks_nor_crashes(tmp_path):
    fifo = tmp_path / "fifo.pid"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.update(pid=procs.read_pid_file(str(fifo))), daemon=True)
    t.start()
    t.join(2)
    assert not t.is_alive() and result["pid"] is None
    odd = tmp_path / "odd.pid"
    for text in ("²", "١٢٣", "12 34", "-5", "0x10"):
        odd.write_text(text)
        assert procs.read_pid_file(str(odd)) is None, text
    odd.write_text("123\n")
    assert procs.read_pid_file(str(odd)) == 123


@pytest.mark.parametrize("value", ["²", "١"])
def test_listen_fds_with_odd_digits_is_a_clear_error(value):
    with pytest.raises(ShimError) as e:
        sockets.from_systemd({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": value})
    assert e.value.exit_status == EXIT_ACTIVATION


def test_port_with_odd_digits_is_a_clear_error():
    with pytest.raises(ShimError) as e:
        sockets.parse_address("127.0.0.1:８０８０")
    assert e.value.exit_status == EXIT_LISTEN


def test_a_pinned_process_with_a_high_pidfd_is_watched():
    """select() cannot take fds above 1024; a long-lived shim with many fds may get one."""
    import resource
    import subprocess
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    child = subprocess.Popen(["sleep", "30"])
    try:
        fd = os.pidfd_open(child.pid)
        high = os.dup2(fd, 1500)
        os.close(fd)
        pinned = procs.Pinned(child.pid, high, 0)
        assert pinned.alive()
        child.kill()
        child.wait()
        assert not pinned.alive()
        pinned.close()
    finally:
        child.kill()


def test_no_pidfd_is_a_clear_error(monkeypatch):
    from shim import cli

    def missing(pid):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(os, "pidfd_open", missing)
    with pytest.raises(ShimError) as e:
        cli._require_pidfd()
    assert "Linux 5.3" in str(e.value)


def test_a_failed_fork_leaks_no_pipe(monkeypatch):
    from shim.runtime import spawn

    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")
    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(ShimError):
        spawn.spawn(["/bin/true"], {}, [])
    assert len(os.listdir("/proc/self/fd")) == before


def _channels():
    from shim.runtime.loop import Loop
    from shim.runtime.channel import HookChannels, HookReports
    loop = Loop()
    return loop, HookChannels(loop, HookReports(), procs.cgroup_of(os.getpid()))


def _child_says(channel, *lines, linger: bool = False) -> int:
    """A forked child that holds the channel's far end writes `lines`; it exits
    (and is reaped by us) unless `linger`."""
    pid = os.fork()
    if pid == 0:
        try:
            for line in lines:
                channel.peer.send(line.encode())
            if linger:
                time.sleep(30)
        finally:
            os._exit(0)
    return pid


def test_a_report_names_its_sender_by_the_kernel_not_by_the_message():
    """The reporter's old `ppid=` was taken from the message: any sender could name
    any master. Now the channel a report arrives on names the masters it is about."""
    loop, channels = _channels()
    try:
        mine, other = channels.open(), channels.open()
        worker = _child_says(mine, "error boom (RuntimeError) at config.ru:3", linger=True)
        channels.started(mine, os.getpid())            # this process is the channel's master
        stranger = _child_says(other, f"error ppid={os.getpid()} forged", linger=True)
        channels.started(other, 999999)
        deadline = time.monotonic() + 10
        while channels.reports.error_of(os.getpid()) is None and time.monotonic() < deadline:
            loop.poll(0.05)
        loop.poll(0.1)
        assert channels.reports.error_of(os.getpid()) == "boom (RuntimeError) at config.ru:3"
        assert "forged" not in str(channels.reports.errors)
    finally:
        for pid in (worker, stranger):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        channels.close()
        loop.close()


def test_a_live_sender_outside_the_unit_is_refused_even_on_the_channel(monkeypatch):
    """A process handed the fd (pidfd_getfd needs root or the app's user) but living
    outside the unit's cgroup is refused; one gone by now proves itself by the channel."""
    loop, channels = _channels()
    child = None
    try:
        channel = channels.open()
        child = _child_says(channel, "hello", "error from outside", linger=True)
        channels.started(channel, os.getpid())
        monkeypatch.setattr(procs, "in_cgroup", lambda pid, cg: pid != child)
        deadline = time.monotonic() + 5
        while channel.refused < 2 and time.monotonic() < deadline:
            loop.poll(0.05)
        assert channel.refused == 2 and not channels.reports.errors
    finally:
        if child:
            os.kill(child, 9)
            os.waitpid(child, 0)
        channels.close()
        loop.close()


def test_a_dead_pid_does_not_load_psutil():
    """A kernel with /proc/PID/task/PID/children lists children itself: a pid gone
    meanwhile has none, and psutil (3.5 MiB) stays out of the shim."""
    import subprocess
    import sys
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    probe = (f"import sys; from shim.runtime import procs; print(procs.children({gone}), "
             f"procs.children({os.getpid()}) != [], 'psutil' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert out.split() == ["[]", "True", "False"], out


def test_a_re_exec_d_master_that_dies_at_once_still_gives_its_reason(monkeypatch):
    """Unicorn's USR2: the next master announces itself (`exec`) on its parent's
    channel. A broken release dies in a fraction of a second, before the shim reads
    anything: its error is its own, and the reason of the reload of the master it
    came from."""
    from shim.runtime.channel import HookReports
    monkeypatch.setattr(procs, "parent_of", lambda pid: 1 if pid == 100 else None)   # 200 gone when read
    reports, family = HookReports(), [100]
    reports.record(200, "exec", family)
    reports.record(200, "error release r3 is broken (RuntimeError) at config.ru:3", family)
    assert family == [100, 200]
    assert reports.error_of(200) == reports.error_of(100) == "release r3 is broken (RuntimeError) at config.ru:3"


def test_a_report_from_a_sender_that_exited_meanwhile_is_kept(monkeypatch):
    """A failing worker sends its error and exits; once a zombie, /proc shows it in the
    root cgroup. Its report came on the channel, which proves it: it is kept (refusing
    it lost a Puma worker's reason under load)."""
    loop, channels = _channels()
    try:
        channel = channels.open()
        worker = os.fork()
        if worker == 0:
            channel.peer.send(b"error boom (RuntimeError) at config.ru:3")
            os._exit(1)
        channels.started(channel, os.getpid())
        while not procs.is_zombie(worker):
            time.sleep(0.01)
        monkeypatch.setattr(procs, "in_cgroup", lambda pid, cg: False)     # as /proc shows a zombie
        deadline = time.monotonic() + 5
        while channels.reports.error_of(os.getpid()) is None and time.monotonic() < deadline:
            loop.poll(0.05)
        assert channels.reports.error_of(os.getpid()) == "boom (RuntimeError) at config.ru:3"
        assert channel.refused == 0
    finally:
        os.waitpid(worker, 0)
        channels.close()
        loop.close()
