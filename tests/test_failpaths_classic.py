"""The classic runit-era setup, verbatim, under the shim: the run script's
`unicorn -c $APP_ROOT/config/unicorn.rb` with APP_ROOT=/srv/app/current (an
absolute config path through `current`) and the classic config, whose
APP_PATH from __FILE__ names working_directory, listen and pid. A good deploy,
a rejected deploy, then a restart: the last good release must really boot
(not read its config through `current` and move into the bad release) and
serve the held unix socket its config names through releases/rN.

Real systemd (a private user manager), real Unicorn, a non-root User=, load running."""
from __future__ import annotations

import os
import time

from support.classic import ClassicDeployment, classic  # noqa: F401 (a fixture)
from support.load import Load, get


def wait_serving(d: ClassicDeployment, release: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (get(d.port, timeout=5).release == release and d.unix_get().startswith(f"release={release} ")):
        assert time.monotonic() < deadline, (d.state(), d.journal_text()[-3000:])
        time.sleep(0.2)


def run_classic_fallback(d: ClassicDeployment) -> None:
    """Deploy, roll back and fall back, load running: 0 failed, each step serves the right release."""
    d.start()
    with Load(d.port) as load:
        good = d.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr + d.journal_text()[-3000:]
        wait_serving(d, good)
        bad = d.release(broken=True)
        r = d.reload()
        assert r.returncode != 0
        assert "broken" in d.m.wait_events("reload-failed")[-1]["SERVER_ERROR"]
        wait_serving(d, good)                      # rolled back
        assert os.path.realpath(d.current).endswith(bad)
        r = d.m.systemctl("restart", "app.service")
        assert r.returncode == 0, r.stderr + d.journal_text()[-3000:]
        wait_serving(d, good)                      # fell back
        st = d.state()
        assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
        assert st["StatusText"].startswith(f"degraded: serving last good release {d.root}/releases/{good}"), st
        assert os.path.realpath(f"/proc/{st['MainPID']}/cwd") == f"{d.root}/releases/{good}"
        time.sleep(2)                              # it stays up: no restart loop
        assert d.m.show("app.service", "NRestarts")["NRestarts"] == "0"
        fixed = d.release()
        r = d.reload()
        assert r.returncode == 0, r.stderr + d.journal_text()[-3000:]
        wait_serving(d, fixed)
    assert load.failures() == [], load.failure_kinds()
    assert load.ok_count() > 50
    text = d.journal_text()
    assert "in use" not in text and "adding listener failed" not in text, text[-3000:]
    assert not d.state()["StatusText"].startswith("degraded"), d.state()


# A user manager does not hand StateDirectory= to User= (systemd 257; 252 does), as the system manager does.
STATE = "StateDirectory=app\nExecStartPre=+/bin/chown shimtest:shimtest %S/app"


def test_classic_run_script_and_config_deploy_roll_back_and_fall_back(classic, manager):
    run_classic_fallback(classic(absolute_config=True, bundler=False, service_extra=STATE))


def test_classic_config_with_bundler_falls_back(classic, manager):
    """The same with `bundle exec` and a relative -c (the guides' other spelling)."""
    run_classic_fallback(classic(service_extra=STATE))
