# Sourced by the harness scripts: the cgroup hierarchies of this machine.
# cgroup_roots: the root directory of each hierarchy, with a trailing slash:
#   /sys/fs/cgroup/ alone when it is cgroup2 (unified, e.g. inside a Debian 13
#   container), else every v1 hierarchy and the hybrid's unified/ below it.
cgroup_roots() {
    if [ -e /sys/fs/cgroup/cgroup.procs ]; then
        echo /sys/fs/cgroup/
        return
    fi
    for h in /sys/fs/cgroup/*/; do
        [ -e "$h/cgroup.procs" ] && echo "$h"
    done
}
# cgroup_pids CG: every pid in CG or below it, in any hierarchy.
cgroup_pids() {
    for h in $(cgroup_roots); do
        [ -d "$h$1" ] && find "$h$1" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -u
}
# cgroup_remove CG: remove CG's directories in every hierarchy, deepest first.
cgroup_remove() {
    for h in $(cgroup_roots); do
        [ -d "$h$1" ] && find "$h$1" -depth -type d -exec rmdir {} + 2>/dev/null
    done
    return 0
}
