"""Fixtures: a real systemd user manager per test, sample apps, the shim's units."""
from __future__ import annotations

import shutil
import tempfile

import pytest

from support.deploy import Deployment
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
