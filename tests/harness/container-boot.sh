#!/bin/bash
# Boot ROOTFS as a systemd container (systemd = PID 1 of the container), in the
# background, without host systemd/machined/dbus.
#   usage: container-boot.sh NAME [ROOTFS]   (NAME: [a-z0-9-]+, unique)
# Env: SDH_VOLATILE=overlay (default; writes go to a tmpfs overlay, ROOTFS stays
#      pristine, so several containers can share one ROOTFS) or SDH_VOLATILE=no.
#      SDH_NSPAWN_ARGS="..." extra args (e.g. --private-network).
# Writes $SDH_BASE/ct/run/NAME/env with CT_LEADER (host pid of container PID 1).
# Run things inside with:  $HERE/ct-exec.sh NAME cmd args...
set -eu
SDH_BASE=${SDH_BASE:-${TMPDIR:-/tmp}/unicorn-shim-tests}
NAME=${1:?name}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOTFS=${2:-$SDH_BASE/ct/rootfs-full}
R=$SDH_BASE/ct/run/$NAME
CG=sdh-ct-$NAME.scope
. "$HERE/cgroup-roots.sh"
[ -f "$R/nspawn.pid" ] && kill -0 "$(cat "$R/nspawn.pid")" 2>/dev/null && { echo "$NAME already up" >&2; exit 1; }
rm -rf "$R"; mkdir -p "$R/share"
t0=$(date +%s.%N)

# Own cgroup per container (nspawn --keep-unit puts payload/ + supervisor/ below
# the cgroup it starts in; sharing /init.scope would collide).
(
  for h in $(cgroup_roots); do
      mkdir -p "$h$CG"
      [ -e "$h/cpuset.cpus" ] && { cat "$h/cpuset.cpus" > "$h$CG/cpuset.cpus"; cat "$h/cpuset.mems" > "$h$CG/cpuset.mems"; }
      echo $BASHPID > "$h$CG/cgroup.procs"
  done
  # Private mount ns with tmpfs /run/systemd: nspawn writes
  # /run/systemd/nspawn/{locks,propagate} and refuses to clean them off a disk fs.
  exec setsid unshare -m --propagation private -- /bin/sh -c '
      mount -t tmpfs -o mode=755 tmpfs /run/systemd && echo $$ > "$0/nspawn.pid" && exec systemd-nspawn "$@"' "$R" \
      -D "$ROOTFS" --machine="$NAME" --hostname="$NAME" --register=no --keep-unit --boot \
      --volatile="${SDH_VOLATILE:-overlay}" --console=pipe \
      --bind="$R/share:/mnt/share" ${SDH_NSPAWN_ARGS:-} \
      </dev/null >"$R/console.log" 2>&1
) &

fail() { echo "$NAME: $1; see $R/console.log" >&2; tail -20 "$R/console.log" >&2; "$HERE/container-down.sh" "$NAME" --keep; exit 1; }
# Container PID 1 = the child of nspawn that is PID 1 of its pid namespace and
# runs systemd (nspawn briefly has other children while setting up), ready once
# its private bus socket exists (earlier, systemctl says "offline" or
# "Failed to connect to bus").
L=; deadline=$((SECONDS + 30))
while [ -z "$L" ] && [ $SECONDS -lt $deadline ]; do
    P=$(cat "$R/nspawn.pid" 2>/dev/null || true)
    for c in $( [ -n "$P" ] && ps -o pid= --ppid "$P" ); do
        [ "$(cat /proc/$c/comm 2>/dev/null)" = systemd ] || continue
        [ "$(awk '/^NSpid:/{print $NF}' /proc/$c/status 2>/dev/null)" = 1 ] || continue
        [ -S "/proc/$c/root/run/systemd/private" ] && { L=$c; break; }
    done
    [ -n "$L" ] || sleep 0.02
done
[ -n "$L" ] || fail "no container leader"
cat > "$R/env" <<EOT
CT_NAME=$NAME
CT_NSPAWN_PID=$P
CT_LEADER=$L
CT_ROOT=/proc/$L/root
CT_SHARE=$R/share
EOT
echo "$L" > "$R/leader.pid"
st=$($HERE/ct-exec.sh "$NAME" timeout 60 systemctl is-system-running --wait 2>&1 || true)
echo "$NAME leader=$L state=$st boot=$(printf '%.2f' "$(echo "$(date +%s.%N) - $t0" | bc)")s"
case $st in running|degraded) exit 0;; *) fail "state $st";; esac
