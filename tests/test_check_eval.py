"""shim.tooling.config_eval: the server's own code loads the config, within a time limit,
and never starts a server (no hook that runs at boot, no app import)."""
from __future__ import annotations

import os
import time

from shim.tooling.config_eval import evaluate
from shim.runtime.readiness import hook_environment
from shim.runtime.servers import GUNICORN, UNICORN

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", **hook_environment({})}


def test_a_config_that_hangs_is_cut_at_the_timeout(tmp_path):
    (tmp_path / "unicorn.rb").write_text("sleep 600\n")
    t0 = time.monotonic()
    e = evaluate(UNICORN, ["unicorn", "-c", "unicorn.rb"], str(tmp_path), ENV, None, timeout=2)
    assert time.monotonic() - t0 < 10
    assert e.cannot == "the config did not load within 2 s"


def test_unicorn_evaluation_runs_no_boot_hook_and_loads_no_app(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "config.ru").write_text(f'File.write("{marker}-app", "x")\nrun ->(e) {{ [200, {{}}, []] }}\n')
    (tmp_path / "unicorn.rb").write_text(
        f'listen "127.0.0.1:1"\npreload_app true\n'
        f'before_fork {{ |s, w| File.write("{marker}-fork", "x") }}\n'
        f'after_fork {{ |s, w| File.write("{marker}-after", "x") }}\n')
    e = evaluate(UNICORN, ["unicorn", "-c", "unicorn.rb"], str(tmp_path), ENV, None)
    assert e.cannot is None and e.values["listeners"] == ["127.0.0.1:1"] and e.values["preload_app"] is True
    assert not list(tmp_path.glob("ran*"))


def test_gunicorn_evaluation_runs_no_boot_hook_and_imports_no_app(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "app.py").write_text(f'open("{marker}-app", "w").write("x")\ndef application(e, s):\n    pass\n')
    (tmp_path / "gunicorn.conf.py").write_text(
        f'bind = "127.0.0.1:1"\ndef on_starting(server):\n    open("{marker}-start", "w").write("x")\n')
    e = evaluate(GUNICORN, ["gunicorn", "-c", "gunicorn.conf.py", "app:application"], str(tmp_path), ENV, None)
    assert e.cannot is None and e.values["bind"] == ["127.0.0.1:1"]
    assert e.values["hooks"]["on_starting"]["default"] is False
    assert not list(tmp_path.glob("ran*"))
    assert os.path.realpath(e.values["cwd"]) == os.path.realpath(tmp_path)


def test_gunicorn_run_as_a_python_module_is_evaluated_by_that_python(tmp_path):
    (tmp_path / "gunicorn.conf.py").write_text('workers = 3\n')
    e = evaluate(GUNICORN, ["python3", "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:application"],
                 str(tmp_path), ENV, None)
    assert e.cannot is None and e.values["workers"] == 3
