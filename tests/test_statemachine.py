"""The supervisor's state machine against a fake process layer (no processes,
no systemd): what it tells systemd, in which order, when masters boot, die,
hang or leave on their own. The real thing is tested in test_reload/test_faults;
here the races are placed exactly."""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, List, Optional

import pytest

from shim.runtime import procs, spawn
from shim.runtime.journal import Log
from shim.runtime.loop import Loop
from shim.runtime.notify import Notifier
from shim.runtime.servers import UNICORN
from shim.runtime.readiness import UNREAPED_LIMIT
from shim.runtime.masters import WORKERLESS_GRACE
from shim.runtime.supervisor import Config, Supervisor


class FakeProcess:
    def __init__(self, pid: int, parent: int, title: str) -> None:
        self.pid, self.parent, self.title = pid, parent, title
        self.r, self.w = os.pipe()       # the "pidfd": readable (EOF) once the process exits
        self.signals: List[int] = []
        self.zombie = False              # exited, not yet waited for by its parent
        self.deaf = False                # ignores every signal but KILL
        self.drain = 0.0                 # seconds a graceful stop takes (requests in flight)

    @property
    def alive(self) -> bool:
        return self.w >= 0

    def exit(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1


class FakeOS:
    """Masters that boot `workers` workers after `boot_delay`, re-exec on USR2
    (the new master behaving as `next_behaviour` says), stop on QUIT."""

    def __init__(self, workers: int = 2, boot_delay: float = 0.05) -> None:
        self.loop = Loop()                    # the supervisor's: the fake's events happen on it
        self.procs: Dict[int, FakeProcess] = {}
        self.next_pid = 1000
        self.workers, self.boot_delay = workers, boot_delay
        self.boot_delays: List[float] = []     # for the next masters, in turn; then boot_delay
        self.next_behaviour = "healthy"       # healthy | dies | hangs | quits-old | halts
        self.manager = 1
        self.cpu_wait: Dict[int, float] = {}  # seconds a process waited for a CPU, by pid

    def new(self, parent: int, title: str) -> FakeProcess:
        self.next_pid += 1
        p = FakeProcess(self.next_pid, parent, title)
        self.procs[p.pid] = p
        return p

    def start_master(self, parent: int, behaviour: str = "healthy") -> int:
        master = self.new(parent, "unicorn master")
        loop = self.loop
        delay = self.boot_delays.pop(0) if self.boot_delays else self.boot_delay
        if behaviour == "dies":
            loop.call_later(delay, master.exit)
        elif behaviour != "hangs":
            loop.call_later(delay, self._boot_workers, master, behaviour)
        return master.pid

    def _boot_workers(self, master: FakeProcess, behaviour: str) -> None:
        if not master.alive:
            return
        for nr in range(self.workers):
            worker = self.new(master.pid, f"unicorn worker[{nr}]")
            if behaviour == "halts":      # Gunicorn's boot error: one worker reaped, one left
                worker.exit()
                worker.zombie = nr == 0
                master.deaf = True
        if behaviour == "quits-old":       # the common before_fork hook QUITs the old master
            self.signal(master.parent, signal.SIGQUIT)

    def signal(self, pid: int, sig: int) -> bool:
        p = self.procs.get(pid)
        if p is None or not p.alive:
            return False
        p.signals.append(sig)
        if p.deaf and sig != signal.SIGKILL:
            return True
        if sig in (signal.SIGQUIT, signal.SIGTERM) and p.drain:
            drain, p.drain = p.drain, 0.0
            self.loop.call_later(drain, self.signal, pid, signal.SIGKILL)
            return True
        if sig in (signal.SIGQUIT, signal.SIGKILL, signal.SIGTERM):
            for child in self.children(pid):
                if "worker" in self.procs[child].title:
                    self.procs[child].exit()
            p.exit()
            for child in self.children(pid):      # the new master is reparented to the manager
                self.procs[child].parent = self.manager
        elif sig == signal.SIGUSR2 and not p.title.endswith("(old)"):
            p.title += " (old)"                 # as Unicorn's master renames itself on USR2
            return self.signal(pid, sig)
        elif sig == signal.SIGUSR2 and self.next_behaviour == "respawn-first":
            # A worker respawned just now, not yet renamed: it bears the master's title.
            respawned = self.new(pid, p.title)
            loop = self.loop
            loop.call_later(0.3, setattr, respawned, "title", "unicorn worker[9]")
            loop.call_later(0.1, self.start_master, pid)
        elif sig == signal.SIGUSR2 and self.next_behaviour == "slow-fork":   # found only later
            self.loop.call_later(0.5, self.start_master, pid)
        elif sig == signal.SIGUSR2:
            new = self.start_master(pid, self.next_behaviour)
            if self.next_behaviour == "old-killed-at-once":   # before the shim could look at its children
                p.exit()
                self.procs[new].parent = self.manager
        return True

    def children(self, pid: int) -> List[int]:
        return [p.pid for p in self.procs.values() if p.parent == pid and (p.alive or p.zombie)]

    def pin(self, pid: int, cgroup: Optional[str], *, parent: Optional[int] = None,
            not_before: Optional[int] = None, role: str = "master") -> procs.Pinned:
        p = self.procs.get(pid)
        if p is None or not p.alive or (parent is not None and p.parent != parent):
            raise procs.UntrustedPid(f"pid {pid} is not what it should be")
        return procs.Pinned(pid, os.dup(p.r), 0, role=role)


class Recorder(Notifier):
    """The real Notifier's messages, kept instead of sent."""

    def __init__(self) -> None:
        self.messages: List[Dict[str, object]] = []
        self.watchdog_usec = None

    def send(self, **fields: object) -> None:
        self.messages.append(fields)

    def mainpids(self) -> List[int]:
        return [m["MAINPID"] for m in self.messages if "MAINPID" in m]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    fos = FakeOS()
    monkeypatch.setattr(procs, "children", fos.children)
    monkeypatch.setattr(procs, "title",
                        lambda pid: fos.procs[pid].title if pid in fos.procs and fos.procs[pid].alive else "")
    monkeypatch.setattr(procs, "activity", lambda pid: ("S", 0))
    monkeypatch.setattr(procs, "wchan", lambda pid, thread=None: "poll_schedule_timeout")
    monkeypatch.setattr(procs, "cpu_wait", lambda pid: fos.cpu_wait.get(pid, 0.0))
    monkeypatch.setattr(procs, "is_zombie", lambda pid: pid in fos.procs and fos.procs[pid].zombie)
    monkeypatch.setattr(procs, "parent_of", lambda pid: fos.procs[pid].parent if pid in fos.procs else None)
    monkeypatch.setattr(procs, "cwd", lambda pid: "/srv/app/releases/r1")
    monkeypatch.setattr(procs, "exit_description", lambda pid: "exited with status 1")
    monkeypatch.setattr(procs, "pin", fos.pin)
    monkeypatch.setattr(procs, "cgroup_members", lambda cg: [p.pid for p in fos.procs.values() if p.alive])
    monkeypatch.setattr(procs.Pinned, "signal", lambda self, sig: fos.signal(self.pid, sig))
    monkeypatch.setattr(spawn, "spawn", lambda argv, env, fds, **kw: fos.start_master(fos.manager))
    fos.tmp = str(tmp_path)
    return fos


def supervisor(fake: FakeOS, ready_timeout: float = 2.0, retire_timeout: float = 1.0) -> Supervisor:
    config = Config(command=["unicorn"], profile=UNICORN, upgrade="usr2", pid_file=None,
                    ready_timeout=ready_timeout, retire_timeout=retire_timeout, settle=0.1, health_check=None,
                    chdir=None, control_path=None, control_mode=0o600, runtime_dir=fake.tmp)
    return Supervisor(config, [], Recorder(), Log(use_journal=False), {}, loop=fake.loop)


def when_serving(sup: Supervisor, action) -> None:
    """`action` is called from the supervisor's loop once the first master serves."""
    def look() -> None:
        if sup.state == "serving":
            action()
        else:
            sup.loop.call_later(0.01, look)
    sup.loop.call_later(0.01, look)


class Asker:
    """A reload's client that stays connected: called with the answer."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def __call__(self, result) -> None:
        self.answer(result)

    def gone(self) -> bool:
        return False


def drive(sup: Supervisor, *reloads: str, fake: FakeOS, stop_during_reload: bool = False) -> list:
    """Boot, run one reload per behaviour given (each asked for once the one before
    answered), then stop; the reload results."""
    results, todo = [], list(reloads)

    def next_reload(answer=None) -> None:
        if answer is not None:
            results.append(answer)
        if not todo:
            sup._on_stop_signal(signal.SIGQUIT)
            return
        fake.next_behaviour = todo.pop(0)
        sup.request_reload(Asker(next_reload))
        if stop_during_reload:
            sup.loop.call_later(0.02, sup._on_stop_signal, signal.SIGQUIT)
    when_serving(sup, next_reload)
    assert sup.run() == 0
    return results


def test_boot_then_a_good_reload(fake):
    sup = supervisor(fake)
    [result] = (drive(sup, "healthy", fake=fake))
    old, new = 1001, 1004
    assert result["ok"] and result["master_pid"] == new and result["old_master_pid"] == old
    n = sup.notifier
    assert n.mainpids() == [old, os.getpid(), new]        # boot, hand-over (the shim), new master
    ready = [m for m in n.messages if m.get("READY")]
    assert [m["MAINPID"] for m in ready] == [old, new]
    handover = next(i for i, m in enumerate(n.messages) if m.get("MAINPID") == os.getpid())
    assert n.messages.index(ready[1]) > handover
    assert not [m for m in n.messages if "RELOADING" in m]   # systemd >= 253 would wait for READY=1
    assert signal.SIGQUIT in fake.procs[old].signals
    assert not fake.procs[old].alive                      # MAINPID=new only once the old one is gone
    assert all(not p.alive for p in fake.procs.values())  # the stop took everything down


def test_old_master_leaving_on_its_own_is_a_good_hand_over(fake):
    sup = supervisor(fake)
    [result] = (drive(sup, "quits-old", fake=fake))
    assert result["ok"]
    assert sup.notifier.mainpids() == [1001, os.getpid(), 1004]


@pytest.mark.parametrize("behaviour,reason", [("dies", "exited with status 1 before it was ready"),
                                              ("hangs", "not ready within 0.5 s")])
def test_rollback_keeps_the_old_master(fake, behaviour, reason):
    sup = supervisor(fake, ready_timeout=0.5)
    [result] = (drive(sup, behaviour, fake=fake))
    assert not result["ok"] and reason in result["error"]
    assert sup.notifier.mainpids() == [1001, os.getpid(), 1001]   # back on the old master
    assert signal.SIGQUIT not in fake.procs[1001].signals[:-1]    # only the final stop's QUIT
    assert not fake.procs[1004].alive                             # the failed one is gone


def test_a_halting_master_is_rejected_and_killed_in_seconds(fake):
    """Its workers died, one is left unreaped, it ignores its graceful stop (Gunicorn
    20.1 after a boot error): neither the ready timeout nor the retire grace is waited."""
    sup = supervisor(fake, ready_timeout=30, retire_timeout=30)
    t0 = time.monotonic()
    [result] = (drive(sup, "halts", fake=fake))
    assert not result["ok"] and "left 1 unreaped" in result["error"], result
    assert time.monotonic() - t0 < UNREAPED_LIMIT + WORKERLESS_GRACE + 2
    assert fake.procs[1004].signals[-1] == signal.SIGKILL and not fake.procs[1004].alive
    assert sup.notifier.mainpids() == [1001, os.getpid(), 1001]


def test_old_master_killed_before_its_child_was_found(fake):
    """The new master is already the manager's child: found in the unit's cgroup."""
    sup = supervisor(fake)
    [result] = (drive(sup, "old-killed-at-once", fake=fake))
    assert result["ok"] and result["master_pid"] == 1004, result
    assert sup.notifier.mainpids() == [1001, os.getpid(), 1004]


def test_a_second_reload_waits_for_the_first(fake):
    sup = supervisor(fake)
    results = (drive(sup, "healthy", "healthy", fake=fake))
    assert [r["generation"] for r in results] == [2, 3]


def test_stop_during_a_hand_over_stops_every_master(fake):
    fake.boot_delay = 0.2
    sup = supervisor(fake)
    [result] = (drive(sup, "healthy", fake=fake, stop_during_reload=True))
    assert not result["ok"] and "stopping" in result["error"]
    assert all(not p.alive for p in fake.procs.values())
    assert any(m.get("STOPPING") for m in sup.notifier.messages)


@pytest.mark.parametrize("phase", ["finding", "booting", "health-check", "draining", "rolling-back"])
def test_stop_ends_a_hand_over_cleanly_from_every_phase(fake, monkeypatch, phase):
    """Every reload client gets an answer, no READY=1 follows the stop, nothing is left."""
    from shim.runtime import health
    sup = supervisor(fake, ready_timeout=0.3 if phase == "rolling-back" else 5.0, retire_timeout=5.0)
    behaviour = {"finding": "slow-fork", "rolling-back": "hangs"}.get(phase, "healthy")
    if phase == "booting":
        fake.boot_delay = 0.5
    if phase == "health-check":
        sup.config.health_check = "http://127.0.0.1:1/"

        def slow_check(url):
            time.sleep(0.5)       # the loop is held: the stop is seen right after the check
            return ""
        monkeypatch.setattr(health, "check", slow_check)
    results, stop_at = [], []

    def stop() -> None:
        stop_at.append(len(sup.notifier.messages))
        sup._on_stop_signal(signal.SIGTERM)

    def begin() -> None:
        if phase == "draining":
            fake.procs[sup.master.pid].drain = 1.0
        fake.next_behaviour = behaviour
        sup.request_reload(Asker(results.append))
        sup.loop.call_later({"draining": 0.25, "rolling-back": 0.35}.get(phase, 0.1), stop)
    when_serving(sup, begin)
    assert sup.run() == 0
    [result], after_stop = results, sup.notifier.messages[stop_at[0]:]
    assert not result["ok"], result
    assert "stopping" in result["error"] or phase == "rolling-back", result
    assert not [m for m in after_stop if m.get("READY")], after_stop
    assert any(m.get("STOPPING") for m in after_stop)
    assert all(not p.alive for p in fake.procs.values())
    assert sup.state == "stopping"


def test_overlapping_reloads_both_run_in_turn(fake):
    """A second reload asked for while the first is in flight waits, then runs."""
    fake.boot_delay = 0.2
    sup = supervisor(fake)

    results, states = [], []

    def answered(answer) -> None:
        results.append(answer)
        if len(results) == 2:
            sup._on_stop_signal(signal.SIGTERM)

    def second() -> None:
        states.append(sup.state)
        sup.request_reload(Asker(answered))
    when_serving(sup, lambda: (sup.request_reload(Asker(answered)), sup.loop.call_later(0.05, second)))
    assert sup.run() == 0
    assert states == ["reloading"]
    assert [r["ok"] for r in results] == [True, True]
    assert [r["generation"] for r in results] == [2, 3]
    assert results[1]["old_master_pid"] == results[0]["master_pid"]


def test_a_fork_that_has_not_renamed_itself_is_not_taken_for_the_new_master(fake):
    sup = supervisor(fake)
    [result] = (drive(sup, "respawn-first", fake=fake))
    assert result["ok"], result
    assert "worker" not in fake.procs[result["master_pid"]].title
    assert result["master_pid"] == 1005      # not 1004, the respawned worker


def test_time_a_booting_master_waits_for_a_cpu_extends_the_ready_timeout(fake):
    """Many apps reloaded on a few cores: the new master boots slowly because it
    waits for a CPU, not because it hangs. That wait is added to --ready-timeout
    (and systemd's job timeout is moved along); a master that waits for nothing
    still fails on time."""
    fake.boot_delays = [0.1, 1.2]              # the next master boots in 1.2 s, beyond 0.5 s
    sup = supervisor(fake, ready_timeout=0.5)
    t0 = []

    def busy_host() -> None:                   # the new master waits 0.9 s of every second
        if sup.state == "reloading" and sup.masters:
            new = max(sup.masters)
            fake.cpu_wait[new] = 0.9 * (time.monotonic() - t0[0])
        sup.loop.call_later(0.05, busy_host)
    when_serving(sup, lambda: (t0.append(time.monotonic()), busy_host()))
    [result] = drive(sup, "healthy", fake=fake)
    assert result["ok"], result
    assert [m for m in sup.notifier.messages if "EXTEND_TIMEOUT_USEC" in m][-1]["EXTEND_TIMEOUT_USEC"] > 1e6


def test_a_master_waiting_for_nothing_still_fails_on_time(fake):
    fake.boot_delays = [0.1, 1.2]
    sup = supervisor(fake, ready_timeout=0.5)
    t0 = time.monotonic()
    [result] = drive(sup, "healthy", fake=fake)
    assert not result["ok"] and "not ready within 0.5 s (" in result["error"], result
    assert time.monotonic() - t0 < 1.2 + 1

