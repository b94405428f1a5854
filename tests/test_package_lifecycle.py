"""The package around the app's life, in a booted Debian 12 with the .deb: Debian's
own unicorn.service turned off as the README says, the shipped logrotate example
(with the app running, stopped, and after a purge), the purge itself; and the .deb
built from the checkout in a clean build root that holds only build-essential and
the Build-Depends, offline, with debian/rules' own tests."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time

from support import buildroot
from support.deploy import REPO
from support.fleet import EXAMPLES, FleetContainer, set_up
from support.containers import image

README = os.path.join(REPO, "README.md")


def readme_command(marker: str) -> str:
    """The README's indented command line that contains `marker`, run as root (no sudo)."""
    lines = [ln.strip() for ln in open(README) if ln.startswith("    ") and marker in ln]
    assert len(lines) == 1, (marker, lines)
    return lines[0].replace("sudo ", "")


def test_unicorn_service_logrotate_and_purge(deb, base_dir):
    work = tempfile.mkdtemp(prefix="fleet-lifecycle.", dir=base_dir)
    ct = FleetContainer(image("bookworm-fleet"), work)
    try:
        def run(*cmd, check=False):
            return ct.run(*cmd, check=check)

        # Debian's unicorn.service, enabled as its package leaves it, fails without its config
        run("systemctl", "enable", "--now", "unicorn.service")
        deadline = time.monotonic() + 60
        while run("systemctl", "is-failed", "unicorn.service").stdout.strip() != "failed" and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert run("systemctl", "is-failed", "unicorn.service").stdout.strip() == "failed"
        assert run("systemctl", "is-system-running").stdout.strip() == "degraded"
        run("sh", "-ec", readme_command("systemctl disable --now unicorn.service"), check=True)
        assert run("systemctl", "is-enabled", "unicorn.service").stdout.strip() == "disabled"

        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", os.path.join(work, "key")], check=True)
        set_up(ct, deb, open(os.path.join(work, "key.pub")).read())
        assert run("test", "-f", "/var/lib/unicorn-shim/myapp/state.json").returncode == 0

        # the shipped logrotate example, for an app whose Unicorn writes its own log
        run("sh", "-ec", f"install -m 0644 {EXAMPLES}/logrotate-app /etc/logrotate.d/myapp && "
            "mkdir -p /srv/myapp/shared/log && echo line > /srv/myapp/shared/log/unicorn.log", check=True)
        r = run("logrotate", "-f", "/etc/logrotate.d/myapp")
        assert r.returncode == 0, r.stderr
        assert run("test", "-f", "/srv/myapp/shared/log/unicorn.log.1").returncode == 0
        run("journalctl", "--sync")
        assert "reopening logs" in run("journalctl", "-u", "unicorn-shim@myapp", "--no-pager").stdout

        def rotate() -> None:
            run("sh", "-c", "echo line >> /srv/myapp/shared/log/unicorn.log")
            r = run("logrotate", "-f", "/etc/logrotate.d/myapp")
            assert r.returncode == 0, r.stderr
        run("systemctl", "stop", "unicorn-shim@myapp.socket", "unicorn-shim@myapp.service", check=True)
        rotate()                        # the app stopped
        r = run("apt-get", "purge", "-y", "unicorn-shim")
        assert r.returncode == 0, r.stderr
        rotate()                        # the package purged
        assert run("test", "-e", "/var/lib/unicorn-shim").returncode != 0, "purge leaves no state behind"
        r = run("logrotate", "/etc/logrotate.conf")          # what the nightly timer runs
        assert r.returncode == 0, r.stderr
        r = run("systemctl", "start", "logrotate.service")
        assert r.returncode == 0, r.stderr + run("journalctl", "-u", "logrotate", "--no-pager").stdout[-2000:]
        failed = run("systemctl", "list-units", "--failed", "--plain", "--no-legend").stdout
        assert failed.strip() == "" and run("systemctl", "is-system-running").stdout.strip() == "running", failed
    finally:
        ct.down()


def test_deb_builds_in_a_clean_build_root(base_dir):
    """dpkg-buildpackage in a root with only build-essential and the Build-Depends,
    no network: dpkg-checkbuilddeps passes, debian/rules' tests pass, the .deb holds
    the shim."""
    work = tempfile.mkdtemp(prefix="fleet-build.", dir=base_dir)
    r = buildroot.build(buildroot.root(), work)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert re.search(r"\d+ passed", r.stdout), r.stdout[-3000:]
    debs = [f for f in os.listdir(work) if f.endswith("_all.deb")]
    assert len(debs) == 1, os.listdir(work)
    files = subprocess.run(["dpkg-deb", "-c", os.path.join(work, debs[0])], capture_output=True, text=True).stdout
    assert "./usr/bin/unicorn-shim" in files and "/examples/polkit-deploy.rules" in files, files
