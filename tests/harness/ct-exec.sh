#!/bin/bash
# Run a command inside container NAME (all its namespaces, clean env).
#   usage: ct-exec.sh NAME cmd args...     (stdin/stdout/stderr/exit status pass through)
set -eu
SDH_BASE=${SDH_BASE:-${TMPDIR:-/tmp}/unicorn-shim-tests}
NAME=$1; shift
. $SDH_BASE/ct/run/$NAME/env
exec nsenter -t "$CT_LEADER" -a -- /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive HOME=/root "$@"
