"""Issue 24.3: every fix `unicorn-shim check` prints can be applied where the operator
configures — APP.conf for an app of the packaged units, the exact setting for a unit
of one's own — and applying it as printed makes the finding go away. Real releases
(a Capistrano layout, virtualenvs made by Debian's python3 -m venv, Debian's
Unicorn, Gunicorn and Puma), checked as root with User=nobody."""
from __future__ import annotations

import os
import subprocess

import pytest

from check_fixtures import (GUNICORN_CONF, Layout, Packaged, errors, finding, fix_of,  # noqa: F401 (layout)
                            layout, run_check, write_unit)
from support.apps import free_port

UNICORN_RB = 'worker_processes 2\npid "/run/unicorn-shim/shop/server.pid"\nrequire "unicorn_shim"\n'
GUNICORN_PY = GUNICORN_CONF.replace("/run/app/gunicorn.pid", "/run/unicorn-shim/shop/server.pid")
CONF = """\
APP_DIR={current}
SERVER_COMMAND={command}
LISTEN=127.0.0.1:{port}
USER={user}
GROUP=nogroup
{extra}
"""


def conf_text(layout: Layout, command: str, extra: str = "", user: str = "nobody") -> str:
    return CONF.format(current=layout.current, command=command, port=free_port(), user=user, extra=extra)


def venv_release(layout: Layout, name: str, own_gunicorn: bool) -> str:
    """A release with a virtualenv as python3 -m venv makes it; `pip install gunicorn` puts a
    console script in it, except in a --system-site-packages venv where Debian's is installed."""
    path = layout.release(name, {"gunicorn.conf.py": GUNICORN_PY, "app.py": "def application(e, s):\n    pass\n"})
    venv = os.path.join(path, "venv")
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", venv], check=True,
                   timeout=120)
    if own_gunicorn:
        with open(os.path.join(venv, "bin", "gunicorn"), "w") as f:
            f.write(f"#!{venv}/bin/python3\nimport sys\nfrom gunicorn.app.wsgiapp import run\nsys.exit(run())\n")
        os.chmod(os.path.join(venv, "bin", "gunicorn"), 0o755)
    return path


def apply(packaged: Packaged, fix: str) -> None:
    """A fix of the form `KEY=VALUE in CONF` applied to APP.conf as printed."""
    assignment, _, rest = fix.partition(f" in {packaged.conf_path}")
    key = assignment.split("=", 1)[0]
    with open(packaged.conf_path) as f:
        lines = [line for line in f.read().splitlines() if not line.startswith(key + "=")]
    packaged.conf("\n".join(lines + [assignment]) + "\n")


@pytest.mark.parametrize("own_gunicorn,replacement", [
    (True, "venv/bin/gunicorn -c gunicorn.conf.py app:application"),
    (False, "venv/bin/python3 -m gunicorn -c gunicorn.conf.py app:application"),
])
def test_a_bare_gunicorn_ignores_the_release_venv(layout, own_gunicorn, replacement):
    venv_release(layout, "r1", own_gunicorn)
    packaged = Packaged(layout)
    packaged.conf(conf_text(layout, "gunicorn -c gunicorn.conf.py app:application"))
    r = packaged.check()
    f = finding(r.stdout, "warning: the server command 'gunicorn' is /usr/bin/gunicorn, found on the unit's PATH: "
                          "the master runs the system's Python and packages, not those of the release's "
                          "virtualenv venv/")
    assert fix_of(f).startswith(f"SERVER_COMMAND={replacement} in {packaged.conf_path} (a path relative"), f
    apply(packaged, fix_of(f))
    r = packaged.check()
    assert r.returncode == 0 and "found on the unit's PATH" not in r.stdout and not errors(r), r.stdout


def test_an_absolute_venv_path_pins_an_old_release(layout):
    r1 = venv_release(layout, "r1", own_gunicorn=True)
    venv_release(layout, "r2", own_gunicorn=True)
    packaged = Packaged(layout)
    packaged.conf(conf_text(layout, f"{r1}/venv/bin/gunicorn -c gunicorn.conf.py app:application"))
    r = packaged.check()
    assert r.returncode == 1, r.stdout
    f = finding(r.stdout, f"error: the server command {r1}/venv/bin/gunicorn is in {r1}, not the release current "
                          "points at: every master runs that release's gunicorn and its packages whatever "
                          f"{layout.current} names, and none starts once that release is removed")
    assert fix_of(f).startswith("SERVER_COMMAND=venv/bin/gunicorn -c gunicorn.conf.py app:application in "), f
    apply(packaged, fix_of(f))
    r = packaged.check()
    assert r.returncode == 0 and not errors(r), r.stdout


def test_the_job_timeout_follows_shim_options_and_a_dropin_is_named(layout):
    layout.unicorn_release("r1", UNICORN_RB)
    packaged = Packaged(layout)
    # TimeoutStartSec= is the generator's, from --ready-timeout + --retire-timeout + 30 s.
    packaged.conf(conf_text(layout, "unicorn -c config/unicorn.rb", "SHIM_OPTIONS=--ready-timeout 150"))
    r = packaged.check()
    assert r.returncode == 0 and "TimeoutStartSec" not in r.stdout, r.stdout
    packaged.dropin("[Service]\nTimeoutStartSec=100\n")
    r = packaged.check()
    assert r.returncode == 1, r.stdout
    f = finding(r.stdout, "error: --ready-timeout 150 s is not below TimeoutStartSec=100")
    assert fix_of(f) == ("remove TimeoutStartSec= from the drop-in that sets it (systemctl cat "
                         "unicorn-shim@shop.service shows which): the package sets TimeoutStartSec=240"), f
    packaged.dropin(None)
    assert packaged.check().returncode == 0


def test_a_units_own_timeout_fix_is_its_setting(layout):
    layout.unicorn_release("r1", UNICORN_RB.replace("/run/unicorn-shim/shop/", "/run/app/"))
    unit = write_unit(layout, "unicorn -c config/unicorn.rb", pid_file="/run/app/server.pid",
                      socket="127.0.0.1:8080", options="--ready-timeout 150")
    r = run_check(unit)
    f = finding(r.stdout, "error: --ready-timeout 150 s is not below TimeoutStartSec=150")
    assert fix_of(f) == "TimeoutStartSec=240 (or a lower --ready-timeout)", f
    with open(unit) as f_:
        text = f_.read()
    with open(unit, "w") as f_:
        f_.write(text.replace("TimeoutStartSec=150", fix_of(f).split()[0]))
    assert run_check(unit).returncode == 0


def test_a_root_master_switching_users_is_fixed_in_app_conf(layout):
    layout.unicorn_release("r1", UNICORN_RB + 'user "nobody", "nogroup"\n')
    packaged = Packaged(layout)
    packaged.conf(conf_text(layout, "unicorn -c config/unicorn.rb", user="root"))
    r = packaged.check()
    f = finding(r.stdout, "warning: a root master whose workers run as nobody: the master keeps root")
    assert fix_of(f) == (f"USER=nobody in {packaged.conf_path} and remove `user` from the config: the shim "
                         "needs no root"), f
    apply(packaged, fix_of(f).split(" and remove")[0])
    layout.unicorn_release("r2", UNICORN_RB)
    r = packaged.check()
    assert r.returncode == 0 and "root master" not in r.stdout and not errors(r), r.stdout


def test_a_socket_in_the_runtime_directory_moves_to_listen(layout):
    layout.unicorn_release("r1", UNICORN_RB)
    packaged = Packaged(layout)
    packaged.conf(conf_text(layout, "unicorn -c config/unicorn.rb",
                            "SHIM_OPTIONS=--listen unix:/run/unicorn-shim/shop/unicorn.sock"))
    r = packaged.check()
    f = finding(r.stdout, "warning: the socket /run/unicorn-shim/shop/unicorn.sock is in /run/unicorn-shim/shop "
                          "(RuntimeDirectoryMode=0750)")
    assert fix_of(f).startswith(f"LISTEN=unix:/run/unicorn-shim/shop.sock in {packaged.conf_path} instead of "
                                "--listen in SHIM_OPTIONS="), f
    apply(packaged, fix_of(f).split(" instead of")[0])
    with open(packaged.conf_path) as f_:
        packaged.conf(f_.read().replace("SHIM_OPTIONS=--listen unix:/run/unicorn-shim/shop/unicorn.sock\n", ""))
    r = packaged.check()
    assert r.returncode == 0 and "RuntimeDirectoryMode" not in r.stdout and not errors(r), r.stdout


def test_a_units_own_socket_fix_does_not_open_the_runtime_directory(layout):
    layout.unicorn_release("r1", UNICORN_RB.replace("/run/unicorn-shim/shop/", "/run/app/"))
    unit = write_unit(layout, "unicorn -c config/unicorn.rb", pid_file="/run/app/server.pid",
                      options="--listen unix:/run/app/unicorn.sock", extra="RuntimeDirectoryMode=0750")
    f = finding(run_check(unit).stdout, "warning: the socket /run/app/unicorn.sock is in /run/app")
    assert fix_of(f) == ("let a .socket unit own it (ListenStream=/run/unicorn.sock, SocketGroup=www-data, "
                         "SocketMode=0660), or let the web server in through the unit's group: adduser www-data "
                         "nogroup, with RuntimeDirectoryMode=0750"), f


@pytest.mark.parametrize("server,files,command,where", [
    ("unicorn", {"config/unicorn.rb": 'worker_processes 2\nif true\n'}, "unicorn -c config/unicorn.rb",
     "config/unicorn.rb:2: syntax error, unexpected end-of-input"),
    ("gunicorn", {"gunicorn.conf.py": "workers = 2\nbind = [\n"}, "gunicorn -c gunicorn.conf.py app:app",
     "gunicorn.conf.py:2: '[' was never closed"),
    ("puma", {"config/puma.rb": "workers 2\nif true\n", "config.ru": "run ->(e) { [200, {}, []] }\n"},
     "puma -C config/puma.rb", "config/puma.rb:2: syntax error, unexpected end-of-input"),
])
def test_a_syntax_error_is_an_error_with_its_place_and_no_environment_advice(layout, server, files, command, where):
    layout.release("r1", files)
    packaged = Packaged(layout)
    packaged.conf(conf_text(layout, command))
    r = packaged.check()
    assert r.returncode == 1, r.stdout
    f = finding(r.stdout, f"error: the {server} config has a syntax error: ")
    assert where in f and f.splitlines()[0].endswith(": every master fails to start"), f
    checker = "python3 -m py_compile" if server == "gunicorn" else "ruby -c"
    assert fix_of(f) == f"correct it (`{checker} {layout.current}/{where.split(':')[0]}` shows the same)", f
    assert "gems" not in r.stdout and "environment" not in r.stdout, r.stdout


def test_the_fix_for_a_failed_release_when_no_shim_runs_is_a_start(layout):
    import json
    good = layout.unicorn_release("r1", UNICORN_RB)
    bad = layout.unicorn_release("r2", UNICORN_RB)
    packaged = Packaged(layout)
    packaged.conf(conf_text(layout, "unicorn -c config/unicorn.rb"))
    state = os.path.join(layout.root, "state")
    os.makedirs(state)
    with open(os.path.join(state, "state.json"), "w") as f_:
        json.dump({"last_good_release": good, "last_failed_release": bad,
                   "last_failed_reason": "new master 4242 exited with status 1 before it was ready: "
                                         "cannot load such file -- sidekiq (LoadError)"}, f_)
    r = run_check("shop", env={**packaged.env, "STATE_DIRECTORY": state})
    f = finding(r.stdout, f"error: {layout.current} points at {bad}, the release whose last start or reload failed "
                          "(new master 4242 exited with status 1 before it was ready: cannot load such file -- "
                          "sidekiq (LoadError)); no shim is running: `systemctl start unicorn-shim@shop.service` "
                          "would start the broken release first")
    assert fix_of(f) == (f"flip it back: ln -sfn {good} {layout.current}.tmp && mv -T {layout.current}.tmp "
                         f"{layout.current}, then systemctl start unicorn-shim@shop.service; or deploy a fixed "
                         "release, then systemctl start unicorn-shim@shop.service"), f
    assert "reload" not in fix_of(f)


@pytest.mark.parametrize("conf_extra,config,start,fix", [
    ("USER=no-such-user-x\n", UNICORN_RB, "error: User=no-such-user-x: no such user",
     "adduser --system --group --home /srv/no-such-user-x no-such-user-x (or correct USER= in {conf})"),
    ("", UNICORN_RB.replace("/run/unicorn-shim/shop/server.pid", "/var/lib/no-such-dir/server.pid"),
     "error: the config's pid file /var/lib/no-such-dir/server.pid is not the shim's --pid-file",
     "PID_FILE=/var/lib/no-such-dir/server.pid in {conf}, or the config's pid set to "
     "/run/unicorn-shim/shop/server.pid"),
    ("", UNICORN_RB + 'listen "127.0.0.1:9"\n', "error: the config listens on 127.0.0.1:9, which the shim does not",
     "remove the `listen` line and give the address to the shim (LISTEN= in {conf}); the shim passes its sockets "
     "with -l"),
    ("", 'raise "needs the app"\n', "cannot tell: the unicorn config did not load",
     "if it needs the app's gems or environment, give the unit what the shim will give the master (ENV_NAME= or "
     "ENVIRONMENT_FILE= in {conf}), then check again"),
])
def test_fixes_for_a_packaged_app_name_its_conf(layout, conf_extra, config, start, fix):
    layout.unicorn_release("r1", config)
    packaged = Packaged(layout)
    text = conf_text(layout, "unicorn -c config/unicorn.rb")
    packaged.conf(text.replace("USER=nobody\n", "") + conf_extra if conf_extra.startswith("USER=") else text)
    f = finding(packaged.check().stdout, start)
    assert fix_of(f) == fix.format(conf=packaged.conf_path), f


def test_a_setting_the_package_makes_is_fixed_by_removing_the_dropin(layout):
    layout.unicorn_release("r1", UNICORN_RB)
    packaged = Packaged(layout)
    packaged.conf(conf_text(layout, "unicorn -c config/unicorn.rb"))
    packaged.dropin("[Service]\nKillSignal=SIGTERM\nNotifyAccess=main\n")
    r = packaged.check()
    for start, fix in (("error: KillSignal=SIGTERM", "KillSignal=SIGQUIT"), ("error: NotifyAccess=main", "NotifyAccess=all")):
        key = fix.split("=")[0]
        assert fix_of(finding(r.stdout, start)) == (
            f"remove {key}= from the drop-in that sets it (systemctl cat unicorn-shim@shop.service shows which): "
            f"the package sets {fix}")
    packaged.dropin(None)
    r = packaged.check()
    assert r.returncode == 0 and not errors(r), r.stdout
