"""Fixtures: a real systemd user manager per test, sample apps, the shim's units."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from support.deploy import REPO, Deployment
from support.systemd import UserManager


@pytest.fixture(scope="session")
def base_dir():
    d = tempfile.mkdtemp(prefix="unicorn-shim-tests.")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def manager(base_dir):
    m = UserManager(base_dir)
    yield m
    m.down()


def _deployments(manager, tmp_path, server):
    made = []

    def make(**kw) -> Deployment:
        d = Deployment(manager, str(tmp_path), server=server, **kw)
        made.append(d)
        return d
    return made, make


@pytest.fixture(params=["unicorn", "gunicorn", "puma"])
def server(request):
    return request.param


@pytest.fixture
def deploy(manager, tmp_path, server):
    """Makes Deployments of the test's server: every test using it runs for each server."""
    made, make = _deployments(manager, tmp_path, server)
    yield make
    for d in made:
        d.stop()


@pytest.fixture
def unicorn_deploy(manager, tmp_path):
    """For what only Unicorn has: its own USR2, -l, UNICORN_FD, the common before_fork hook."""
    made, make = _deployments(manager, tmp_path, "unicorn")
    yield make
    for d in made:
        d.stop()


@pytest.fixture(scope="session")
def deb():
    """The .deb, built (and lintian-checked) once per session for every test that installs it."""
    r = subprocess.run([os.path.join(REPO, "packaging", "build-deb")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    debs = sorted(f for f in os.listdir(os.path.join(REPO, "dist")) if f.endswith(".deb"))
    lint = subprocess.run(["lintian", os.path.join(REPO, "dist", debs[-1])], capture_output=True, text=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert lint.returncode == 0 and not [ln for ln in lint.stdout.splitlines() if ln[:2] in ("E:", "W:")], \
        lint.stdout
    return os.path.join(REPO, "dist", debs[-1])
