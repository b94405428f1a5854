"""shim.tooling.config_eval: the server's own code loads the config, as the unit's user
only, within a time limit, and never starts a server (no hook that runs at boot, no app import)."""
from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import time

import pytest

from check_fixtures import world_readable_dir
from shim.tooling.config_eval import RunAs, evaluate
from shim.runtime.readiness import hook_environment
from shim.runtime.servers import GUNICORN, UNICORN

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", **hook_environment({})}
_nobody = pwd.getpwnam("nobody")
NOBODY = RunAs("nobody", _nobody.pw_uid, _nobody.pw_gid, os.getgrouplist("nobody", _nobody.pw_gid))


@pytest.fixture
def tmp_path():
    """A directory the unit's user (nobody) can read: pytest's own is root's alone."""
    d = world_readable_dir()
    yield pathlib.Path(d)
    shutil.rmtree(d)


def test_a_config_that_hangs_is_cut_at_the_timeout(tmp_path):
    (tmp_path / "unicorn.rb").write_text("sleep 600\n")
    t0 = time.monotonic()
    e = evaluate(UNICORN, ["unicorn", "-c", "unicorn.rb"], str(tmp_path), ENV, NOBODY, timeout=2)
    assert time.monotonic() - t0 < 10
    assert e.cannot == "the config did not load within 2 s"


def test_unicorn_evaluation_runs_no_boot_hook_and_loads_no_app(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "config.ru").write_text(f'File.write("{marker}-app", "x")\nrun ->(e) {{ [200, {{}}, []] }}\n')
    (tmp_path / "unicorn.rb").write_text(
        f'listen "127.0.0.1:1"\npreload_app true\n'
        f'before_fork {{ |s, w| File.write("{marker}-fork", "x") }}\n'
        f'after_fork {{ |s, w| File.write("{marker}-after", "x") }}\n')
    e = evaluate(UNICORN, ["unicorn", "-c", "unicorn.rb"], str(tmp_path), ENV, NOBODY)
    assert e.cannot is None and e.values["listeners"] == ["127.0.0.1:1"] and e.values["preload_app"] is True
    assert not list(tmp_path.glob("ran*"))


def test_gunicorn_evaluation_runs_no_boot_hook_and_imports_no_app(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "app.py").write_text(f'open("{marker}-app", "w").write("x")\ndef application(e, s):\n    pass\n')
    (tmp_path / "gunicorn.conf.py").write_text(
        f'bind = "127.0.0.1:1"\ndef on_starting(server):\n    open("{marker}-start", "w").write("x")\n')
    e = evaluate(GUNICORN, ["gunicorn", "-c", "gunicorn.conf.py", "app:application"], str(tmp_path), ENV, NOBODY)
    assert e.cannot is None and e.values["bind"] == ["127.0.0.1:1"]
    assert e.values["hooks"]["on_starting"]["default"] is False
    assert not list(tmp_path.glob("ran*"))
    assert os.path.realpath(e.values["cwd"]) == os.path.realpath(tmp_path)


def test_gunicorn_run_as_a_python_module_is_evaluated_by_that_python(tmp_path):
    (tmp_path / "gunicorn.conf.py").write_text('workers = 3\n')
    e = evaluate(GUNICORN, ["python3", "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:application"],
                 str(tmp_path), ENV, NOBODY)
    assert e.cannot is None and e.values["workers"] == 3


def test_a_caller_who_cannot_become_the_units_user_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    os.chmod(tmp_path, 0o1777)      # the config may write here, whoever runs it
    (tmp_path / "unicorn.rb").write_text(f'File.write("{marker}", Process.uid.to_s)\n')
    root = RunAs("root", 0, 0, [0])
    pid = os.fork()
    if pid == 0:     # a non-root caller (nobody) checking a unit whose user is root
        os.setgid(_nobody.pw_gid)
        os.setuid(_nobody.pw_uid)
        e = evaluate(UNICORN, ["unicorn", "-c", "unicorn.rb"], str(tmp_path), ENV, root)
        os._exit(0 if e.cannot and e.cannot.startswith("not evaluated: this check runs as uid") else 3)
    assert os.waitpid(pid, 0)[1] == 0
    assert not marker.exists()
    e = evaluate(UNICORN, ["unicorn", "-c", "unicorn.rb"], str(tmp_path), ENV, NOBODY)
    assert e.cannot is None and marker.read_text() == str(_nobody.pw_uid)
