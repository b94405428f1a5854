"""Booted Debian containers (systemd-nspawn --boot: systemd is PID 1 inside) for
the tests that need a whole system: the package, and systemd versions other than
the host's (Debian 13 / systemd 257).

Images are debootstrapped by tests/harness/container-build.sh, from the mirror
the host's apt uses, once per machine: they are cached under
UNICORN_SHIM_IMAGE_CACHE (default /var/cache/unicorn-shim-tests). Each boot runs
on a tmpfs overlay of the image, so the image stays pristine."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from typing import Dict, List, Optional

HARNESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harness")
CACHE = os.environ.get("UNICORN_SHIM_IMAGE_CACHE", "/var/cache/unicorn-shim-tests")

# What each image holds besides a booting systemd: the package's dependencies (the
# containers have no network) and, for Debian 13, what the integration tests need
# to run inside it. A new list needs a new name: the cache is keyed by it. A third
# item names the Debian suite when the key is not one.
IMAGES: Dict[str, tuple] = {
    "bookworm": ("rootfs-bookworm-v3-sshd",
                 "unicorn,ruby-rack,python3-psutil,python3-systemd,python3-sdnotify,procps,curl,python3,sudo,"
                 "openssh-server"),
    "trixie": ("rootfs-trixie-v1",
               "unicorn,ruby-rack,gunicorn,python3,python3-pytest,python3-psutil,python3-systemd,"
               "python3-sdnotify,procps,curl,util-linux"),
    # tests/test_reporters.py: Debian 13's own Bundler (2.6, the `bundler` package), whose
    # `bundle exec` has RubyGems require bundler/setup ($BUNDLER_SETUP) at interpreter start.
    "trixie-bundler": ("rootfs-trixie-bundler-v1",
                       "unicorn,ruby-rack,gunicorn,python3,python3-pytest,python3-psutil,python3-systemd,"
                       "python3-sdnotify,procps,curl,util-linux,bundler", "trixie"),
    # tests/test_migration.py: the supervisors an app is moved away from (runit,
    # Gunicorn in a venv per release, Puma with its own systemd notify plugin,
    # Unicorn under Bundler) and the web server in front (nginx).
    "bookworm-migrate": ("rootfs-bookworm-migrate-v4",
                         "unicorn,ruby-rack,python3-psutil,python3-systemd,python3-sdnotify,procps,curl,python3,"
                         "sudo,runit,runit-run,nginx-light,gunicorn,python3-venv,puma,ruby-sd-notify,bundler",
                         "bookworm"),
}


def image(suite: str) -> str:
    """The cached root file system of `suite`, built first if missing (one builder
    at a time per machine; a half-built image is never used)."""
    name, packages, *release = IMAGES[suite]
    rootfs = os.path.join(CACHE, name)
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(rootfs, "usr", "bin", "unicorn")):
            building = rootfs + ".build"
            shutil.rmtree(building, ignore_errors=True)
            shutil.rmtree(rootfs, ignore_errors=True)
            r = subprocess.run([os.path.join(HARNESS, "container-build.sh"), building, packages],
                               capture_output=True, text=True,
                               env=dict(os.environ, SUITE=(release or [suite])[0], CACHE=os.path.join(CACHE, "debs")))
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            os.rename(building, rootfs)
    return rootfs


class Container:
    """One booted container of an image; `run` executes a command inside it."""

    def __init__(self, rootfs: str, base_dir: str, binds: Optional[List[str]] = None,
                 unified_cgroup: bool = False, volatile: str = "overlay", prefix: str = "c") -> None:
        self.name = prefix + uuid.uuid4().hex[:8]
        self.rootfs = rootfs
        self.env = dict(os.environ, SDH_BASE=base_dir, SDH_VOLATILE=volatile, SDH_NSPAWN_ARGS=" ".join(
            ["--private-network"] + [f"--bind-ro={b}" for b in binds or []]))
        if unified_cgroup:      # what Debian 13's systemd expects; the host may be hybrid
            self.env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        self.run_dir = os.path.join(base_dir, "ct", "run", self.name)
        self.share = os.path.join(self.run_dir, "share")   # /mnt/share inside
        self.boot()

    def boot(self) -> None:
        r = subprocess.run([os.path.join(HARNESS, "container-boot.sh"), self.name, self.rootfs],
                           capture_output=True, text=True, env=self.env)
        assert r.returncode == 0, r.stdout + r.stderr

    def run(self, *cmd: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
        p = subprocess.run([os.path.join(HARNESS, "ct-exec.sh"), self.name, *cmd], capture_output=True,
                           text=True, env=self.env, timeout=timeout)
        assert not check or p.returncode == 0, (cmd, p.stdout, p.stderr)
        return p

    def popen(self, *cmd: str) -> subprocess.Popen:
        return subprocess.Popen([os.path.join(HARNESS, "ct-exec.sh"), self.name, *cmd], stdout=subprocess.PIPE,
                                text=True, env=self.env)

    def down(self) -> None:
        subprocess.run([os.path.join(HARNESS, "container-down.sh"), self.name], env=self.env, capture_output=True)


class RebootableContainer(Container):
    """A booted container whose root file system survives a reboot, as a machine's
    disk does: an overlay of the image whose upper directory is on disk (instead of
    nspawn's tmpfs overlay, gone with each boot), booted with --volatile=no.
    `reboot()` runs `systemctl reboot` inside, which ends this systemd-nspawn as a
    reboot ends a machine's run, and boots the same root file system again."""

    def __init__(self, rootfs: str, base_dir: str, **kwargs) -> None:
        self.layers = tempfile.mkdtemp(prefix="rootfs.", dir=base_dir)
        merged, upper, work = (os.path.join(self.layers, d) for d in ("merged", "upper", "work"))
        for d in (merged, upper, work):
            os.mkdir(d)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={rootfs},upperdir={upper},workdir={work}", merged], check=True)
        try:
            super().__init__(merged, base_dir, volatile="no", **kwargs)
        except BaseException:
            self._unmount()
            raise

    def reboot(self, timeout: float = 60) -> None:
        with open(os.path.join(self.run_dir, "nspawn.pid")) as f:
            nspawn = f.read().strip()
        self.run("systemctl", "reboot", check=True)
        deadline = time.monotonic() + timeout
        while _alive(nspawn) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(nspawn), "the container did not go down for the reboot"
        subprocess.run([os.path.join(HARNESS, "container-down.sh"), self.name], env=self.env,
                       capture_output=True)      # its cgroups and run directory; the root file system stays
        self.boot()

    def down(self) -> None:
        super().down()
        self._unmount()

    def _unmount(self) -> None:
        subprocess.run(["umount", os.path.join(self.layers, "merged")], capture_output=True)
        shutil.rmtree(self.layers, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
