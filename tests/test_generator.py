"""The generator: /etc/unicorn-shim/APP.conf -> drop-ins that systemd reads back
as exactly what the conf says (no specifier, no variable expansion, no line
continuation), checked with systemd-analyze verify and with a real systemd
manager that runs the generated ExecStart= and Environment=."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shim.tooling import generator
from support.deploy import REPO

SHIM = os.path.join(REPO, "bin", "unicorn-shim")
HOSTILE = r"""
APP_DIR=/srv/my app/current%i
SERVER_COMMAND=unicorn -c "config/uni corn.rb" -E '$RAILS_ENV' '${HOME}' x%i 'back\' '"q"' ';'
LISTEN=127.0.0.1:8080 unix:/srv/app/current/tmp/sockets/unicorn.sock
ENV_SECRET_KEY_BASE='a$b ${c}%d"e\f'
ENV_lower_1="x  y"
ENVIRONMENT_FILE=-/etc/app%i.env
"""
HOSTILE_ARGS = ["unicorn", "-c", "config/uni corn.rb", "-E", "$RAILS_ENV", "${HOME}", "x%i", "back\\", '"q"', ";"]


def dropins(text: str, app: str = "myapp") -> dict:
    return generator.dropins(app, generator.parse_conf(text))


def service_of(text: str) -> str:
    return dropins(text)[f"unicorn-shim@myapp.service.d/{generator.DROPIN}"]


def socket_of(text: str) -> str:
    return dropins(text)[f"unicorn-shim@myapp.socket.d/{generator.DROPIN}"]


BASE = "APP_DIR=/srv/app/current\nSERVER_COMMAND=unicorn -c config/unicorn.rb\nLISTEN=127.0.0.1:8080\n"


@pytest.mark.parametrize("line, message", [
    ("USER=app%i", "not a user or group name"),
    ("GROUP=a b", "not a user or group name"),
    ("SOCKET_GROUP=$web", "not a user or group name"),
    ("APP_DIR=/srv/app\\\\", "backslash"),
    ("APP_DIR=srv/app", "absolute path"),
    ("PID_FILE='/run/a\tb.pid'", "control character"),
    ("ENV_FOO='a\x1bb'", "control character"),
    ("SERVER_COMMAND='unicorn\x07'", "control character"),
    ("ENVIROMENT_FILE=/etc/app.env", "unknown key ENVIROMENT_FILE"),
    ("SOCKET_MODE=660x", "octal mode"),
    ("LISTEN=unix:/run/unicorn-shim/myapp/unicorn.sock", "RuntimeDirectory="),
    ("LISTEN=unix:/run/unicorn-shim/myapp/../myapp/u.sock", "RuntimeDirectory="),
    ("SHIM_OPTIONS=--ready-timeout soon", "unicorn-shim run would refuse it: .*--ready-timeout"),
])
def test_values_systemd_would_misread_are_refused(line, message):
    with pytest.raises(generator.ConfError, match=message.replace("$", r"\$")):
        dropins(BASE + line + "\n")


def test_environment_and_socket_permissions():
    text = BASE + "LISTEN=unix:/run/unicorn-shim/myapp.sock\nENV_SECRET_KEY_BASE=s3cret\n" \
                  "ENVIRONMENT_FILE=/etc/myapp.env\nUSER=web\nGROUP=webgrp\n"
    service, socket = service_of(text), socket_of(text)
    assert 'Environment="SECRET_KEY_BASE=s3cret"' in service.splitlines()
    assert "EnvironmentFile=/etc/myapp.env" in service.splitlines()
    assert "ListenStream=/run/unicorn-shim/myapp.sock" in socket.splitlines()
    assert "SocketUser=web" in socket.splitlines() and "SocketMode=0660" in socket.splitlines()
    # The web server's group where it exists, else the app's own.
    group = generator.WEB_SERVER_GROUP if _group_exists(generator.WEB_SERVER_GROUP) else "webgrp"
    assert f"SocketGroup={group}" in socket.splitlines()
    socket = socket_of(text + "SOCKET_GROUP=nginx\nSOCKET_MODE=660\n")
    assert "SocketGroup=nginx" in socket.splitlines() and "SocketMode=0660" in socket.splitlines()
    assert "SocketMode" not in socket_of(BASE)        # TCP only: nothing to own


@pytest.mark.parametrize("options,timeout", [
    ("", 150),                                                     # the template's own value
    ("SHIM_OPTIONS=--ready-timeout 150\n", 240),
    ("SHIM_OPTIONS=--retire-timeout 10 --ready-timeout 20\n", 60),
])
def test_the_job_timeout_follows_the_shims_own_timeouts(options, timeout):
    """TimeoutStartSec= bounds each start and each reload job: it is derived, so that
    what `check` asks for is what the conf already gives."""
    assert f"TimeoutStartSec={timeout}" in service_of(BASE + options).splitlines()


def _group_exists(name: str) -> bool:
    import grp
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _write_units(tmp_path, text: str) -> list:
    """The templates and the app's generated drop-ins, as systemd would find them."""
    units = []
    for name in ("unicorn-shim@.service", "unicorn-shim@.socket"):
        body = open(os.path.join(REPO, "units", name)).read()
        (tmp_path / name).write_text(body.replace(generator.SHIM, SHIM))
    for rel, body in dropins(text).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body.replace(generator.SHIM, SHIM))
        units.append(str(tmp_path / rel.split(".d/")[0]))
    return units


def test_generated_dropins_verify(tmp_path):
    units = _write_units(tmp_path, HOSTILE)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "unicorn-shim" in line or str(tmp_path) in line]
    assert r.returncode == 0 and ours == [], r.stdout + r.stderr


def test_verify_sees_a_directive_swallowed_or_misread(tmp_path):
    """The verify above can fail: a drop-in line systemd misreads is reported."""
    units = _write_units(tmp_path, BASE)
    dropin = tmp_path / f"unicorn-shim@myapp.service.d/{generator.DROPIN}"
    dropin.write_text(dropin.read_text().replace("KillSignal=SIGQUIT", "KillSignal=SIGQUIT\\\nUser=x"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    assert str(dropin) in r.stdout + r.stderr


DUMP = """#!{python}
import json, os, sys
json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}, open({out!r}, "w"))
"""


def test_systemd_runs_exactly_what_the_conf_says(manager, tmp_path):
    """A real manager parses the generated [Service] lines and runs them: the
    arguments, working directory and environment come out as the conf wrote them."""
    app_dir = tmp_path / "my app" / "current%i"
    app_dir.mkdir(parents=True)
    conf = HOSTILE.replace("/srv/my app/current%i", str(app_dir).replace(" ", "\\ "))
    (tmp_path / "app%i.env").write_text("FROM_FILE=yes\n")
    conf = conf.replace("-/etc/app%i.env", str(tmp_path / "app%i.env"))
    out = tmp_path / "dump.json"
    fake = tmp_path / "fake-shim"
    fake.write_text(DUMP.format(python=sys.executable, out=str(out)))
    fake.chmod(0o755)
    service = service_of(conf).replace(generator.SHIM, str(fake))
    lines = [ln for ln in service.splitlines() if not ln.startswith(("User=", "Group="))]   # a user manager
    manager.write_unit("gen.service", "[Service]\nType=oneshot\n" + "\n".join(lines) + "\n")
    r = manager.systemctl("start", "gen.service")
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    shown = manager.systemctl("show", "-p", "TimeoutStartUSec", "gen.service").stdout.strip()
    assert shown == "TimeoutStartUSec=2min 30s", shown      # the derived TimeoutStartSec=150, as systemd read it
    assert got["cwd"] == str(app_dir)
    assert got["argv"] == ["run", "--pid-file", "/run/unicorn-shim/myapp/server.pid", "--chdir", str(app_dir),
                           "--", *HOSTILE_ARGS]
    assert got["env"]["SECRET_KEY_BASE"] == 'a$b ${c}%d"e\\f'
    assert got["env"]["lower_1"] == "x  y"
    assert got["env"]["FROM_FILE"] == "yes"
