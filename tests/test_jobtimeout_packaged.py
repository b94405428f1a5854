"""Issue 22 on the setup the package ships: a booted Debian 12 with the .deb, the
templated unicorn-shim@myapp.service on the system manager, its two-line ExecReload=
(a shell's HUP, then `unicorn-shim reload --signalled`, which systemd times anew),
the app's own non-root user; load running.

1. A reload that cannot finish within TimeoutStartSec= fails before systemd's timer
   fires, with the shim's reason; the old release serves on (the issue's case 2:
   before, systemd killed the client and the new release went live afterwards).
2. ExecReload= killed mid hand-over (what systemd's timeout does): rolled back."""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time

from support.fleet import APP_DIR, CONFIG_RU, UNICORN_RB, Host, LoadOnAll, fleet_of

UNIT = "unicorn-shim@myapp.service"
TIMEOUT_START = 6
BOOT = 12
GIVE_UP = 3


def test_packaged_unit_reload_deadline_and_abandoned_reload(deb, base_dir):  # noqa: F811 (the session's deb)
    work = tempfile.mkdtemp(prefix="fleet-jobtimeout.", dir=base_dir)
    with fleet_of(["bookworm-fleet"], deb, work) as (hs, _key):
        h = hs[0]
        h.run("sh", "-ec", "echo 'SHIM_OPTIONS=--ready-timeout 20 --retire-timeout 1' >> /etc/unicorn-shim/myapp.conf"
              f" && mkdir -p /etc/systemd/system/{UNIT}.d && printf '[Service]\\nTimeoutStartSec={TIMEOUT_START}\\n'"
              f" > /etc/systemd/system/{UNIT}.d/zz-test.conf && systemctl daemon-reload && systemctl restart {UNIT}",
              check=True)
        assert h.run("systemctl", "show", "-p", "TimeoutStartUSec", "--value", UNIT).stdout.strip() == \
            f"{TIMEOUT_START}s"
        _wait(lambda: h.serves() == "r1")
        old_master = h.main_pid()

        # 1. the unit's TimeoutStartSec= is too short for this release's boot
        slow = _release(h, "r2", BOOT)
        with LoadOnAll([h]) as load:
            t = time.monotonic()
            r = h.run("systemctl", "reload", UNIT)
            took = time.monotonic() - t
            assert r.returncode != 0, (took, h.run("journalctl", "-u", UNIT, "--no-pager").stdout[-4000:])
            assert took < BOOT - 2, took        # and systemd never said "Reload operation timed out" (below)
            failed = _event(h, "reload-failed")
            assert failed["REASON"].startswith(f"systemd's reload timeout (TimeoutStartSec={TIMEOUT_START} s)"), \
                failed
            while time.monotonic() < t + BOOT + 3:
                assert h.serves() == "r1"
                time.sleep(0.5)
        _served_r1_throughout(load.results[h.name])
        journal = h.run("journalctl", "-u", UNIT, "--no-pager").stdout
        assert f"reload failed: systemd's reload timeout (TimeoutStartSec={TIMEOUT_START} s)" in journal, journal
        assert "Reload operation timed out" not in journal, journal
        assert _events(h, "reload-done") == []
        _old_master_alone(h, old_master, slow)

        # 2. ExecReload= killed mid hand-over, with time enough otherwise
        h.run("sh", "-ec", f"rm /etc/systemd/system/{UNIT}.d/zz-test.conf && systemctl daemon-reload", check=True)
        slow = _release(h, "r3", BOOT)
        with LoadOnAll([h]) as load:
            t = time.monotonic()

            def kill_exec_reload() -> None:
                time.sleep(GIVE_UP)
                h.run("systemctl", "kill", "--kill-whom=control", "-s", "SIGTERM", UNIT)
            threading.Thread(target=kill_exec_reload, daemon=True).start()
            r = h.run("systemctl", "reload", UNIT)
            assert r.returncode != 0
            assert time.monotonic() - t < GIVE_UP + 3
            assert "went away" in _event(h, "reload-failed", count=2)["REASON"]
            while time.monotonic() < t + BOOT + 3:
                assert h.serves() == "r1"
                time.sleep(0.5)
        _served_r1_throughout(load.results[h.name])
        assert _events(h, "reload-done") == []
        _old_master_alone(h, old_master, slow)

        _release(h, "r4", 0)
        r = h.run("systemctl", "reload", UNIT)
        assert r.returncode == 0, r.stderr + h.run("journalctl", "-u", UNIT, "--no-pager").stdout[-3000:]
        assert h.serves() == "r4"


def _release(h: Host, name: str, boot: float) -> str:
    """releases/NAME, whose master reads its config for `boot` s; `current` flipped to it."""
    d = f"{APP_DIR}/releases/{name}"
    h.run("mkdir", "-p", f"{d}/config", check=True)
    h.run("python3", "-c", f"open('{d}/config.ru','w').write({CONFIG_RU % name!r});"
          f"open('{d}/config/unicorn.rb','w').write({UNICORN_RB + (f'sleep {boot}' if boot else '')!r})",
          check=True)
    h.run("sh", "-ec", f"chown -R deploy:deploy {d} && ln -sfn {d} {APP_DIR}/current.new && "
          f"mv -T {APP_DIR}/current.new {APP_DIR}/current", check=True)
    return d


def _served_r1_throughout(result: dict) -> None:
    assert result["failed"] == 0 and result["ok"] > 20, result
    assert result["releases"] == ["release=r1"], result


def _old_master_alone(h: Host, old_master: str, slow: str) -> None:
    """MainPID is still the old master, the unit is running, nothing of `slow` is left."""
    _wait(lambda: h.run("systemctl", "show", "-p", "SubState", "--value", UNIT).stdout.strip() == "running")
    assert h.main_pid() == old_master

    def unit_procs() -> dict:
        """pid: working directory, of every process in the unit (ps reads its cgroup)."""
        out = h.run("sh", "-c", f"ps -e -o pid=,unit= | while read p u; do [ \"$u\" = {UNIT} ] && "
                    "echo $p $(readlink /proc/$p/cwd); done; true").stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    _wait(lambda: slow not in unit_procs().values())
    found = unit_procs()
    assert old_master in found and slow not in found.values(), (slow, found)


def _events(h: Host, name: str) -> list:
    out = h.run("journalctl", "-u", UNIT, "-o", "json", f"SHIM_EVENT={name}", "--no-pager").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _event(h: Host, name: str, count: int = 1) -> dict:
    _wait(lambda: len(_events(h, name)) >= count)
    found = _events(h, name)
    assert len(found) >= count, (name, found)
    return found[-1]


def _wait(done, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.2)
