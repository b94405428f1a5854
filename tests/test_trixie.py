"""The integration tests that depend on systemd's behaviour, run again against
systemd 257: inside a booted Debian 13 ("trixie") container, with its own
unified cgroup hierarchy, Python 3.13, Unicorn 6.1 and Gunicorn 23.

The checkout is bind-mounted read-only; pytest runs inside as a transient unit of
the container's systemd (so its processes sit in the container's cgroups, as on a
real machine) and starts a systemd 257 user manager per test, exactly as the host
run does with 252. The package on 257 as PID 1 is tests/test_package.py."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from support.containers import Container, image
from support.deploy import REPO

# Boot, READY, MainPID, crash, stop; good, bad and back-to-back reloads; kill -9 of
# the master, old master and shim in steady state and mid hand-over; STOP with the
# watchdog; TimeoutStartSec= read and kept, a stop in each phase of a hand-over;
# the unit tests (pid trust reads this container's cgroups).
SELECTION = {
    "tests/test_core.py": ["test_start_returns_only_when_serving", "test_master_gets_sockets",
                           "test_master_crash_is_seen_by_systemd_and_restarted",
                           "test_stop_is_graceful_and_leaves_nothing", "test_start_fails_when_master_dies"],
    "tests/test_reload.py": ["test_twenty_reloads_under_load_lose_nothing", "test_rollback_when_new_master_dies",
                             "test_back_to_back_reloads_both_run"],
    "tests/test_faults.py": ["test_kill9_new_master_while_it_boots", "test_kill9_old_master_in_the_middle",
                             "test_kill9_shim_in_steady_state", "test_kill9_shim_in_the_middle",
                             "test_watchdog_restarts_a_hung_master"],
    "tests/test_shim_exit.py": [],
    # issue 22 on 257: a reload's deadline read from systemd, a stop in every phase, the barrier
    "tests/test_jobtimeout.py": [],
    "tests/test_stop_phases.py": [],
    "tests/test_platform.py": [],
    "tests/test_units.py": [],
}
INNER_TIMEOUT = 1200


def test_systemd_257_behaves_as_the_tests_require(base_dir):
    ct = Container(image("trixie"), base_dir, binds=[f"{REPO}:/mnt/repo"], unified_cgroup=True)
    try:
        version = ct.run("systemctl", "--version").stdout.split("\n")[0]
        assert version.startswith("systemd 257"), version
        # -k: the chosen tests by name, and every test of a module chosen whole (by its name)
        keyword = " or ".join([n for names in SELECTION.values() for n in names] +
                              [m.rsplit("/", 1)[1][:-3] for m, names in SELECTION.items() if not names])
        # Unicorn and Gunicorn (the image has no Puma: its systemd behaviour is the same shim's)
        keyword = f"({keyword}) and not puma"
        r = ct.run("systemd-run", "--wait", "--pipe", "--quiet", "--collect", "--unit=shim-tests",
                   "-p", "WorkingDirectory=/mnt/repo", "-E", "HOME=/root", "-E", "PYTHONDONTWRITEBYTECODE=1",
                   "/usr/bin/python3", "-m", "pytest", "-p", "no:cacheprovider", "-ra",
                   "--junitxml=/mnt/share/report.xml", "-k", keyword, *SELECTION, timeout=INNER_TIMEOUT)
        output = r.stdout[-20000:] + r.stderr[-5000:]
        assert r.returncode == 0, output
        cases = ET.parse(os.path.join(ct.share, "report.xml")).getroot().iter("testcase")
        ran = {f"{c.get('classname')}.{c.get('name')}": [e.tag for e in c if e.tag in ("failure", "error", "skipped")]
               for c in cases}
        assert not [name for name, outcome in ran.items() if outcome], output
        for module, names in SELECTION.items():
            stem = "tests." + module.rsplit("/", 1)[1][:-3]
            for name in names:        # each chosen test ran, for Unicorn and for Gunicorn
                ids = [t for t in ran if t.startswith(f"{stem}.{name}")]
                assert [t for t in ids if "[unicorn" in t] and [t for t in ids if "[gunicorn" in t], (name, sorted(ran))
            assert [t for t in ran if t.startswith(stem + ".")], (module, sorted(ran))
    finally:
        ct.down()
