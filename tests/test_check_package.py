"""Issue 11.3: `unicorn-shim check APP` on the packaged setup under a real systemd
(PID 1 of a booted container, the .deb installed with apt): it reads what
`systemctl cat` merges, finds a release pinned under --upgrade usr2, says when
APP.conf changed since the last daemon-reload, and passes the classic config
(relative -c) that then starts and serves."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from test_package import container  # noqa: F401  (the fixture: a booted Debian)

CONF = """\
APP_DIR=/srv/myapp/current
SERVER_COMMAND=unicorn -c config/unicorn.rb -E production config.ru
LISTEN=127.0.0.1:8080
USER=myapp
{options}
"""
PINNED_RB = 'working_directory "/srv/myapp/releases/r1"\npid "/run/unicorn-shim/myapp/server.pid"\n'

UNICORN_RB = """\
APP_PATH = File.expand_path('../..', __FILE__)
worker_processes 2
working_directory APP_PATH
pid "/run/unicorn-shim/myapp/server.pid"
preload_app true
require "unicorn_shim"
"""
CONFIG_RU = 'run ->(env) { [200, {"content-type" => "text/plain"}, ["release=r1\\n"]] }\n'


def write(run, path: str, text: str) -> None:
    run("python3", "-c", f"open({path!r}, 'w').write({text!r})", check=True)


@pytest.mark.parametrize("container", ["bookworm"], indirect=True)
def test_check_app_on_the_packaged_units(deb, container):  # noqa: F811
    run, share = container
    shutil.copy(deb, share)
    r = run("apt-get", "install", "-y", f"/mnt/share/{os.path.basename(deb)}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run("useradd", "--system", "--create-home", "--home-dir", "/srv/myapp", "myapp", check=True)
    run("mkdir", "-p", "/srv/myapp/releases/r1/config", check=True)
    write(run, "/srv/myapp/releases/r1/config/unicorn.rb", PINNED_RB)
    write(run, "/srv/myapp/releases/r1/config.ru", CONFIG_RU)
    run("sh", "-c", "ln -sfn /srv/myapp/releases/r1 /srv/myapp/current && chown -R myapp:myapp /srv/myapp",
        check=True)

    # A config that names its release itself, under Unicorn's own re-exec: pinned to releases/r1.
    write(run, "/etc/unicorn-shim/myapp.conf", CONF.format(options="SHIM_OPTIONS=--upgrade usr2"))
    run("systemctl", "daemon-reload", check=True)
    r = run("unicorn-shim", "check", "myapp")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "working_directory resolves to /srv/myapp/releases/r1" in r.stdout, r.stdout
    assert "Unicorn's own re-exec (--upgrade usr2)" in r.stdout, r.stdout

    # The default upgrade, before daemon-reload: systemd still runs the old settings.
    write(run, "/etc/unicorn-shim/myapp.conf", CONF.format(options=""))
    r = run("unicorn-shim", "check", "unicorn-shim@myapp")
    assert "changed since systemd last loaded it" in r.stdout, r.stdout

    # The classic config (APP_PATH from __FILE__, relative -c): the shim names it through `current`.
    write(run, "/srv/myapp/releases/r1/config/unicorn.rb", UNICORN_RB)
    run("systemctl", "daemon-reload", check=True)
    for target in ("myapp", "unicorn-shim@myapp.service", "/etc/unicorn-shim/myapp.conf"):
        r = run("unicorn-shim", "check", target)
        assert r.returncode == 0 and "\nerror:" not in "\n" + r.stdout, (target, r.stdout, r.stderr)
        assert "unicorn-shim@myapp.service (/etc/unicorn-shim/myapp.conf): 0 errors" in r.stdout, r.stdout
    # From the app's own user: no error either; what it cannot see is "cannot tell".
    r = run("runuser", "-u", "myapp", "--", "unicorn-shim", "check", "myapp")
    assert r.returncode == 0 and "\nerror:" not in "\n" + r.stdout, r.stdout + r.stderr

    # What check passed starts and serves.
    run("systemctl", "enable", "--now", "unicorn-shim@myapp.socket", check=True)
    deadline = time.monotonic() + 60
    while run("systemctl", "is-active", "unicorn-shim@myapp.service").stdout.strip() != "active" \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run("curl", "-s", "127.0.0.1:8080/").stdout.strip() == "release=r1", \
        run("journalctl", "-u", "unicorn-shim@myapp", "--no-pager").stdout[-3000:]
