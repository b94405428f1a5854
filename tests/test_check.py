"""Issue 7: `unicorn-shim check` flags each known mistake in a unit file and passes the shipped
examples (real setups, evaluated by the servers themselves: test_check_setups.py)."""
from __future__ import annotations

import os
import subprocess

import pytest

from check_fixtures import gemfile_lock
from support.deploy import REPO, SHIM

GOOD = """\
[Service]
Type=notify
NotifyAccess=all
RuntimeDirectory=app
WorkingDirectory={workdir}
ExecStart=/usr/bin/unicorn-shim run --pid-file /run/app/unicorn.pid \\
    -- bundle exec --keep-file-descriptors unicorn -c config/unicorn.rb -E production
ExecReload=/usr/bin/unicorn-shim reload
KillSignal=SIGQUIT
Restart=on-failure
"""


def check(tmp_path, unit_text, config=None, socket=None, extra=()):
    workdir = tmp_path / "app"
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    if config is not None:
        (workdir / "config" / "unicorn.rb").write_text(config)
    # `bundle exec`: the config is evaluated under Bundler, as the shim will run it.
    (workdir / "Gemfile").write_text('gem "unicorn"\n')
    (workdir / "Gemfile.lock").write_text(gemfile_lock())
    unit = tmp_path / "app.service"
    unit.write_text(unit_text.format(workdir=workdir))
    if socket:
        (tmp_path / "app.socket").write_text(socket)
    return subprocess.run([SHIM, "check", str(unit), *extra], capture_output=True, text=True)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(REPO, "units"))
                                         if n.endswith(".service") and "@" not in n))   # templates: see test_package
def test_shipped_examples_pass(name):
    # --unit-only: the examples name /srv/app and a user `app` that this machine does not have.
    r = subprocess.run([SHIM, "check", "--unit-only", os.path.join(REPO, "units", name)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and ": 0 errors," in r.stdout, r.stdout


def test_a_good_unit_passes(tmp_path):
    r = check(tmp_path, GOOD, config='pid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n',
              socket="[Socket]\nListenStream=127.0.0.1:8080\n")
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("change,expect", [
    (("Type=notify", "Type=forking"), "Type=forking"),
    (("NotifyAccess=all\n", ""), "NotifyAccess=none"),
    (("ExecReload=/usr/bin/unicorn-shim reload\n", ""), "no ExecReload="),
    (("KillSignal=SIGQUIT", "KillSignal=SIGTERM"), "KillSignal=SIGTERM"),
    (("KillSignal=SIGQUIT", "KillSignal=SIGQUIT\nKillMode=process"), "KillMode=process"),
    (("unicorn -c", "unicorn -D -c"), "-D in the server command"),
    (("--keep-file-descriptors ", ""), "without --keep-file-descriptors"),
    (("RuntimeDirectory=app\n", ""), "no RuntimeDirectory="),
])
def test_each_unit_mistake_is_flagged_with_its_fix(tmp_path, change, expect):
    r = check(tmp_path, GOOD.replace(*change), config='pid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n')
    assert r.returncode == 1
    assert expect in r.stdout and "fix: " in r.stdout


@pytest.mark.parametrize("config,expect", [
    ('pid "/srv/app/tmp/pids/unicorn.pid"\n', "is not the shim's --pid-file"),
    ('pid "/run/app/unicorn.pid"\nlisten 9000\n', "listens on 0.0.0.0:9000"),   # as Unicorn expands it
])
def test_config_mistakes_are_flagged(tmp_path, config, expect):
    r = check(tmp_path, GOOD, config=config + 'require "unicorn_shim"\n',
              socket="[Socket]\nListenStream=127.0.0.1:8080\n")
    assert r.returncode == 1 and expect in r.stdout, r.stdout


def test_seed_hook_and_missing_readiness_hook_are_warnings(tmp_path):
    from support.apps import SEED_HOOK
    r = check(tmp_path, GOOD, config='pid "/run/app/unicorn.pid"\n' + SEED_HOOK)
    assert r.returncode == 0
    # under the default spawn the shim leaves no .oldbin for the hook to QUIT
    assert "QUITs the .oldbin master" not in r.stdout and 'require "unicorn_shim"' in r.stdout
    r = check(tmp_path, GOOD.replace("run --pid-file", "run --upgrade usr2 --pid-file"),
              config='pid "/run/app/unicorn.pid"\n' + SEED_HOOK)
    assert r.returncode == 0 and "QUITs the .oldbin master" in r.stdout, r.stdout


def test_server_command_given_on_the_command_line(tmp_path):
    unit = GOOD.replace(" \\\n    -- bundle exec --keep-file-descriptors unicorn -c config/unicorn.rb -E production",
                        " -- $SERVER")
    r = check(tmp_path, unit, extra=["--", "gunicorn", "--daemon", "app:app"])
    assert r.returncode == 1 and "--daemon in the server command" in r.stdout
    assert "KillSignal=SIGQUIT: gunicorn's graceful stop is SIGTERM" in r.stdout


def test_usr2_is_refused_for_gunicorn(tmp_path):
    unit = GOOD.replace("unicorn-shim run ", "unicorn-shim run --upgrade usr2 ").replace(
        "bundle exec --keep-file-descriptors unicorn -c config/unicorn.rb -E production", "gunicorn app:app")
    r = check(tmp_path, unit.replace("KillSignal=SIGQUIT", "KillSignal=SIGTERM"), extra=["--unit-only"])
    assert r.returncode == 1 and "--upgrade usr2: gunicorn's own re-exec cannot keep the sockets" in r.stdout


@pytest.mark.parametrize("limit, warned", [(126, True), (127, False)])
def test_a_reload_timeout_that_leaves_no_time_to_retire_the_old_master_is_flagged(tmp_path, limit, warned):
    """Issue 22: TimeoutStartSec= bounds ExecReload=; the shim rolls a reload back
    when the new master is not ready --retire-timeout + 2 s before it ends."""
    r = check(tmp_path, GOOD + f"TimeoutStartSec={limit}\n", extra=("--unit-only",))
    said = f"--ready-timeout 60 s + --probation 5 s + --retire-timeout 60 s + 2 s is more than TimeoutStartSec={limit}"
    assert (said in r.stdout) is warned, r.stdout


def test_a_reload_timeout_no_reload_can_fit_is_an_error(tmp_path):
    """TimeoutStartSec= at or below --retire-timeout + 2 s: every reload is rolled back
    before it commits, whatever the release; an error, with the setting that helps."""
    r = check(tmp_path, GOOD + "TimeoutStartSec=62\n", extra=("--unit-only",))
    assert r.returncode == 1, r.stdout
    assert "--retire-timeout 60 s + 2 s is not below TimeoutStartSec=62" in r.stdout, r.stdout
    assert "no reload can ever finish" in r.stdout, r.stdout
