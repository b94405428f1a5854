"""The supervisor's state machine against a fake process layer (no processes,
no systemd): what it tells systemd, in which order, when masters boot, die,
hang or leave on their own, and what serves afterwards. The fake masters answer
signals as Unicorn, Gunicorn and Puma do (tests/support/fake_servers.py), so a
wrong signal fails here in milliseconds. The real thing is tested in
test_reload/test_faults; here the races are placed exactly, on the process
events that define them rather than on timers."""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, List

import pytest

from shim.runtime.journal import Log
from shim.runtime.masters import WORKERLESS_GRACE
from shim.runtime.notify import Notifier
from shim.runtime.readiness import UNREAPED_LIMIT
from shim.runtime.servers import PROFILES
from shim.runtime.supervisor import Config, Supervisor
from support.fake_servers import CRASH_LOOP, DIES, HANGS, UNHEALTHY, FakeOS, install

class Recorder(Notifier):
    """The real Notifier's messages, kept instead of sent."""

    def __init__(self) -> None:
        self.messages: List[Dict[str, object]] = []
        self.watchdog_usec = None

    def send(self, **fields: object) -> None:
        self.messages.append(fields)

    def mainpids(self) -> List[int]:
        return [m["MAINPID"] for m in self.messages if "MAINPID" in m]

    def ready_pids(self) -> List[int]:
        return [m["MAINPID"] for m in self.messages if m.get("READY")]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Unicorn's masters (the classic test subject: its own USR2, WINCH and HUP)."""
    fos = FakeOS(str(tmp_path / "app"), "unicorn")
    install(monkeypatch, fos)
    yield fos
    fos.close()


@pytest.fixture(params=sorted(PROFILES))
def any_server(request, monkeypatch, tmp_path):
    """The masters of each server in turn."""
    fos = FakeOS(str(tmp_path / "app"), request.param)
    install(monkeypatch, fos)
    yield fos
    fos.close()


CONFIG = {"unicorn": "config/unicorn.rb", "gunicorn": "config/gunicorn.py", "puma": "config/puma.rb"}


def supervisor(fake: FakeOS, ready_timeout: float = 2.0, retire_timeout: float = 1.0, upgrade: str = "usr2",
               health_check: str = None) -> Supervisor:
    """A shim as `unicorn-shim run --chdir current -- SERVER -c config/...` makes it: the
    config is read through `current`."""
    profile = PROFILES[fake.server.name]
    config = Config(command=[profile.name, profile.config_flags[0], CONFIG[profile.name]], profile=profile,
                    upgrade=upgrade, pid_file=None, ready_timeout=ready_timeout, retire_timeout=retire_timeout,
                    settle=0.1, health_check=health_check, chdir=fake.current, control_path=None,
                    control_mode=0o600, runtime_dir=fake.root)
    return Supervisor(config, [], Recorder(), Log(use_journal=False), {}, loop=fake.loop)


def stop_signal(sig: int = signal.SIGTERM) -> None:
    """What systemd does to stop the unit: a signal to the shim (handled by its loop)."""
    os.kill(os.getpid(), sig)


class Asker:
    """A reload's client that stays connected: called with the answer."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def __call__(self, result) -> None:
        self.answer(result)

    def gone(self) -> bool:
        return False


def reload(sup: Supervisor, reply) -> None:
    """What `unicorn-shim reload` asks over the control socket."""
    sup.handle_request({"command": "reload"}, Asker(reply))


def when_serving(sup: Supervisor, action) -> None:
    """`action` is called from the supervisor's loop once systemd was told READY=1."""
    def look() -> None:
        if sup.notifier.ready_pids():
            action()
        else:
            sup.loop.call_later(0.01, look)
    sup.loop.call_later(0.01, look)


def drive(sup: Supervisor, *reloads: str, fake: FakeOS, stop_during_reload: bool = False,
          deploy: bool = False, served: list = None) -> list:
    """Boot, run one reload per behaviour given (each asked for once the one before
    answered), then stop; the reload results. `deploy`: each reload first deploys a
    new release that behaves so; otherwise the next master is forced to. `served`
    gets the releases that serve when each answer arrives."""
    results, todo = [], list(reloads)

    def next_reload(answer=None) -> None:
        if answer is not None:
            results.append(answer)
            if served is not None:
                served.append(fake.serving())
        if not todo:
            stop_signal(signal.SIGQUIT)
            return
        if deploy:
            fake.deploy(f"r{len(results) + 2}", todo.pop(0))
        else:
            fake.next_behaviour = todo.pop(0)
        reload(sup, next_reload)
        if stop_during_reload:
            sup.loop.call_later(0.02, stop_signal)
    when_serving(sup, next_reload)
    assert sup.run() == 0
    return results


def test_boot_then_a_good_reload(fake):
    sup = supervisor(fake)
    [result] = drive(sup, "healthy", fake=fake)
    old, new = (m.pid for m in fake.started)
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
    [result] = drive(sup, "quits-old", fake=fake)
    assert result["ok"]
    assert sup.notifier.mainpids() == [fake.started[0].pid, os.getpid(), fake.started[1].pid]


@pytest.mark.parametrize("behaviour,reason", [("dies", "exited with status 1 before it was ready"),
                                              ("hangs", "not ready within 0.5 s")])
def test_rollback_keeps_the_old_master(fake, behaviour, reason):
    sup = supervisor(fake, ready_timeout=0.5)
    [result] = drive(sup, behaviour, fake=fake)
    old, new = fake.started
    assert not result["ok"] and reason in result["error"]
    assert sup.notifier.mainpids() == [old.pid, os.getpid(), old.pid]   # back on the old master
    assert signal.SIGQUIT not in old.signals[:-1]                       # only the final stop's QUIT
    assert not new.alive                                                # the failed one is gone


def test_a_halting_master_is_rejected_and_killed_in_seconds(fake):
    """Its workers died, one is left unreaped, it ignores its graceful stop (Gunicorn
    20.1 after a boot error): neither the ready timeout nor the retire grace is waited."""
    sup = supervisor(fake, ready_timeout=30, retire_timeout=30)
    t0 = time.monotonic()
    [result] = drive(sup, "halts", fake=fake)
    old, new = fake.started
    assert not result["ok"] and "left 1 unreaped" in result["error"], result
    assert time.monotonic() - t0 < UNREAPED_LIMIT + WORKERLESS_GRACE + 2
    assert new.signals[-1] == signal.SIGKILL and not new.alive
    assert sup.notifier.mainpids() == [old.pid, os.getpid(), old.pid]


def test_old_master_killed_before_its_child_was_found(fake):
    """The new master is already the manager's child: found in the unit's cgroup."""
    sup = supervisor(fake)
    [result] = drive(sup, "old-killed-at-once", fake=fake)
    old, new = fake.started
    assert result["ok"] and result["master_pid"] == new.pid, result
    assert sup.notifier.mainpids() == [old.pid, os.getpid(), new.pid]


def test_a_second_reload_waits_for_the_first(fake):
    sup = supervisor(fake)
    results = drive(sup, "healthy", "healthy", fake=fake)
    assert [r["generation"] for r in results] == [2, 3]


def test_stop_during_a_hand_over_stops_every_master(fake):
    fake.boot_delay = 0.2
    sup = supervisor(fake)
    [result] = drive(sup, "healthy", fake=fake, stop_during_reload=True)
    assert not result["ok"] and "stopping" in result["error"]
    assert all(not p.alive for p in fake.procs.values())
    assert any(m.get("STOPPING") for m in sup.notifier.messages)


@pytest.mark.parametrize("phase", ["finding", "booting", "health-check", "draining", "rolling-back"])
def test_stop_ends_a_hand_over_cleanly_from_every_phase(fake, phase):
    """Every reload client gets an answer, no READY=1 follows the stop, nothing is left.
    The stop is sent on the process event that shows the hand-over is in that phase,
    and the test checks it was."""
    sup = supervisor(fake, ready_timeout=0.3 if phase == "rolling-back" else 5.0, retire_timeout=5.0,
                     health_check="http://127.0.0.1:1/health" if phase == "health-check" else None)
    results, stop_at, seen = [], [], {}

    def stop(why: str) -> None:
        """The stop, once: with each master's (pid, alive, workers) when it was sent."""
        if not stop_at:
            seen[why] = [(p.pid, p.alive, len(p.workers())) for p in fake.started]
            stop_at.append(len(sup.notifier.messages))
            stop_signal()
    old = []
    if phase == "finding":       # USR2 sent, no new master yet
        fake.on_signal.append(lambda p, sig: sig == signal.SIGUSR2 and p in old and stop("usr2"))
    elif phase == "booting":     # the new master exists, has no worker yet
        fake.on_start.append(lambda p: old and stop("started"))
    elif phase == "health-check":
        fake.on_health.append(lambda: old and stop("checking"))    # not the boot's check
    elif phase == "draining":    # the old master QUIT by the retire, finishing its requests
        fake.on_signal.append(lambda p, sig: sig == signal.SIGQUIT and p in old and stop("retiring"))
    elif phase == "rolling-back":   # the new master QUIT by the rollback; hung, it ignores that
        fake.on_start.append(lambda p: old and setattr(p, "deaf", True))
        fake.on_signal.append(lambda p, sig: sig == signal.SIGQUIT and len(fake.started) == 2
                              and p is fake.started[1] and stop("rolling back"))

    def begin() -> None:
        old.append(fake.started[0])
        fake.started[0].drain = 1.0 if phase == "draining" else 0.0
        fake.boot_delay = 0.5 if phase == "booting" else fake.boot_delay
        fake.next_behaviour = {"finding": "slow-fork", "rolling-back": HANGS}.get(phase, "")
        reload(sup, results.append)
        sup.loop.call_later(10, stop, "never")     # the phase never came: fail, not hang
    when_serving(sup, begin)
    assert sup.run() == 0
    [result], after_stop = results, sup.notifier.messages[stop_at[0]:]
    # the stop landed in the phase named
    if phase == "finding":
        assert seen["usr2"] == [(old[0].pid, True, 2)], seen     # no new master yet
    elif phase == "booting":
        [(_, _, _), (_, alive, workers)] = seen["started"]
        assert alive and workers == 0, seen
    elif phase == "health-check":
        # the boot's check passed; the reload's had begun, with the new workers up
        assert fake.health_checks[:1] == ["HTTP 200"] and seen["checking"][1][2] == 2, (fake.health_checks, seen)
    elif phase == "draining":
        assert seen["retiring"][0][1] and seen["retiring"][1][1:] == (True, 2), seen  # old drains, new serves
    else:
        assert seen["rolling back"][1][1], seen
    assert not result["ok"], result
    # a rollback under way finishes: its answer says why the deploy failed
    assert "stopping" in result["error"] or "not ready within" in result["error"] and phase == "rolling-back", result
    assert not [m for m in after_stop if m.get("READY")], after_stop
    assert any(m.get("STOPPING") for m in after_stop)
    assert all(not p.alive for p in fake.procs.values())


def test_overlapping_reloads_both_run_in_turn(fake):
    """A second reload asked for while the first is in flight waits, then runs."""
    fake.boot_delay = 0.2
    sup = supervisor(fake)
    results, mainpid_then = [], []

    def answered(answer) -> None:
        results.append(answer)
        if len(results) == 2:
            stop_signal()

    def second() -> None:
        mainpid_then.append(sup.notifier.mainpids()[-1])
        reload(sup, answered)
    # the second is asked for once the new master exists: the hand-over is under way
    fake.on_start.append(lambda p: len(fake.started) == 2 and sup.loop.call_later(0, second))
    when_serving(sup, lambda: reload(sup, answered))
    assert sup.run() == 0
    assert mainpid_then == [os.getpid()]       # MAINPID was the shim: a hand-over in flight
    assert [r["ok"] for r in results] == [True, True]
    assert [r["generation"] for r in results] == [2, 3]
    assert results[1]["old_master_pid"] == results[0]["master_pid"]


def test_a_fork_that_has_not_renamed_itself_is_not_taken_for_the_new_master(fake):
    sup = supervisor(fake)
    [result] = drive(sup, "respawn-first", fake=fake)
    assert result["ok"], result
    new = fake.procs[result["master_pid"]]
    assert new.kind == "master" and "worker" not in new.title, new.title   # not the respawned worker


def test_time_a_booting_master_waits_for_a_cpu_extends_the_ready_timeout(fake):
    """Many apps reloaded on a few cores: the new master boots slowly because it
    waits for a CPU, not because it hangs. That wait is added to --ready-timeout
    (and systemd's job timeout is moved along); a master that waits for nothing
    still fails on time."""
    fake.boot_delays = [0.1, 1.2]              # the next master boots in 1.2 s, beyond 0.5 s
    sup = supervisor(fake, ready_timeout=0.5)
    t0 = []

    def busy_host() -> None:                   # the new master waits 0.9 s of every second
        if len(fake.started) == 2:
            fake.cpu_wait[fake.started[1].pid] = 0.9 * (time.monotonic() - t0[0])
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


# -- each server ----------------------------------------------------------------
# The shim starts each generation itself (--upgrade spawn, every server's default)
# and must speak each server's own signals: Gunicorn's and Puma's QUIT is a quick
# stop that cuts requests in flight, Unicorn's HUP re-reads a config that now
# names the new release.

def test_a_good_deploy_serves_the_new_release_and_cuts_no_request(any_server):
    fake = any_server
    sup = supervisor(fake, upgrade="spawn")
    fake.on_start.append(lambda p: setattr(p, "drain", 0.2))    # every master has requests in flight
    served = []
    [result] = drive(sup, "healthy", fake=fake, deploy=True, served=served)
    old, new = fake.started
    assert result["ok"], result
    assert served == [{"r2"}] and result["release"] == fake.realpath(fake.current)
    assert not old.alive and fake.cut_requests == 0      # retired gracefully, then stopped gracefully
    assert all(not p.alive for p in fake.procs.values())


@pytest.mark.parametrize("behaviour,reason", [(DIES, "before it was ready"), (HANGS, "not ready within"),
                                              (CRASH_LOOP, "workers crash-looping")])
def test_a_failed_deploy_leaves_the_old_release_serving(any_server, behaviour, reason):
    fake = any_server
    sup = supervisor(fake, ready_timeout=1.0, upgrade="spawn")
    served = []
    [result] = drive(sup, behaviour, fake=fake, deploy=True, served=served)
    old, new = fake.started
    assert not result["ok"] and reason in result["error"], result
    assert served == [{"r1"}]
    assert old.signals == [PROFILES[fake.server.name].graceful_stop]   # untouched until the final stop
    assert sup.notifier.ready_pids() == [old.pid, old.pid]


@pytest.mark.parametrize("server", sorted(PROFILES))
def test_a_failed_health_check_leaves_the_old_generation_serving_the_old_release(monkeypatch, tmp_path, server):
    fake = FakeOS(str(tmp_path / "app"), server)
    install(monkeypatch, fake)
    sup = supervisor(fake, upgrade="spawn", health_check="http://127.0.0.1:1/health")
    served = []
    try:
        [result] = drive(sup, UNHEALTHY, fake=fake, deploy=True, served=served)
    finally:
        fake.close()
    old, new = fake.started
    # at boot (r1 passes), then at the reload (r2 fails); over each generation's probe socket
    assert fake.health_checks == ["HTTP 200", "HTTP 500"]
    assert not result["ok"] and "HTTP 500" in result["error"], result
    assert served == [{"r1"}], served                           # what curl sees after the rollback
    assert old.release == fake.realpath(os.path.join(fake.root, "releases", "r1"))
    assert sup.notifier.ready_pids() == [old.pid, old.pid]


# -- the fake servers themselves ----------------------------------------------------
# What each fake does on each signal, checked against what the real server was seen
# doing (each class's docstring in support/fake_servers.py says what was seen).

def booted(fake: FakeOS, config: str):
    """A master started as the shim starts one, with its workers up."""
    pid = fake.spawn([fake.server.name, "-c", os.path.join(fake.current, config)], {}, [], chdir=fake.current)
    master = fake.procs[pid]
    settle(fake, lambda: len(master.workers()) == fake.workers)
    return master


def settle(fake: FakeOS, done, timeout: float = 5.0) -> None:
    """Run the fake's events until `done()` holds (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the fake never got there"
        fake.loop.poll(0.01)


def after(fake: FakeOS, master, sig: int, done=lambda: True) -> None:
    fake.signal(master.pid, sig)
    settle(fake, done)
    fake.loop.poll(0.05)        # and whatever the master does next


@pytest.fixture
def bare(tmp_path):
    made = []

    def make(server: str) -> FakeOS:
        made.append(FakeOS(str(tmp_path / server), server))
        return made[-1]
    yield make
    for fos in made:
        fos.close()


def test_fake_unicorn_winch_ttin_hup_ttou_as_seen(bare):
    fake = bare("unicorn")
    m = booted(fake, "config/unicorn.rb")
    after(fake, m, signal.SIGWINCH, lambda: not m.workers())
    assert m.alive and fake.serving() == set()
    after(fake, m, signal.SIGTTIN, lambda: len(m.workers()) == 1)
    assert fake.serving() == {"r1"}
    fake.deploy("r2")
    after(fake, m, signal.SIGHUP)
    assert len(m.workers()) == 2 and fake.serving() == {"r2"} and m.release.endswith("/releases/r2")
    after(fake, m, signal.SIGTTOU)
    assert len(m.workers()) == 1
    fake.tty = True                               # "SIGWINCH ignored because we're not daemonized"
    after(fake, m, signal.SIGWINCH)
    assert len(m.workers()) == 1


@pytest.mark.parametrize("server,graceful,quick", [("unicorn", signal.SIGQUIT, signal.SIGTERM),
                                                   ("gunicorn", signal.SIGTERM, signal.SIGQUIT),
                                                   ("puma", signal.SIGTERM, signal.SIGQUIT)])
def test_fake_stops_finish_requests_only_on_the_graceful_signal(bare, server, graceful, quick):
    fake = bare(server)
    for sig, cut in ((graceful, 0), (quick, 2)):
        m = booted(fake, "config/x")
        m.drain = 0.1                             # each worker has a request in flight
        after(fake, m, sig, lambda: not m.alive)
        assert not m.workers() and fake.cut_requests == cut, (signal.Signals(sig).name, fake.cut_requests)
        fake.cut_requests = 0


def test_fake_unicorn_usr2_forks_one_new_master_that_reads_current(bare):
    fake = bare("unicorn")
    m = booted(fake, "config/unicorn.rb")
    fake.deploy("r2")
    after(fake, m, signal.SIGUSR2, lambda: len(fake.masters()) == 2 and fake.serving() == {"r1", "r2"})
    after(fake, m, signal.SIGUSR2)                # "reexec-ed child already running"
    assert len(fake.masters()) == 2 and m.title.endswith("(old)")


def test_fake_gunicorn_ignores_winch_keeps_one_worker_and_hup_moves_to_current(bare):
    fake = bare("gunicorn")
    m = booted(fake, "config/gunicorn.py")
    after(fake, m, signal.SIGWINCH)               # not daemonized: ignored
    assert len(m.workers()) == 2
    after(fake, m, signal.SIGTTOU)
    after(fake, m, signal.SIGTTOU)
    assert len(m.workers()) == 1
    fake.deploy("r2")
    after(fake, m, signal.SIGHUP)
    assert fake.serving() == {"r2"} and m.release.endswith("/releases/r2")
    after(fake, m, signal.SIGUSR2)                # the re-exec'd master dies on the inherited socket
    [_, child] = fake.started
    assert child.parent == m.pid and not child.alive and fake.masters() == [m]


def test_fake_puma_phased_restart_hup_and_winch_as_seen(bare):
    fake = bare("puma")
    m = booted(fake, "config/puma.rb")
    after(fake, m, signal.SIGWINCH)               # no handler: ignored
    after(fake, m, signal.SIGTTOU)
    after(fake, m, signal.SIGTTOU)
    assert len(m.workers()) == 1
    fake.deploy("r2")
    after(fake, m, signal.SIGUSR1, lambda: fake.serving() == {"r2"})
    assert m.release.endswith("/releases/r2")
    after(fake, m, signal.SIGHUP, lambda: not m.alive)   # no stdout_redirect: a stop


def test_fake_stopped_worker_handles_its_signal_on_cont(bare):
    """SIGSTOP (the shim's pause for a health check) holds every other signal until SIGCONT."""
    fake = bare("gunicorn")
    m = booted(fake, "config/gunicorn.py")
    w = m.workers()[0]
    fake.signal(w.pid, signal.SIGSTOP)
    fake.signal(w.pid, signal.SIGTERM)
    assert w.alive and w not in fake.accepting()
    fake.signal(w.pid, signal.SIGCONT)
    assert not w.alive


def test_fake_workers_answer_http_on_their_masters_own_socket(bare, tmp_path):
    """A socket handed to one master (the shim's probe socket) is answered by that
    master's workers only, once one accepts; a health page of an unhealthy release is a 500."""
    import socket
    fake = bare("unicorn")
    fake.deploy("r2", UNHEALTHY)
    path = str(tmp_path / "probe.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    pid = fake.spawn(["unicorn", "-c", os.path.join(fake.current, "config/unicorn.rb")], {}, [listener.fileno()],
                     chdir=fake.current)
    listener.close()                                   # the master holds it now
    master = fake.procs[pid]

    def ask(path_asked: str) -> bytes:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.sendall(f"GET {path_asked} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        client.setblocking(False)
        answer = []

        def read() -> bool:
            try:
                answer.append(client.recv(4096))
            except BlockingIOError:
                return False
            return True
        settle(fake, read)
        client.close()
        return answer[0]
    assert ask("/").startswith(b"HTTP/1.1 200") and b"release=r2" in ask("/")   # answered once workers boot
    assert ask("/health").startswith(b"HTTP/1.1 500")
    fake.signal(master.pid, signal.SIGKILL)
    with socket.socket(socket.AF_UNIX) as late, pytest.raises(ConnectionRefusedError):
        late.connect(path)                             # gone with its master
