#!/bin/bash
# Halt container NAME started by container-boot.sh; remove its cgroups/run dir.
set -u
SDH_BASE=${SDH_BASE:-${TMPDIR:-/tmp}/unicorn-shim-tests}
NAME=${1:?name}
R=$SDH_BASE/ct/run/$NAME
CG=sdh-ct-$NAME.scope
. "$(dirname "$0")/cgroup-roots.sh"
# A pid file outlives its process, and pids are reused: only a pid inside this
# container's cgroup is ever signalled.
ours() { cgroup_pids "$CG" | grep -qx "$1"; }
alive() { local st; st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1); [ -n "$st" ] && [ "$st" != Z ]; }
if [ -f "$R/nspawn.pid" ]; then
    P=$(cat "$R/nspawn.pid")
    if alive "$P" && ours "$P"; then
        kill -TERM "$P"                     # nspawn -> SIGRTMIN+4 to container init: orderly poweroff
        for _ in $(seq 750); do alive "$P" || break; sleep 0.02; done     # up to 15 s
        alive "$P" && { kill -TERM "$P"; sleep 1; }    # second TERM: immediate termination
        alive "$P" && kill -KILL "$P"
    fi
fi
for _ in 1 2 3; do      # stragglers in the container's cgroup, by pid
    pids=$(cgroup_pids "$CG")
    [ -z "$pids" ] && break; kill -KILL $pids 2>/dev/null; sleep 0.2
done
cgroup_remove "$CG"
[ "${2:-}" = --keep ] || rm -rf "$R"
exit 0
