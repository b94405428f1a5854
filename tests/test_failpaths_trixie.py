"""The classic setup's fallback, the dead shim's adoption and gthread's deploys, on systemd 257:
inside a booted Debian 13 container (its own unified cgroup hierarchy, Ruby 3.3,
Unicorn 6.1). The checkout is bind-mounted read-only; pytest runs inside as a
transient unit of the container's systemd and starts a systemd 257 user manager
per test, as the host run does with 252."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from support.containers import Container, image
from support.deploy import REPO

TESTS = ["tests/test_failpaths_classic.py::test_classic_run_script_and_config_deploy_roll_back_and_fall_back",
         # the shim's death: a new shim adopts the master (Puma is not in the Debian 13 test image)
         "tests/test_failpaths_shim.py::test_a_killed_shim_is_adopted_and_the_next_reload_works[unicorn-socket-unit]",
         "tests/test_failpaths_shim.py::test_a_killed_shim_is_adopted_and_the_next_reload_works[unicorn-listen]",
         "tests/test_failpaths_shim.py::test_a_killed_shim_is_adopted_and_the_next_reload_works[gunicorn-socket-unit]",
         "tests/test_failpaths_shim.py::test_a_stop_or_a_restart_never_adopts",
         "tests/test_failpaths_shim.py::test_the_packaged_units_reload_through_the_adopting_shim[socket-unit]",
         "tests/test_failpaths_shim.py::test_a_degraded_classic_service_under_its_own_user_is_adopted_as_it_was",
         # Gunicorn 23's gthread (Debian 12's 20.1 hands a connection to its pool at once)
         "tests/test_failpaths_gthread.py::test_gthread_deploys_under_load_lose_nothing[plain-gunicorn]",
         "tests/test_failpaths_gthread.py::test_gthread_deploys_under_load_lose_nothing[max_requests-gunicorn]"]


class FailContainer(Container):
    """Named fail-…, so that these containers are told apart from other runs' on a shared host."""

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = "fail-" + value


def test_failure_paths_on_debian_13(base_dir):
    ct = FailContainer(image("trixie"), base_dir, binds=[f"{REPO}:/mnt/repo"], unified_cgroup=True)
    try:
        assert ct.run("systemctl", "--version").stdout.startswith("systemd 257")
        r = ct.run("systemd-run", "--wait", "--pipe", "--quiet", "--collect", "--unit=failpath-tests",
                   "-p", "WorkingDirectory=/mnt/repo", "-E", "HOME=/root", "-E", "PYTHONDONTWRITEBYTECODE=1",
                   "/usr/bin/python3", "-m", "pytest", "-p", "no:cacheprovider", "-ra",
                   "--junitxml=/mnt/share/report.xml", *TESTS, timeout=900)
        output = r.stdout[-20000:] + r.stderr[-5000:]
        assert r.returncode == 0, output
        cases = list(ET.parse(os.path.join(ct.share, "report.xml")).getroot().iter("testcase"))
        assert len(cases) == len(TESTS), output
        assert not [c for c in cases for e in c if e.tag in ("failure", "error", "skipped")], output
    finally:
        ct.down()
