#!/bin/bash
# Start a private `systemd --user` + private systemd-journald.
#   usage: user-manager-up.sh NAME        (NAME: [a-z0-9]+, unique per instance)
# Creates $SDH_BASE/um/NAME/{run,config/systemd/user,data,runlog/journal} and
# NAME/env (source it to use systemctl --user / journalctl from the host).
# Prints the env file path. Exit 0 once the manager reports running/degraded.
set -eu
NAME=${1:?name}
HERE=$(cd "$(dirname "$0")" && pwd)
D=${SDH_BASE:-${TMPDIR:-/tmp}/unicorn-shim-tests}/um/$NAME
[ -e "$D/manager.pid" ] && kill -0 "$(cat "$D/manager.pid")" 2>/dev/null && { echo "$NAME already running" >&2; exit 1; }
rm -rf "$D"
mkdir -p "$D"/{run,config/systemd/user,data,state,cache,runlog/journal}
chmod 700 "$D/run"

# Mask the distro's enabled user sockets (gpg-agent, dirmngr, ...) for speed/quiet.
for u in dirmngr.socket gpg-agent.socket gpg-agent-browser.socket gpg-agent-extra.socket \
         gpg-agent-ssh.socket pk-debconf-helper.socket; do
    ln -sf /dev/null "$D/config/systemd/user/$u"
done

cat > "$D/env" <<EOT
export XDG_RUNTIME_DIR=$D/run
export XDG_CONFIG_HOME=$D/config
export XDG_DATA_HOME=$D/data
export SDH_UNIT_DIR=$D/config/systemd/user
export SDH_JOURNAL_DIR=$D/runlog/journal
export SDH_MANAGER_PID_FILE=$D/manager.pid
unset DBUS_SESSION_BUS_ADDRESS
EOT

setsid unshare -m --propagation private -- "$HERE/user-manager-inner.sh" "$D" "$NAME" \
    </dev/null >"$D/manager.log" 2>&1 &

# Wait for the manager's private bus socket, then for startup to finish.
for _ in $(seq 500); do [ -S "$D/run/systemd/private" ] && break; sleep 0.01; done
fail() { echo "$1; see $D/manager.log" >&2; cat "$D/manager.log" >&2; "$HERE/user-manager-down.sh" "$NAME" --keep; exit 1; }
[ -S "$D/run/systemd/private" ] || fail "manager did not come up"
. "$D/env"
# NB: `systemctl is-system-running` prints "offline" from outside the namespace
# (client-side sd_booted() check of the host's /run/systemd/system), so poll the
# manager's SystemState property instead.
for _ in $(seq 500); do
    st=$(systemctl --user show --property=SystemState --value 2>&1 || true)
    case $st in running|degraded) break;; esac
    sleep 0.02
done
case $st in running|degraded) ;; *) fail "manager state: $st";; esac
echo "$D/env"
