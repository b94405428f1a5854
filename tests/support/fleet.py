"""Hosts for the fleet tests (tests/test_deploy_tools.py, tests/test_deploy_user.py):
booted Debian 12 and 13 containers with the package's dependencies, sshd, sudo and
polkitd (with logind, which it needs; a deploy user's two ways to reload one app), reached over real SSH."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from support.containers import HARNESS, IMAGES, Container, image
from test_package import APP_CONF, CONFIG_RU, UNICORN_RB
from test_package import LOAD as LOAD_FOR_SECONDS

# The fleet's images: the package's dependencies (the containers have no network),
# Unicorn, sshd, sudo and polkitd, and logrotate for the packaged logrotate example.
_FLEET_PACKAGES = ("unicorn,ruby-rack,python3-psutil,python3-systemd,python3-sdnotify,procps,curl,python3,"
                   "sudo,openssh-server,libpam-systemd,polkitd,logrotate")
IMAGES.setdefault("bookworm-fleet", ("rootfs-bookworm-fleet-v1", _FLEET_PACKAGES, "bookworm"))
IMAGES.setdefault("trixie-fleet", ("rootfs-trixie-fleet-v1", _FLEET_PACKAGES, "trixie"))


class FleetContainer(Container):
    """A booted container named fleet-…, so that its processes and directories say whose they are."""

    def boot(self) -> None:
        if not self.name.startswith("fleet-"):
            self.name = "fleet-" + self.name[1:]
            self.run_dir = os.path.join(os.path.dirname(self.run_dir), self.name)
            self.share = os.path.join(self.run_dir, "share")
        super().boot()


APP_DIR = "/srv/myapp"
EXAMPLES = "/usr/share/doc/unicorn-shim/examples"
# The package test's app, and its client running until /mnt/share/stop appears.
LOAD = LOAD_FOR_SECONDS.replace("while time.monotonic() < end:",
                                "while time.monotonic() < end and not os.path.exists('/mnt/share/stop'):"
                                ).replace("import http.client,", "import os, http.client,")
assert "/mnt/share/stop" in LOAD and "import os," in LOAD


class Host:
    """One container with the package and the app, reachable over SSH."""

    def __init__(self, ct: Container, name: str) -> None:
        self.ct, self.name = ct, name
        self.proxy = f"{HARNESS}/ct-exec.sh {ct.name} /usr/sbin/sshd -i"

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.ct.run(*cmd, check=check)

    def as_deploy(self, *cmd: str) -> subprocess.CompletedProcess:
        return self.run("runuser", "-u", "deploy", "--", *cmd)

    def status(self) -> dict:
        r = self.run("unicorn-shim", "status", "myapp", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def main_pid(self) -> str:
        return self.run("systemctl", "show", "-p", "MainPID", "--value", "unicorn-shim@myapp.service").stdout.strip()

    def serves(self) -> str:
        """The release that answers (its name, as the app says it)."""
        body = self.run("curl", "-s", "--max-time", "30", "127.0.0.1:8080/").stdout.strip()
        return body.split("=", 1)[1] if body.startswith("release=") else body

    def current(self) -> str:
        return self.run("readlink", "-e", f"{APP_DIR}/current").stdout.strip()

    def release_named(self, name: str) -> str:
        """The directory under releases/ of the release that says `name`."""
        r = self.run("sh", "-c", f"grep -l 'release={name}\\\\n' {APP_DIR}/releases/*/config.ru")
        found = r.stdout.split()
        assert len(found) == 1, (self.name, name, r.stdout, r.stderr)
        return found[0].split("/")[-2]


def set_up(ct: Container, deb_path: str, pubkey: str) -> None:
    """The app `myapp` (its own user) in /srv/myapp, owned by the deploy user
    `deploy`, who logs in with `pubkey`; the package, and the packaged sudoers
    example and polkit rule installed as the README says."""
    def run(*cmd):
        return ct.run(*cmd, check=True)
    # the host knows its own name, as an installed Debian does (sudo looks it up)
    run("sh", "-c", 'echo "127.0.1.1 $(hostname)" >> /etc/hosts')
    run("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "myapp")
    run("useradd", "--create-home", "--shell", "/bin/bash", "deploy")
    d = f"{APP_DIR}/releases/r1"
    run("mkdir", "-p", f"{d}/config", "/etc/unicorn-shim", "/home/deploy/.ssh")
    run("python3", "-c", f"open('{d}/config.ru','w').write({CONFIG_RU % 'r1'!r});"
        f"open('{d}/config/unicorn.rb','w').write({UNICORN_RB!r});"
        f"open('/etc/unicorn-shim/myapp.conf','w').write({APP_CONF!r});"
        f"open('/home/deploy/.ssh/authorized_keys','w').write({pubkey!r})")
    run("sh", "-c", f"ln -sfn {d} {APP_DIR}/current && chown -R deploy:deploy {APP_DIR} /home/deploy/.ssh")
    shutil.copy(deb_path, ct.share)
    run("apt-get", "install", "-y", f"/mnt/share/{os.path.basename(deb_path)}")
    run("sh", "-ec", f"visudo -cf {EXAMPLES}/sudoers-deploy && "
        f"install -m 0440 {EXAMPLES}/sudoers-deploy /etc/sudoers.d/unicorn-shim-myapp && "
        f"install -m 0644 {EXAMPLES}/polkit-deploy.rules /etc/polkit-1/rules.d/50-unicorn-shim-myapp.rules")
    run("systemctl", "enable", "--now", "unicorn-shim@myapp.socket")
    run("curl", "-s", "--max-time", "60", "127.0.0.1:8080/")       # starts the service


@contextlib.contextmanager
def fleet_of(suites: List[str], deb_path: str, work: str) -> Iterator[Tuple[List[Host], str]]:
    """Booted hosts host1, host2, ... of `suites`, set up in parallel; yields them
    and the path of the deploy user's private key."""
    key = os.path.join(work, "id_ecdsa")
    # PEM: net-ssh 7.0 cannot sign with an ECDSA key in OpenSSH's own format under OpenSSL 3
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-m", "PEM", "-N", "", "-f", key], check=True)
    with open(key + ".pub") as f:
        pubkey = f.read()
    cts: List[Optional[Container]] = [None] * len(suites)
    try:
        def boot(i: int) -> None:
            cts[i] = FleetContainer(image(suites[i]), work, unified_cgroup=not suites[i].startswith("bookworm"))
            set_up(cts[i], deb_path, pubkey)
        in_parallel(boot, list(range(len(suites))))
        hs = [Host(ct, f"host{i + 1}") for i, ct in enumerate(cts)]
        for h in hs:
            assert h.serves() == "r1" and h.status()["state"] == "serving", h.name
        yield hs, key
    finally:
        in_parallel(lambda ct: ct.down(), [ct for ct in cts if ct])


def in_parallel(action: Callable[[Any], None], items: List[Any]) -> None:
    """`action` on every item at once; the first error is raised here."""
    errors: List[BaseException] = []

    def act(item: Any) -> None:
        try:
            action(item)
        except BaseException as e:      # noqa: B902 (raised below, in the caller's thread)
            errors.append(e)
    threads = [threading.Thread(target=act, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class LoadOnAll:
    """A client in each host, each asking its own app, for the duration of a `with`."""

    def __init__(self, hs: List[Host]) -> None:
        self.hosts = hs
        self.results: Dict[str, dict] = {}

    def __enter__(self) -> "LoadOnAll":
        for h in self.hosts:
            with open(os.path.join(h.ct.share, "load.py"), "w") as f:
                f.write(LOAD)
            h.run("rm", "-f", "/mnt/share/stop", check=True)
        self.procs = [h.ct.popen("python3", "/mnt/share/load.py", "600") for h in self.hosts]
        time.sleep(1)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hosts:
            open(os.path.join(h.ct.share, "stop"), "w").close()
        for h, p in zip(self.hosts, self.procs):
            self.results[h.name] = json.loads(p.communicate(timeout=60)[0])
