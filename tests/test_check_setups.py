"""Issues 10, 11, 15: `unicorn-shim check` on real setups, with each config
evaluated by Debian's Unicorn 6 / Gunicorn 20.1 as the unit's user (nobody):
no false error on a correct setup, the right error on a broken one, "cannot
tell" for what cannot be evaluated."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from check_fixtures import (CLASSIC_UNICORN_RB, GUNICORN_CONF, UNITS_DIR, Layout, errors,  # noqa: F401 (layout)
                            gunicorn_release, gunicorn_unit, layout, run_check, write_unit)
from support.apps import free_port


def classic(layout: Layout, config_arg: str, options: str = "", extra: str = ""):
    layout.unicorn_release("r1", CLASSIC_UNICORN_RB)
    unit = write_unit(layout, f"bundle exec --keep-file-descriptors unicorn -c {config_arg} -E production",
                      pid_file=f"{layout.current}/tmp/pids/unicorn.pid",
                      socket=f"{layout.current}/tmp/sockets/unicorn.sock", options=options, extra=extra)
    return run_check(unit)


@pytest.mark.parametrize("options", ["", "--upgrade usr2"])
@pytest.mark.parametrize("relative", [True, False])
def test_classic_guide_config_passes(layout, relative, options):
    # A relative -c is named through --chdir by the shim, so APP_PATH is `current` either way.
    r = classic(layout, "config/unicorn.rb" if relative else f"{layout.current}/config/unicorn.rb", options)
    assert r.returncode == 0 and not errors(r), r.stdout + r.stderr
    # the hook finds an .oldbin only under usr2 (spawn leaves none: tests/test_probe_handover.py)
    assert ("QUITs the .oldbin master" in r.stdout) == (options == "--upgrade usr2"), r.stdout
    assert "readiness hook is not loaded" in r.stdout
    assert "cannot tell: the unicorn config" not in r.stdout   # it was evaluated, as nobody
    # The classic `listen APP_PATH + ...` is fine: read through the last good release
    # (a boot's fallback) it names the held socket's file another way, and the shim's
    # Unicorn hook matches the file, not the string (tests/test_failpaths_classic.py).
    assert "names its socket" not in r.stdout, r.stdout


def test_a_config_without_listen_passes_too(layout):
    layout.unicorn_release("r1", "\n".join(line for line in CLASSIC_UNICORN_RB.splitlines()
                                           if not line.startswith("listen ")) + "\n")
    unit = write_unit(layout, "bundle exec --keep-file-descriptors unicorn -c config/unicorn.rb -E production",
                      pid_file=f"{layout.current}/tmp/pids/unicorn.pid",
                      socket=f"{layout.current}/tmp/sockets/unicorn.sock")
    r = run_check(unit)
    assert r.returncode == 0 and not errors(r) and "names its socket" not in r.stdout, r.stdout


def pinned_release(layout: Layout, current_on: str) -> str:
    """r1 and r2 whose config names r1 itself, the way a copied absolute path does."""
    r1 = os.path.join(layout.root, "releases", "r1")
    config = f'working_directory "{r1}"\npid "{layout.current}/tmp/pids/unicorn.pid"\nrequire "unicorn_shim"\n'
    layout.unicorn_release("r1", config)
    layout.unicorn_release("r2", config, flip=current_on == "r2")
    return r1


@pytest.mark.parametrize("options", ["", "--upgrade usr2"])
def test_working_directory_pinned_to_an_old_release(layout, options):
    r1 = pinned_release(layout, current_on="r2")
    unit = write_unit(layout, "unicorn -c config/unicorn.rb", pid_file=f"{layout.current}/tmp/pids/unicorn.pid",
                      options=options)
    r = run_check(unit)
    assert r.returncode == 1, r.stdout
    assert f"working_directory resolves to {r1}, outside --chdir {layout.current}: not the release" in r.stdout


def test_working_directory_of_the_current_release_pins_only_under_usr2(layout):
    r1 = pinned_release(layout, current_on="r1")
    pid = f"{layout.current}/tmp/pids/unicorn.pid"
    r = run_check(write_unit(layout, "unicorn -c config/unicorn.rb", pid_file=pid))
    assert r.returncode == 0 and not errors(r), r.stdout      # spawn: each master starts in its release
    r = run_check(write_unit(layout, "unicorn -c config/unicorn.rb", pid_file=pid, options="--upgrade usr2"))
    assert r.returncode == 1 and f"working_directory resolves to {r1}" in r.stdout, r.stdout
    assert "Unicorn's own re-exec (--upgrade usr2) starts every later master" in r.stdout


def test_bundle_exec_under_usr2_needs_bundle_gemfile_handling(layout):
    layout.unicorn_release("r1", f'pid "{layout.current}/tmp/pids/unicorn.pid"\nrequire "unicorn_shim"\n')
    command = "bundle exec --keep-file-descriptors unicorn -c config/unicorn.rb"
    pid = f"{layout.current}/tmp/pids/unicorn.pid"
    r = run_check(write_unit(layout, command, pid_file=pid, options="--upgrade usr2"))
    assert r.returncode == 1 and "no before_exec setting BUNDLE_GEMFILE" in r.stdout, r.stdout
    # What the shim does since it checks a new master's BUNDLE_GEMFILE before its first fork.
    assert "the shim refuses such a master: every reload to another release fails" in r.stdout
    assert "or remove --upgrade usr2 from ExecStart=" in r.stdout
    r = run_check(write_unit(layout, command, pid_file=pid))      # the default, spawn: a fresh environment
    assert r.returncode == 0 and not errors(r), r.stdout


def test_before_exec_pointing_bundler_at_an_old_release(layout):
    r1 = os.path.join(layout.root, "releases", "r1")
    config = (f'pid "{layout.current}/tmp/pids/unicorn.pid"\nrequire "unicorn_shim"\n'
              f"before_exec {{ |s| ENV['BUNDLE_GEMFILE'] = '{r1}/Gemfile' }}\n")
    layout.unicorn_release("r1", config)
    layout.unicorn_release("r2", config)
    unit = write_unit(layout, "bundle exec --keep-file-descriptors unicorn -c config/unicorn.rb",
                      pid_file=f"{layout.current}/tmp/pids/unicorn.pid", options="--upgrade usr2")
    r = run_check(unit)
    assert r.returncode == 1 and f"sets BUNDLE_GEMFILE={r1}/Gemfile, outside --chdir" in r.stdout, r.stdout


@pytest.mark.parametrize("unit_env,expect_error", [("", False), ("Environment=LISTEN=127.0.0.1:9", True)])
def test_env_fetch_listen_is_evaluated_not_pattern_matched(layout, unit_env, expect_error):
    port = free_port()
    layout.unicorn_release("r1", f'listen ENV.fetch("LISTEN", "127.0.0.1:{port}")\n'
                                 '  pid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n')
    unit = write_unit(layout, f"unicorn -c {layout.current}/config/unicorn.rb", pid_file="/run/app/unicorn.pid",
                      socket=f"127.0.0.1:{port}", extra=unit_env)
    r = run_check(unit)
    assert "ENV.fetch(" not in r.stdout
    if expect_error:       # the unit's own Environment= is what the config sees
        assert r.returncode == 1 and "the config listens on 127.0.0.1:9," in r.stdout, r.stdout
    else:
        assert r.returncode == 0 and not errors(r), r.stdout


@pytest.mark.parametrize("config", ['require "no_such_gem_here"\n', 'raise "needs the app"\n',
                                    'pid ENV.fetch("PID_PATH")\n'])
def test_what_cannot_be_evaluated_is_cannot_tell_never_an_error(layout, config):
    layout.unicorn_release("r1", config)
    unit = write_unit(layout, f"unicorn -c {layout.current}/config/unicorn.rb", pid_file="/run/app/unicorn.pid",
                      socket="127.0.0.1:8080")
    r = run_check(unit)
    assert r.returncode == 0 and not errors(r), r.stdout
    assert "cannot tell: the unicorn config did not load with the server's own code as nobody" in r.stdout


def test_gunicorn_in_a_release_venv_passes(layout):
    gunicorn_release(layout, "r1", GUNICORN_CONF)
    r = run_check(gunicorn_unit(layout))
    assert r.returncode == 0 and "0 errors, 0 warnings" in r.stdout, r.stdout


def test_gunicorn_venv_missing_from_the_release(layout):
    gunicorn_release(layout, "r1", GUNICORN_CONF, venv=False)
    r = run_check(gunicorn_unit(layout))
    assert r.returncode == 1 and f"'venv/bin/gunicorn' does not exist in {layout.current}" in r.stdout, r.stdout


def test_gunicorn_chdir_pinned_to_an_old_release(layout):
    r1 = os.path.join(layout.root, "releases", "r1")
    config = GUNICORN_CONF + f"chdir = {r1!r}\n"
    gunicorn_release(layout, "r1", config)
    gunicorn_release(layout, "r2", config)
    r = run_check(gunicorn_unit(layout))
    assert r.returncode == 1 and f"the config's chdir resolves to {r1}, outside --chdir" in r.stdout, r.stdout


def test_gunicorn_chdir_from_the_config_files_own_path_follows_current(layout):
    gunicorn_release(layout, "r1", GUNICORN_CONF + "chdir = os.path.dirname(os.path.abspath(__file__))\n")
    r = run_check(gunicorn_unit(layout))
    assert r.returncode == 0 and not errors(r), r.stdout


@pytest.mark.parametrize("change,expect", [
    (("Group=nogroup", "Group=no-such-group-x"), "status=216/GROUP"),
    (("User=nobody", "User=no-such-user-x"), "status=217/USER"),
    (("--chdir {current}", "--chdir {current}-missing"), "-missing: not a directory"),
    (("TimeoutStartSec=150", "TimeoutStartSec=30"), "--ready-timeout 60 s is not below TimeoutStartSec=30"),
    (("--pid-file /run/app/unicorn.pid", "--pid-file /var/lib/no-such-dir/unicorn.pid"),
     "the directory /var/lib/no-such-dir does not exist"),
])
def test_host_mistakes_that_stop_a_start(layout, change, expect):
    layout.unicorn_release("r1", 'pid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n')
    unit = write_unit(layout, f"unicorn -c {layout.current}/config/unicorn.rb", pid_file="/run/app/unicorn.pid",
                      socket="127.0.0.1:8080")
    with open(unit) as f:
        text = f.read()
    old, new = (c.format(current=layout.current) for c in change)
    assert old in text
    with open(unit, "w") as f:
        f.write(text.replace(old, new))
    r = run_check(unit)
    assert r.returncode == 1 and expect in r.stdout, r.stdout


def test_pid_directory_not_writable_by_the_user(layout):
    layout.unicorn_release("r1", f'pid "{layout.current}/tmp/pids/unicorn.pid"\nrequire "unicorn_shim"\n')
    shutil.chown(os.path.join(layout.shared, "tmp", "pids"), "root", "root")
    unit = write_unit(layout, f"unicorn -c {layout.current}/config/unicorn.rb",
                      pid_file=f"{layout.current}/tmp/pids/unicorn.pid", socket="127.0.0.1:8080")
    r = run_check(unit)
    assert r.returncode == 1 and "nobody cannot write in" in r.stdout, r.stdout


def test_socket_unit_path_inside_the_runtime_directory(layout):
    layout.unicorn_release("r1", 'pid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n')
    unit = write_unit(layout, f"unicorn -c {layout.current}/config/unicorn.rb", pid_file="/run/app/unicorn.pid",
                      socket="/run/app/unicorn.sock")
    r = run_check(unit)
    assert r.returncode == 1 and "lives in RuntimeDirectory= /run/app" in r.stdout, r.stdout


@pytest.mark.parametrize("server", ["unicorn", "gunicorn"])
def test_root_master_whose_workers_cannot_reach_the_readiness_socket(layout, server):
    # Measured: the hook's reports never arrive, and the shim trusts the heuristic after HOOK_SILENCE.
    if server == "unicorn":
        layout.unicorn_release("r1", 'pid "/run/app/unicorn.pid"\nuser "nobody", "nogroup"\nrequire "unicorn_shim"\n')
        unit = write_unit(layout, f"unicorn -c {layout.current}/config/unicorn.rb", pid_file="/run/app/unicorn.pid",
                          socket="127.0.0.1:8080", extra="RuntimeDirectoryMode=0750")
    else:
        gunicorn_release(layout, "r1", GUNICORN_CONF.replace("gunicorn.pid", "unicorn.pid") + 'user = "nobody"\n')
        unit = write_unit(layout, "venv/bin/gunicorn -c gunicorn.conf.py app:application",
                          pid_file="/run/app/unicorn.pid", socket="127.0.0.1:8000", kill_signal="SIGTERM",
                          extra="RuntimeDirectoryMode=0750")
    with open(unit) as f:
        text = f.read().replace("User=nobody\nGroup=nogroup\n", "")
    with open(unit, "w") as f:
        f.write(text)
    r = run_check(unit)
    assert r.returncode == 0 and not errors(r), r.stdout
    # Their reports reach the shim over the channel they inherit (tests/test_workers.py); what is
    # left to say is that the master keeps root.
    assert ("warning: a root master whose workers run as nobody: the master keeps root for as long as it runs, "
            "and reads the release's code as root at every reload\n"
            "    fix: User=nobody and remove `user` from the config: the shim needs no root") in r.stdout, r.stdout
    assert "readiness socket" not in r.stdout
    assert "--ready-timeout" not in r.stdout and "0751" not in r.stdout


def test_current_on_a_release_that_failed_its_last_reload(layout):
    layout.unicorn_release("r1", 'pid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n')
    bad = layout.unicorn_release("r2", 'pid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n')
    unit = write_unit(layout, f"unicorn -c {layout.current}/config/unicorn.rb", pid_file="/run/app/unicorn.pid",
                      socket="127.0.0.1:8080")
    state = os.path.join(layout.root, "state")
    os.makedirs(state)
    r = run_check(unit, env={"STATE_DIRECTORY": state})
    assert r.returncode == 0 and f"no record at {state}/state.json" in r.stdout, r.stdout
    good = os.path.join(layout.root, "releases", "r1")
    with open(os.path.join(state, "state.json"), "w") as f:
        json.dump({"last_good_release": good, "last_failed_release": bad}, f)
    r = run_check(unit, env={"STATE_DIRECTORY": state})
    assert r.returncode == 1 and "the release whose last start or reload failed" in r.stdout and good in r.stdout, r.stdout


# --- the packaged setup: /etc/unicorn-shim/APP.conf + the templated units -------------------------

APP_CONF = """\
APP_DIR={current}
SERVER_COMMAND=unicorn -c {current}/config/unicorn.rb -E production
LISTEN=127.0.0.1:{port}
USER=nobody
GROUP=nogroup
"""
PACKAGED_RB = 'worker_processes 2\npreload_app true\npid "/run/unicorn-shim/shop/server.pid"\nrequire "unicorn_shim"\n'


@pytest.fixture
def packaged(layout):
    conf_dir = os.path.join(layout.root, "etc")
    unit_dir = os.path.join(layout.root, "systemd")
    os.makedirs(conf_dir)
    os.makedirs(unit_dir)
    layout.unicorn_release("r1", PACKAGED_RB)
    with open(os.path.join(conf_dir, "shop.conf"), "w") as f:
        f.write(APP_CONF.format(current=layout.current, port=free_port()))
    env = {"UNICORN_SHIM_CONF_DIR": conf_dir, "SYSTEMD_UNIT_PATH": f"{unit_dir}:{UNITS_DIR}"}
    return layout, conf_dir, unit_dir, env


def test_packaged_app_passes_by_any_name(packaged):
    layout, conf_dir, _units, env = packaged
    for target in ("shop", "unicorn-shim@shop", "unicorn-shim@shop.service", os.path.join(conf_dir, "shop.conf")):
        r = run_check(target, env=env)
        assert r.returncode == 0 and not errors(r), (target, r.stdout, r.stderr)
        assert "unicorn-shim@shop.service" in r.stdout.splitlines()[-1]


def test_packaged_app_local_dropin_is_merged(packaged):
    layout, _conf, unit_dir, env = packaged
    os.makedirs(os.path.join(unit_dir, "unicorn-shim@shop.service.d"))
    with open(os.path.join(unit_dir, "unicorn-shim@shop.service.d", "override.conf"), "w") as f:
        f.write("[Service]\nKillSignal=SIGTERM\n")
    r = run_check("shop", env=env)
    assert r.returncode == 1 and "KillSignal=SIGTERM: unicorn's graceful stop is SIGQUIT" in r.stdout, r.stdout


def test_packaged_app_with_an_invalid_conf(packaged):
    layout, conf_dir, _units, env = packaged
    with open(os.path.join(conf_dir, "shop.conf"), "w") as f:
        f.write(f"APP_DIR={layout.current}\nSERVER_COMMAND=unicorn\n")
    r = run_check("shop", env=env)
    assert r.returncode == 1 and "LISTEN= is missing" in r.stdout, r.stdout


def test_an_unknown_app_says_where_it_looked(packaged):
    _layout, _conf, _units, env = packaged
    r = run_check("nosuchapp", env=env)
    assert r.returncode == 2 and "no such app in" in r.stderr, r.stderr


def test_the_packaged_units_own_files_stand_for_the_app(packaged):
    layout, conf_dir, _units, env = packaged
    dropin = "/run/systemd/generator/unicorn-shim@shop.service.d/50-unicorn-shim-conf.conf"
    r = run_check(dropin, env=env)
    assert r.returncode == 0 and "unicorn-shim@shop.service" in r.stdout.splitlines()[-1], r.stdout
    r = run_check(os.path.join(UNITS_DIR, "unicorn-shim@.service"), env=env)
    assert r.returncode == 2 and "the template of the packaged units: check an app instead" in r.stderr


def test_a_lone_unit_file_cannot_tell_which_sockets_the_shim_holds(layout):
    port = free_port()
    layout.unicorn_release("r1", f'listen "127.0.0.1:{port}"\npid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n')
    unit = write_unit(layout, f"unicorn -c {layout.current}/config/unicorn.rb", pid_file="/run/app/unicorn.pid")
    r = run_check(unit)
    assert r.returncode == 0 and f"cannot tell: whether the shim holds 127.0.0.1:{port}" in r.stdout, r.stdout


def test_exec_start_variables_come_from_the_units_environment(layout):
    layout.unicorn_release("r1", 'pid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n')
    unit = write_unit(layout, "${SERVER} -c ${CONFIG}", pid_file="/run/app/unicorn.pid", socket="127.0.0.1:8080",
                      extra=f"Environment=SERVER=unicorn CONFIG={layout.current}/config/unicorn.rb")
    r = run_check(unit)
    assert r.returncode == 0 and not errors(r) and "cannot tell: the unicorn config" not in r.stdout, r.stdout


def test_gunicorn_workers_cannot_switch_user_under_a_non_root_master(layout):
    gunicorn_release(layout, "r1", GUNICORN_CONF + 'user = "root"\n')
    r = run_check(gunicorn_unit(layout))
    assert r.returncode == 1 and "the config makes workers run as root, but the master runs as nobody" in r.stdout, \
        r.stdout


def test_check_never_writes_a_gemfile_lock(layout):
    release = layout.unicorn_release("r1", f'pid "{layout.current}/tmp/pids/unicorn.pid"\nrequire "unicorn_shim"\n')
    os.unlink(os.path.join(release, "Gemfile.lock"))
    unit = write_unit(layout, f"bundle exec --keep-file-descriptors unicorn -c {layout.current}/config/unicorn.rb",
                      pid_file=f"{layout.current}/tmp/pids/unicorn.pid", options="--upgrade spawn")
    r = run_check(unit)
    assert r.returncode == 0 and "cannot tell: the unicorn config: " in r.stdout, r.stdout
    assert "Gemfile.lock: Bundler would resolve and write it" in r.stdout
    assert not os.path.exists(os.path.join(release, "Gemfile.lock"))


def test_a_value_from_environment_the_check_cannot_see_is_cannot_tell(layout):
    layout.unicorn_release("r1", 'listen ENV.fetch("LISTEN", "127.0.0.1:9")\npid "/run/app/unicorn.pid"\n'
                                 'require "unicorn_shim"\n')
    unit = write_unit(layout, "unicorn -c config/unicorn.rb", pid_file="/run/app/unicorn.pid",
                      socket="127.0.0.1:8080", extra="PassEnvironment=LISTEN")
    r = run_check(unit)
    assert r.returncode == 0 and "cannot tell: the config listens on 127.0.0.1:9," in r.stdout, r.stdout
    assert "(as evaluated with LISTEN unset;" in r.stdout


def test_a_missing_environment_file_stops_the_start(layout):
    layout.unicorn_release("r1", 'pid "/run/app/unicorn.pid"\nrequire "unicorn_shim"\n')
    unit = write_unit(layout, "unicorn -c config/unicorn.rb", pid_file="/run/app/unicorn.pid",
                      socket="127.0.0.1:8080", extra=f"EnvironmentFile={layout.root}/no-such.env")
    r = run_check(unit)
    assert r.returncode == 1 and "no-such.env does not exist: systemd fails the start" in r.stdout, r.stdout
