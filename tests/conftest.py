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


@pytest.fixture
def deploy(manager, tmp_path):
    made = []

    def make(**kw) -> Deployment:
        d = Deployment(manager, str(tmp_path), **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.stop()
