"""Why a deploy failed, in the server's own words: the exception or the server's
error line reaches the reload-failed event (a field of its own, priority err),
STATUS= (so `systemctl status` shows it), `unicorn-shim reload`'s stderr and
`unicorn-shim status`. The shim reads no journal for it, so it works under a
non-root User= too. Real systemd, real Unicorn, Gunicorn and Bundler."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from support.classic import ClassicDeployment
from support.deploy import SHIM
from support.load import Load, get
from support.systemd import eventually


def failed_reload(d, manager, **release_kw):
    good = f"r{d.app.count}"
    d.app.release(**release_kw)
    before = len(manager.events("reload-failed"))
    r = d.reload()
    assert r.returncode != 0
    event = manager.wait_events("reload-failed", before + 1)[-1]
    assert get(d.port, timeout=5).release == good
    return event


def assert_reason_everywhere(d, manager, event, text):
    assert text in event["SERVER_ERROR"], event
    assert text in event["REASON"] and text in event["MESSAGE"]
    assert event["PRIORITY"] == "3" and event["SYSLOG_IDENTIFIER"] == "unicorn-shim"
    # the ExecReload= process's own line too, not under the app's SyslogIdentifier=
    client_lines = [e for e in eventually(lambda: manager.journal("SYSLOG_IDENTIFIER=unicorn-shim"),
                                          lambda es: any(str(e.get("MESSAGE", "")).startswith(
                                              "unicorn-shim: reload failed") for e in es))
                    if str(e.get("MESSAGE", "")).startswith("unicorn-shim: reload failed")]
    assert client_lines and client_lines[-1]["PRIORITY"] == "3" and text in client_lines[-1]["MESSAGE"]
    assert not [e for e in manager.journal("SYSLOG_IDENTIFIER=app")
                if "reload failed" in str(e.get("MESSAGE", ""))]
    assert text in eventually(d.state, lambda st: text in st["StatusText"])["StatusText"]
    status = subprocess.run([SHIM, "status", "--json", "--control",
                             os.path.join(manager.runtime_dir, "app", "control.sock")],
                            capture_output=True, text=True)
    assert text in json.loads(status.stdout)["last_reload"]
    direct = subprocess.run([SHIM, "reload", "--control", os.path.join(manager.runtime_dir, "app", "control.sock")],
                            capture_output=True, text=True)
    assert direct.returncode == 10 and text in direct.stderr, direct.stderr


@pytest.mark.parametrize("preload", [True, False])
def test_exception_in_the_app_is_the_reason(deploy, manager, server, preload):
    d = deploy(preload=preload)
    d.start()
    with Load(d.port) as load:
        event = failed_reload(d, manager, broken=True)
    assert load.failures() == [], load.failure_kinds()
    name = f"r{d.app.count}"
    assert f"release {name} is broken" in event["SERVER_ERROR"], event
    if server in ("unicorn", "puma"):     # where it was raised, as Ruby says it
        assert "config.ru:" in event["SERVER_ERROR"], event
    elif not preload:             # the worker's traceback; with --preload Gunicorn prints "Error: ..."
        assert "app.py:4" in event["SERVER_ERROR"], event
    assert_reason_everywhere(d, manager, event, f"release {name} is broken")


def test_syntax_error_in_the_unicorn_config_is_the_reason(unicorn_deploy, manager):
    d = unicorn_deploy()
    d.start()
    event = failed_reload(d, manager, extra="worker_processes 2 +")
    assert "config/unicorn.rb" in event["SERVER_ERROR"] and "syntax error" in event["SERVER_ERROR"], event
    assert_reason_everywhere(d, manager, event, "syntax error")


def test_bind_error_is_the_reason(unicorn_deploy, manager):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        d = unicorn_deploy()
        d.start()
        event = failed_reload(d, manager, extra=f'listen "127.0.0.1:{port}", :tries => 1')
    finally:
        taken.close()
    assert "Address already in use" in event["SERVER_ERROR"] or "in use" in event["SERVER_ERROR"], event


def test_missing_gem_is_the_reason_under_a_non_root_user(manager):
    """Bundler's own message, from a non-root User= unit that cannot read the journal."""
    d = ClassicDeployment(manager)
    try:
        d.start()
        d.release()
        gemfile = os.path.join(d.current, "Gemfile")
        with open(gemfile, "a") as f:
            f.write('gem "no-such-gem-here"\n')
        r = d.reload()
        assert r.returncode != 0
        event = manager.wait_events("reload-failed")[-1]
        assert "no-such-gem-here" in event["SERVER_ERROR"], event
        assert "no-such-gem-here" in eventually(d.state, lambda st: "no-such-gem-here" in st["StatusText"])[
            "StatusText"]
    finally:
        d.stop()
