"""A clean Debian 12 build root for the package: debootstrap's minbase with
build-essential and exactly the Build-Depends of debian/control, nothing else
(and the boot bits the image builder always adds: systemd, systemd-sysv, dbus).

Built once per machine from the mirror the host's apt uses and cached beside
the containers' images (tests/support/containers.py), under a name that holds a
hash of the Build-Depends: a change to them builds a new root. Each build runs
on an overlay of it, in a private mount and network namespace, so the cached
root stays clean and the build has no network."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile

from support.containers import IMAGES, image
from support.deploy import REPO


def build_depends(control: str) -> list:
    """The package names of the Build-Depends field (versions and profiles dropped;
    debhelper-compat is debhelper's)."""
    field = re.search(r"^Build-Depends:(.*?)^(?=\S)", control, re.M | re.S).group(1)
    names = [re.split(r"[\s(<\[]", dep.strip(), maxsplit=1)[0] for dep in field.split(",") if dep.strip()]
    return ["debhelper" if n == "debhelper-compat" else n for n in names]


def root() -> str:
    """The cached build root for the current debian/control, built first if missing."""
    with open(os.path.join(REPO, "debian", "control")) as f:
        deps = ["build-essential"] + build_depends(f.read())
    key = hashlib.sha256(",".join(deps).encode()).hexdigest()[:10]
    IMAGES.setdefault("bookworm-build", (f"rootfs-bookworm-build-{key}", ",".join(deps), "bookworm"))
    return image("bookworm-build")


def build(rootfs: str, work: str) -> subprocess.CompletedProcess:
    """Builds the checkout's .deb in an overlay of `rootfs`, offline, as dpkg-buildpackage
    with its checks: dpkg-checkbuilddeps, then debian/rules with its tests. The .deb
    lands in `work`. The root gets the /etc/hosts every build chroot has (localhost)."""
    layers = tempfile.mkdtemp(prefix="build.", dir=work)
    for d in ("upper", "work", "merged", "out"):
        os.mkdir(os.path.join(layers, d))
    src = os.path.join(layers, "upper", "build", "src")
    os.makedirs(src)
    subprocess.run(f"tar --exclude=./dist --exclude=./.git -cf - . | tar -xf - -C {src}", shell=True,
                   check=True, cwd=REPO)
    script = f"""set -e
mount -t overlay overlay -o lowerdir={rootfs},upperdir={layers}/upper,workdir={layers}/work {layers}/merged
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > {layers}/merged/etc/hosts
mount -t proc proc {layers}/merged/proc
mount --rbind /dev {layers}/merged/dev
chroot {layers}/merged /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/build LANG=C.UTF-8 \
    sh -ec 'cd /build/src && date +%s.%N && dpkg-checkbuilddeps && dpkg-buildpackage -us -uc -b && date +%s.%N'
cp {layers}/merged/build/*.deb {layers}/out/
"""
    r = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 0:
        for f in os.listdir(os.path.join(layers, "out")):
            shutil.move(os.path.join(layers, "out", f), work)
    subprocess.run(["rm", "-rf", "--one-file-system", layers])
    return r
