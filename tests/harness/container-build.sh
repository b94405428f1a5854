#!/bin/bash
# Build a bootable Debian rootfs for systemd-nspawn --boot.
#   usage: [SUITE=trixie] container-build.sh ROOTFS [EXTRA_PKGS_COMMA_LIST]   (SUITE: bookworm by default)
#   e.g.   container-build.sh $SDH_BASE/ct/rootfs
#          container-build.sh $SDH_BASE/ct/rootfs-full unicorn,python3-psutil,python3-systemd,python3-sdnotify
# Mirror = the first Debian URI that apt on this host uses (deb822 .sources or
# sources.list); override with MIRROR=. Packages are cached in $CACHE.
set -eu
SUITE=${SUITE:-bookworm}
ROOTFS=${1:?rootfs dir}
EXTRA=${2:-}
SDH_BASE=${SDH_BASE:-${TMPDIR:-/tmp}/unicorn-shim-tests}
if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    [ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
fi
[ -n "${MIRROR:-}" ] || { echo "no Debian mirror found in apt sources; set MIRROR=" >&2; exit 1; }
CACHE=${CACHE:-$SDH_BASE/ct/debcache}
mkdir -p "$CACHE"
[ -e "$ROOTFS" ] && { echo "$ROOTFS exists; remove it first" >&2; exit 1; }
# minbase has no init: systemd + systemd-sysv (/sbin/init) + dbus (system bus for
# systemctl/logind/systemd-run inside) are the minimum for --boot.
PKGS=systemd,systemd-sysv,dbus${EXTRA:+,$EXTRA}
debootstrap --variant=minbase --cache-dir="$CACHE" --include="$PKGS" "$SUITE" "$ROOTFS" "$MIRROR"
# Tidy for use as a shared read-only golden image:
rm -f "$ROOTFS/etc/hostname"               # so nspawn --hostname=NAME sticks
: > "$ROOTFS/etc/machine-id"              # empty => nspawn gives each boot its own id
rm -f "$ROOTFS/var/lib/dbus/machine-id"
ln -sf /etc/machine-id "$ROOTFS/var/lib/dbus/machine-id"
chroot "$ROOTFS" apt-get clean
# Debian's unicorn package enables unicorn.service (fails without a config =>
# system "degraded"); keep it disabled in the golden image.
# (/usr/lib on merged-/usr suites, /lib before.)
if [ -e "$ROOTFS/usr/lib/systemd/system/unicorn.service" ] || [ -e "$ROOTFS/lib/systemd/system/unicorn.service" ]; then
    chroot "$ROOTFS" systemctl disable unicorn.service
fi
# sources.list inside already points at $MIRROR (written by debootstrap).
du -sh "$ROOTFS"
