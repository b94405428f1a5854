"""A private, real systemd user manager with its own journald (no mocks).

Wraps tests/harness/user-manager-*.sh: a private mount namespace with a tmpfs
on /run/systemd, journald in volatile mode, `systemd --user` as the manager.
Needs root (unshare -m). Nothing here fakes systemd's behaviour.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from typing import Callable, Dict, List, Optional, TypeVar

T = TypeVar("T")

HARNESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harness")


# How long a test waits for what it expects to see in the journal, in `systemctl show`
# or among the unit's processes: far beyond what it takes, so that a loaded host
# (two CPU hogs beside the suite) never fails a test that would pass on an idle one.
WAIT = 30.0


def eventually(read: Callable[[], T], done: Callable[[T], object], timeout: float = WAIT,
               interval: float = 0.1) -> T:
    """read() again until done(value) holds or `timeout` passes; the last value read
    either way, so that the caller's assert shows what was there.

    Every look at another process's state (journald's store, systemd's view of a
    unit, the unit's processes) goes through here: what a test expects may not be
    written yet when it first looks."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class UserManager:
    def __init__(self, base: str) -> None:
        self.name = "t" + uuid.uuid4().hex[:10]
        self.base = base
        env = dict(os.environ, SDH_BASE=base)
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        out = subprocess.run([os.path.join(HARNESS, "user-manager-up.sh"), self.name], env=env,
                             check=True, capture_output=True, text=True).stdout.strip()
        for line in open(out):
            if line.startswith("export "):
                key, _, value = line[len("export "):].strip().partition("=")
                env[key] = value
        self.env = env
        self.unit_dir = env["SDH_UNIT_DIR"]
        self.journal_dir = env["SDH_JOURNAL_DIR"]
        self.runtime_dir = env["XDG_RUNTIME_DIR"]
        self.pid = int(open(env["SDH_MANAGER_PID_FILE"]).read())

    def down(self) -> None:
        subprocess.run([os.path.join(HARNESS, "user-manager-down.sh"), self.name],
                       env=dict(self.env), check=False, capture_output=True)

    def systemctl(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(["systemctl", "--user", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def write_unit(self, name: str, text: str) -> str:
        path = os.path.join(self.unit_dir, name)
        with open(path, "w") as f:
            f.write(text)
        self.systemctl("daemon-reload")
        return path

    def show(self, unit: str, *props: str) -> Dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str = "app.service") -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def wait_for(self, unit: str, timeout: float = WAIT, **want: str) -> Dict[str, str]:
        """`systemctl show` once every property has the value wanted (the last read, else)."""
        return eventually(lambda: self.show(unit, *want), lambda got: all(got.get(k) == v for k, v in want.items()),
                          timeout, interval=0.05)

    def journal(self, *matches: str, unit: Optional[str] = None) -> List[Dict[str, str]]:
        """Entries as dicts (journalctl -o json), oldest first."""
        self.sync_journal()
        args = ["journalctl", "-D", self.journal_dir, "-o", "json", "--no-pager"]
        if unit:
            args += ["--user-unit", unit]
        out = subprocess.run(args + list(matches), env=self.env, capture_output=True, text=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def sync_journal(self) -> None:
        """Wait until journald has stored everything sent to it so far.

        The shim answers `reload` right after sending its event; journald, another
        process, may not have read that datagram yet when the test looks (seen in a
        full run). `journalctl --sync` returns only after journald's queued input is
        processed; it must run in the manager's namespace to reach its journald."""
        subprocess.run(["nsenter", "-t", str(self.pid), "-m", "--", "journalctl", "--sync"],
                       check=True, capture_output=True, timeout=30)

    def journal_text(self, unit: str = "app.service") -> str:
        return "\n".join(str(e.get("MESSAGE", "")) for e in self.journal(unit=unit))

    def events(self, event: str) -> List[Dict[str, str]]:
        """The shim's events of that kind stored so far: for what must be absent, after
        waiting for something that comes later (wait_events, wait_journal)."""
        return self.journal(f"SHIM_EVENT={event}")

    def wait_events(self, event: str, count: int = 1, timeout: float = WAIT,
                    **fields: object) -> List[Dict[str, str]]:
        """Every event of that kind, once at least `count` of them carry `fields`."""
        def enough(entries: List[Dict[str, str]]) -> bool:
            return len([e for e in entries if all(e.get(k) == str(v) for k, v in fields.items())]) >= count
        return eventually(lambda: self.events(event), enough, timeout)

    def wait_journal(self, *needles: str, unit: str = "app.service", timeout: float = WAIT) -> str:
        """The unit's journal text once every one of `needles` is in it."""
        return eventually(lambda: self.journal_text(unit), lambda text: all(n in text for n in needles), timeout)

    def unit_processes(self, unit: str = "app.service") -> List[int]:
        """Every pid in the unit's cgroup (any hierarchy), zombies excluded."""
        cg = self.show(unit, "ControlGroup").get("ControlGroup", "")
        pids = set()
        if cg:
            for root in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
                try:
                    pids |= {int(p) for p in open(f"{root}{cg}/cgroup.procs").read().split()}
                except OSError:
                    pass
        return sorted(p for p in pids if not exited(p))


def exited(pid: int) -> bool:
    """Dead: reaped already, or a zombie its parent has not waited for."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def proc_parent(pid: int) -> int:
    """The parent's pid, or -1 once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return -1


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def is_shim(pid: int) -> bool:
    """The shim or its client, by the command itself (interpreter and script): a master's
    arguments name its probe socket, in a runtime directory that may be named unicorn-shim."""
    return any(os.path.basename(word) == "unicorn-shim" for word in proc_cmdline(pid).split()[:2])


def proc_environ(pid: int) -> Dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().split(b"\0")
    return dict(i.decode().split("=", 1) for i in items if b"=" in i)
