"""A deploy that did not take effect is a failed deploy; the configs real shops
run deploy every release; a master only ever serves files of its own release.

Real systemd (a private user manager), real Unicorn and Bundler from Debian's
packages, a Capistrano layout, a non-root User=, load running."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from support.classic import USER, ClassicDeployment, classic  # noqa: F401 (a fixture)
from support.load import Load, get
from support.systemd import proc_cmdline


def owner(pid: int) -> str:
    return subprocess.run(["ps", "-o", "user=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()


def deploy_and_check(d: ClassicDeployment, load: Load) -> str:
    name = d.release()
    r = d.reload()
    assert r.returncode == 0, r.stderr + d.journal_text()[-3000:]
    t = time.monotonic()
    assert get(d.port, timeout=5).release == name
    assert d.unix_get().startswith(f"release={name} ")
    time.sleep(0.2)
    assert load.releases_since(t + 0.05) == {name}
    return name


def test_classic_config_with_bundler_deploys_every_release(classic, manager):
    """The guide's config, `bundle exec`, relative -c, User= non-root, default settings (but a short probation):
    10 deploys under load, each answers the new release."""
    # 10 reloads in a row: a 1 s probation (the standby still taken each time; the default 5 s
    # would add 40 s to this test alone, see the README's "Tests")
    d = classic(shim_args="--probation 1")
    d.start()
    main = manager.main_pid()
    assert owner(main) == USER and "unicorn master" in proc_cmdline(main)
    with Load(d.port) as load:
        for _ in range(10):
            deploy_and_check(d, load)
    assert load.failures() == [], load.failure_kinds()
    assert manager.events("reload-failed") == []
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert owner(manager.main_pid()) == USER


@pytest.mark.parametrize("variant", [
    dict(absolute_config=True),
    dict(preload=False),
    dict(bundler=False),
    dict(shim_args="--upgrade usr2"),                      # with the guide's before_exec
    dict(shim_args="--upgrade usr2", absolute_config=True),
], ids=["absolute-c", "preload-false", "no-bundler", "usr2", "usr2-absolute-c"])
def test_classic_config_variants_deploy(classic, manager, variant):
    d = classic(**variant)
    d.start()
    with Load(d.port) as load:
        for _ in range(3):
            deploy_and_check(d, load)
    assert load.failures() == [], load.failure_kinds()


def test_release_pinned_by_bundler_under_usr2_is_a_failed_deploy(classic, manager):
    """Unicorn's own re-exec keeps the first master's BUNDLE_GEMFILE when the config
    does not reset it: each reload fails within seconds with the reason, the old
    release serves, nothing fails; a broken release after it fails too."""
    d = classic(shim_args="--upgrade usr2", before_exec=False)
    d.start()
    with Load(d.port) as load:
        for _ in range(3):
            d.release()
            t0 = time.monotonic()
            r = d.reload()
            assert r.returncode != 0
            assert time.monotonic() - t0 < 20
            assert "BUNDLE_GEMFILE" in r.stderr or "BUNDLE_GEMFILE" in d.journal_text()[-3000:]
        failed = manager.wait_events("reload-failed", 3)
        assert len(failed) == 3 and all("BUNDLE_GEMFILE" in f["REASON"] for f in failed)
        assert "releases/r1/Gemfile" in failed[-1]["REASON"]
        d.release(broken=True)
        r = d.reload()
        assert r.returncode != 0
    assert load.failures() == [], load.failure_kinds()
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    # whatever answers is what was serving before the first pinned deploy
    assert len(manager.events("reload-done")) == 0


def test_master_serves_only_its_own_release_after_a_rejected_deploy(classic, manager):
    """After a rejected deploy `current` names the bad release; the old master's
    later file loads still come from its own."""
    d = classic()
    d.start()
    good = deploy_and_check_quiet(d)
    bad = d.release(broken=True)
    assert d.reload().returncode != 0
    assert os.path.realpath(d.current).endswith(bad)
    assert get(d.port).release == good
    out = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{d.port}/lazy"], capture_output=True, text=True).stdout
    assert out.strip() == f"code={good} lazy={good}", out


def deploy_and_check_quiet(d: ClassicDeployment) -> str:
    name = d.release()
    r = d.reload()
    assert r.returncode == 0, r.stderr
    return name


LAZY_APP_PY = """\
import os
NAME = "{name}"
HERE = os.path.dirname(os.path.abspath(__file__))


def application(environ, start_response):
    if environ.get("PATH_INFO") == "/lazy":
        import lazymod                   # imported at request time, through sys.path
        with open(os.path.join(HERE, "templates", "page.txt")) as f:
            template = f.read().strip()
        body = "code=%s lazymod=%s template=%s\\n" % (NAME, lazymod.NAME, template)
    else:
        body = "release=%s pid=%d\\n" % (NAME, os.getpid())
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
"""


def lazy_gunicorn_release(app, broken: bool = False) -> str:
    name = app.release(broken=broken)
    d = os.path.join(app.root, "releases", name)
    text = LAZY_APP_PY.format(name=name)
    if broken:
        text = 'raise RuntimeError("broken")\n' + text
    with open(os.path.join(d, "app.py"), "w") as f:
        f.write(text)
    with open(os.path.join(d, "lazymod.py"), "w") as f:
        f.write(f'NAME = "{name}"\n')
    os.makedirs(os.path.join(d, "templates"))
    with open(os.path.join(d, "templates", "page.txt"), "w") as f:
        f.write(name + "\n")
    return name


def test_gunicorn_master_loads_lazy_code_and_templates_from_its_own_release(manager, tmp_path):
    """Gunicorn puts $PWD on sys.path: with PWD naming `current`, a master's lazily
    imported modules and templates came from whatever release `current` named later."""
    from support.deploy import Deployment
    d = Deployment(manager, str(tmp_path), server="gunicorn", preload=False)
    lazy_gunicorn_release(d.app)
    d.start()
    try:
        good = lazy_gunicorn_release(d.app)
        assert d.reload().returncode == 0
        lazy_gunicorn_release(d.app, broken=True)        # rejected: current now names it
        assert d.reload().returncode != 0
        for _ in range(4):                               # every worker, not just one
            out = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{d.port}/lazy"],
                                 capture_output=True, text=True).stdout.strip()
            assert out == f"code={good} lazymod={good} template={good}", out
    finally:
        d.stop()


def test_the_classic_config_without_listen_falls_back_to_the_last_good_release(classic):
    """The migration guide's config: the classic one with its `listen` line removed. After a
    rejected deploy a restart boots the last good release, read through that release, and it
    serves the socket the shim holds (with `listen APP_PATH + ...` it would name another path)."""
    d = classic(listen=False)
    d.shim_args = f"--state-dir {d.root}/shared"
    d.start()
    good = d.release()
    assert d.reload().returncode == 0, d.journal_text()[-3000:]
    bad = d.release(broken=True)
    assert d.reload().returncode != 0
    r = d.m.systemctl("restart", "app.service")
    assert r.returncode == 0, r.stderr + d.journal_text()[-3000:]
    assert f"release={good}" in d.unix_get(), d.journal_text()[-3000:]
    st = d.state()
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert st["StatusText"].startswith("degraded: serving last good release") and bad in st["StatusText"], st

