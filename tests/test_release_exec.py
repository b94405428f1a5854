"""What /proc shows of a re-exec'd master around its exec, which the early Gemfile
check (shim/runtime/upgrade.py, Usr2.check_exec) relies on: until its exec a fork
shows its parent's environment (a setenv in it, as Unicorn's before_exec hook
does, changes nothing there); from its exec on, the environment it was exec'd with.
Real processes, no systemd."""
from __future__ import annotations

import os
import time

from shim.runtime import procs, release
from support.systemd import eventually


def test_a_fork_shows_its_parents_environment_until_its_exec():
    parent_title, parent_environ = procs.title(os.getpid()), release.environ_bytes(os.getpid())
    go_r, go_w = os.pipe()
    set_r, set_w = os.pipe()
    pid = os.fork()
    if pid == 0:         # the re-exec'd child: before_exec's setenv, then the exec
        try:
            os.environ["BUNDLE_GEMFILE"] = "/srv/app/releases/r2/Gemfile"
            os.write(set_w, b"x")
            os.read(go_r, 1)
            os.execve("/bin/sleep", ["sleep", "30"], dict(os.environ))
        finally:
            os._exit(127)
    try:
        assert os.read(set_r, 1) == b"x"
        time.sleep(0.1)
        assert release.exec_seen(pid, parent_title, parent_environ) is False
        assert release.environ_bytes(pid) == parent_environ      # the setenv shows nowhere yet
        assert release.gemfile_mismatch(pid, "/srv/app/releases/r2") == (
            release.gemfile_mismatch(os.getpid(), "/srv/app/releases/r2"))
        os.write(go_w, b"x")
        assert eventually(lambda: release.exec_seen(pid, parent_title, parent_environ), bool, 10, 0.005)
        assert release.environ_of(pid)["BUNDLE_GEMFILE"] == "/srv/app/releases/r2/Gemfile"
        assert release.gemfile_mismatch(pid, "/srv/app/releases/r2") is None
        assert "/srv/app/releases/r3" in release.gemfile_mismatch(pid, "/srv/app/releases/r3")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        for fd in (go_r, go_w, set_r, set_w):
            os.close(fd)


def test_exec_seen_cannot_tell_for_a_process_that_is_not_there():
    assert release.exec_seen(2 ** 22 + 12345, "x", b"y") is None
