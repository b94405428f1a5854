#!/bin/bash
# Stop an instance started by user-manager-up.sh NAME: manager (SIGTERM ->
# stops all units, exits), journald, stragglers in its cgroups; remove cgroups.
#   usage: user-manager-down.sh NAME [--keep]   (--keep: keep the directory/journal)
set -u
NAME=${1:?name}
D=${SDH_BASE:-${TMPDIR:-/tmp}/unicorn-shim-tests}/um/$NAME
CG=sdh-$NAME.slice
. "$(dirname "$0")/cgroup-roots.sh"

# "gone" includes zombie: our pids get reparented to the host's PID 1, which
# reaps lazily (~2 s here), so `kill -0` alone would wait for the reaper.
alive() { local st; st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1; [ -n "$st" ] && [ "$st" != Z ]; }
# A pid file outlives its process, and pids are reused (pid_max may be 32768): only
# a pid inside this instance's cgroup is ever signalled, never another job's process.
ours() { cgroup_pids "$CG" | grep -qx "$1"; }
waitgone() { for _ in $(seq "$2"); do alive "$1" || return 0; sleep 0.02; done; return 1; }
stop_pid() { # pid, ticks of 20ms before SIGKILL
    local p=$1
    [ -n "$p" ] && alive "$p" && ours "$p" || return 0
    kill -TERM "$p" 2>/dev/null
    waitgone "$p" "$2" || { kill -KILL "$p" 2>/dev/null; waitgone "$p" 100; }
}
[ -f "$D/manager.pid" ] && stop_pid "$(cat "$D/manager.pid")" 500
[ -f "$D/journald.pid" ] && stop_pid "$(cat "$D/journald.pid")" 100

# Anything left in the instance's cgroups (e.g. KillMode=none leftovers): SIGKILL by pid.
for _ in 1 2 3; do
    pids=$(cgroup_pids "$CG")
    [ -z "$pids" ] && break
    kill -KILL $pids 2>/dev/null; sleep 0.1
done
# Remove the cgroup trees in every hierarchy (deepest first).
cgroup_remove "$CG"
[ "${2:-}" = --keep ] || rm -rf "$D"
exit 0
