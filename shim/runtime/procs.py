"""Process identity: which pids the shim may trust, and how it holds on to them.

A pid read from a pid file or the process tree is only a number: it is trusted
once it is in this unit's cgroup, has the expected parent and start time, and
is pinned with a pidfd (which cannot be reused by another process).
"""
from __future__ import annotations

import functools
import os
import signal
import stat
import time

from shim.runtime.loop import readable_now

TYPE_CHECKING = False      # typing.TYPE_CHECKING without importing typing (see shim/client.py)
if TYPE_CHECKING:
    from typing import List, Optional, Tuple


class UntrustedPid(Exception):
    """A pid the shim refuses to signal, with the reason why."""


# Where the kernel's cgroup file systems are mounted, and /proc (tests point them elsewhere).
CGROUP_FS = "/sys/fs/cgroup"
PROC = "/proc"


@functools.lru_cache(maxsize=None)
def systemd_hierarchy() -> Tuple[str, str]:
    """The hierarchy systemd tracks units in: (the controller field of its
    /proc/PID/cgroup line, the directory its cgroup paths are under).

    Decided the way systemd decides (cg_unified_cached): cgroup2 on /sys/fs/cgroup
    (unified), else cgroup2 on /sys/fs/cgroup/unified (hybrid: systemd tracks
    there and only mirrors to name=systemd), else the v1 name=systemd hierarchy.
    Which lines look meaningful is no guide: in a container on a hybrid host the
    host's name=systemd line reads "/" for every process."""
    mounts = {}
    try:
        with open(f"{PROC}/self/mountinfo") as f:
            for line in f:
                before, _, after = line.partition(" - ")
                fields, fs = before.split(), after.split()
                if len(fields) > 4 and len(fs) > 2:
                    mounts[fields[4]] = (fs[0], fs[2].split(","))
    except OSError:
        pass
    for directory in (CGROUP_FS, f"{CGROUP_FS}/unified"):
        if mounts.get(directory, ("", []))[0] == "cgroup2":
            return "", directory
    legacy = f"{CGROUP_FS}/systemd"
    if "name=systemd" in mounts.get(legacy, ("", []))[1]:
        return "name=systemd", legacy
    return "", CGROUP_FS


def cgroup_of(pid: int) -> Optional[str]:
    """The process's cgroup path in the hierarchy systemd tracks units in."""
    controllers = systemd_hierarchy()[0]
    try:
        with open(f"{PROC}/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hier, found, path = line.split(":", 2)
        if found == controllers and (controllers or hier == "0"):
            return path
    return None


def in_cgroup(pid: int, cgroup: Optional[str]) -> bool:
    own = cgroup_of(pid)
    return cgroup is not None and own is not None and (own == cgroup or own.startswith(cgroup.rstrip("/") + "/"))


_TICKS = os.sysconf("SC_CLK_TCK")


def cgroup_members(cgroup: Optional[str]) -> List[int]:
    """Every pid in the unit's own cgroup, read where cgroup_of() reads."""
    if not cgroup:
        return []
    try:
        with open(f"{systemd_hierarchy()[1]}{cgroup}/cgroup.procs") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _stat(pid: int) -> List[str]:
    """/proc/PID/stat from field 3 (state) on, so fields[0] is the state; [] once gone.
    The command name before it may hold spaces and parentheses: split at the last ")"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def is_stopped(pid: int) -> bool:
    """Stopped by SIGSTOP (or a debugger): hung, for the watchdog's purposes."""
    return _stat(pid)[:1] in (["T"], ["t"])


def start_time(pid: int) -> Optional[int]:
    """Start time in clock ticks since boot: exact, unlike a wall-clock create time."""
    try:
        return int(_stat(pid)[19])
    except (IndexError, ValueError):
        return None


def now_ticks() -> int:
    """Now, on the clock of start_time()."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _TICKS)


def parent_of(pid: int) -> Optional[int]:
    try:
        return int(_stat(pid)[1])
    except (IndexError, ValueError):
        return None


def children(pid: int) -> List[int]:
    """Direct children, from the kernel's own list when it has one."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        if kernel_lists_children():
            return []                # the process is gone
        # A kernel without CONFIG_PROC_CHILDREN. psutil (3.5 MiB per shim) is loaded only there.
        import psutil
        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    except OSError:
        return []


@functools.lru_cache(maxsize=None)
def kernel_lists_children() -> bool:
    """Whether this kernel has /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN):
    asked of the shim's own entry, which exists as long as the shim runs."""
    me = os.getpid()
    return os.path.exists(f"/proc/{me}/task/{me}/children")


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def cwd(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def activity(pid: int) -> Optional[tuple]:
    """(state letter, CPU clock ticks used so far), or None once gone."""
    fields = _stat(pid)
    try:
        return fields[0], int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return None


def cpu_wait(pid: int) -> float:
    """Seconds its main thread has spent runnable but waiting for a CPU (the
    scheduler's own count, /proc/PID/schedstat); 0.0 when unknown or gone."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def wchan(pid: int, thread: Optional[str] = None) -> str:
    """The kernel function the process's main thread sleeps in ("" when running or
    unreadable); with `thread`, that of its thread of that name (/proc's comm)."""
    path = f"/proc/{pid}/wchan"
    if thread:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return ""
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().strip() == thread:
                        path = f"/proc/{pid}/task/{tid}/wchan"
                        break
            except OSError:
                continue
        else:
            return ""       # that thread does not exist yet: still booting
    try:
        with open(path) as f:
            name = f.read().strip()
    except OSError:
        return ""
    return "" if name == "0" else name


def is_zombie(pid: int) -> bool:
    """Exited, but its parent has not waited for it yet."""
    return _stat(pid)[:1] == ["Z"]


def exit_description(pid: int) -> str:
    """Best effort: how a process that is not our child ended.

    Only its parent can wait for it; while it is a zombie, /proc still shows
    its exit code (field 52 of stat, Linux >= 3.5). Once reaped it is gone.
    """
    fields = _stat(pid)
    if fields[:1] == ["Z"]:
        try:
            return describe_wait_status(int(fields[49]))
        except (IndexError, ValueError):
            pass
    elif fields:
        return "exited"
    return "exited"      # reaped by its parent already: the status went there


def describe_wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class Pinned:
    """A process the shim has verified and holds by pidfd."""

    def __init__(self, pid: int, pidfd: int, created: int, generation: int = 0, role: str = "master") -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.created = created          # start time, clock ticks since boot
        self.generation = generation
        self.role = role
        self.exit_text: Optional[str] = None
        self.probe: Optional[str] = None     # a master's private probe socket (shim/runtime/probe.py)
        self.adopted: Optional[str] = None   # from whom a new shim took it over (shim/runtime/adopt.py)
        self.standing_by = False             # its workers stopped while a new generation serves (standby.py)

    def __repr__(self) -> str:
        return f"Pinned(pid={self.pid}, role={self.role}, generation={self.generation})"

    def signal(self, sig: int) -> bool:
        """Signal through the pidfd; False if it is already gone."""
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
            return True
        except ProcessLookupError:
            return False

    def alive(self) -> bool:
        """False once it has exited: a pidfd polls readable then, even before reaping."""
        if self.pidfd < 0:
            return False
        return not readable_now(self.pidfd)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def pin(pid: int, cgroup: Optional[str], *, parent: Optional[int] = None,
        not_before: Optional[int] = None, role: str = "master") -> Pinned:
    """Verify `pid` and hold it with a pidfd, or raise UntrustedPid."""
    if pid <= 1:
        raise UntrustedPid(f"pid {pid} is never a master")
    if not in_cgroup(pid, cgroup):
        raise UntrustedPid(f"pid {pid} is not a process of this unit (cgroup {cgroup_of(pid) or 'gone'})")
    created = start_time(pid)
    if created is None:
        raise UntrustedPid(f"pid {pid} is gone")
    if parent is not None and parent_of(pid) != parent:
        raise UntrustedPid(f"pid {pid} is not a child of {parent}")
    if not_before is not None and created < not_before:
        raise UntrustedPid(f"pid {pid} is older than the reload: a reused or unrelated pid")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise UntrustedPid(f"pid {pid} is gone") from None
    if start_time(pid) != created:     # reused between the checks and the pidfd
        os.close(pidfd)
        raise UntrustedPid(f"pid {pid} changed identity while being verified")
    return Pinned(pid, pidfd, created, role=role)


def read_pid_file(path: str) -> Optional[int]:
    """The pid in a pid file, or None if missing, empty, not a regular file (a FIFO
    would block) or not a plain ASCII number ("²".isdigit() is True)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 64).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if text.isascii() and text.isdigit() else None


def write_pid_file(path: str, pid: int) -> None:
    """Atomically, as the servers do: a reader never sees a half-written file."""
    write_atomically(path, f"{pid}\n", mode=0o644)


def write_atomically(path: str, text: str, mode: int = 0o600, durable: bool = False) -> None:
    """Replace `path` with `text`: readers see the old file or the new one. The
    temporary name is random and created exclusively (O_EXCL never follows a
    symlink), so a link planted in a directory the app can write is never written
    through. `durable`: synced to disk, the directory too, before it returns."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
