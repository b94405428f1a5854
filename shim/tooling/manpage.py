"""unicorn-shim(1), rendered in roff from the command line's own definitions
(shim.options.build_parser), so the man page and --help never disagree.

    python3 -m shim.tooling.manpage > unicorn-shim.1
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import List

from shim import __version__
from shim.options import build_parser

EXTRA = r"""
.SH DESCRIPTION
.B unicorn-shim run
is a systemd service's ExecStart=. It holds the listening sockets (from a
.BR systemd.socket (5)
unit or bound from \fB\-\-listen\fR), starts the Unicorn, Gunicorn or Puma master so
that the service manager is its parent, reports READY=1 only once the workers
are ready, keeps MAINPID= pointed at the live master and replaces the master
with zero downtime on reload.
.PP
.B unicorn-shim reload
is the service's ExecReload=. It asks the running shim over its control socket
and waits: exit status 0 when the new release serves and the old master has
retired, non-zero with the reason on standard error when the new release was
rolled back and the old one keeps serving.
.PP
The reload's deadline: as ExecReload=, the client asks its service manager
(systemctl show; \-\-user under a user manager) when its reload job ends:
TimeoutStartSec= from the moment systemd spawned this ExecReload= line (the
unit's ControlPID=), JobTimeoutSec= and JobRunningTimeoutSec= from the job's
start, \-\-timeout from now; the earliest counts. The shim passes its point of
no return only while the old master's drain (up to \-\-retire\-timeout) plus
2 s still fits before it, and otherwise rolls back before it, with a reason such
as "systemd's reload timeout (TimeoutStartSec=6 s) ends in 3.0 s, too soon for
the new release to take over (...): rolled back before it; raise
TimeoutStartSec= or lower \-\-ready\-timeout". When every client leaves
without a word (systemd killed ExecReload=, a Ctrl\-C) before that point, the
reason is "every client that asked for this reload went away".
.SS "The shim's own death"
Under systemd, with NotifyAccess=all and a RuntimeDirectory=, the shim leaves a
watcher in the unit's cgroup (\fB/bin/sh\fR, named shim\-watcher) that holds
copies of the listening sockets. If the shim dies (kill \-9, the OOM killer, a
crash) while a master is the main process, the watcher starts a new shim with
the same command line that adopts that master (the recorded pid, in the unit's
cgroup, with the recorded start time), re\-creates the control socket and
shim.pid, and says "(adopted after the shim (pid N) died)" in STATUS=; reloads
work again. If it cannot adopt (or the shim died again after 3 adoptions within 60 s), STATUS= says "supervision lost" and why. A shim
killed during a hand\-over is the main process: systemd restarts the unit. A
stop or a normal exit never adopts.
.SH EXIT STATUS
.TP
.B 0
success (run: stopped on request)
.TP
.B 2
bad command line
.TP
.B 3
a \-\-listen address that cannot be parsed or bound
.TP
.B 4
bad socket activation (LISTEN_PID not ours, an fd that is not a listening socket)
.TP
.B 5
the server command cannot be run
.TP
.B 6
the pid file's directory does not exist or is not writable
.TP
.B 7
the first master died or was not ready in time, and no last good release could serve instead
.TP
.B 8
the master exited in steady state, or a failed reload left nothing serving
.TP
.B 9
reload, status: no shim answers on the control socket
.TP
.B 10
reload: the new release was rolled back
.TP
.B 11
run: the release that served before failed to start after every retry (a dependency still down): Restart= tries again
.TP
.B 1
check: errors found (0: none; 2: the target is nowhere)
.SH JOURNAL FIELDS
Each step is logged with SHIM_EVENT= (ready, reload-start, reload-done,
reload-failed, retired, master-exit, stopping, fallback, no-fallback, boot-retry,
start-failed, signal, log-reopen, pid-file-removed, pid-file-repaired,
supervision-lost, adopted, adopt-failed, watcher-gone, watcher-error) and, where they apply,
MASTER_PID=, OLD_MASTER_PID=, OLD_SHIM_PID=, GENERATION=, RELEASE=, DURATION_MS=, RESULT=,
REASON=. For example:
.PP
.RS
journalctl \-u app SHIM_EVENT=reload-failed \-o json
.RE
.SH FILES
.TP
.I /etc/unicorn-shim/APP.conf
configuration of the templated units unicorn-shim@APP.service and
unicorn-shim@APP.socket (see /usr/share/doc/unicorn-shim/examples).
.TP
.I $RUNTIME_DIRECTORY/control.sock
the control socket of a running shim.
.SH SEE ALSO
.BR systemd.service (5),
.BR systemd.socket (5),
.BR sd_notify (3),
.BR journalctl (1)
"""


def _escape(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _options(parser: argparse.ArgumentParser) -> List[str]:
    out = []
    for action in parser._actions:   # argparse has no public iterator over its actions
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
            continue
        flags = ", ".join(f"\\fB{_escape(o)}\\fR" for o in action.option_strings)
        if action.nargs != 0:
            flags += f" \\fI{_escape(action.metavar or action.dest.upper())}\\fR"
        out += [".TP", flags, _escape(action.help or "")]
    return out


def render() -> str:
    parser = build_parser()
    date = datetime.datetime.utcfromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)).strftime("%Y-%m-%d")
    lines = [f'.TH UNICORN-SHIM 1 "{date}" "unicorn-shim {__version__}" "User Commands"',
             ".SH NAME", "unicorn-shim \\- " + _escape(parser.description or ""), ".SH SYNOPSIS"]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        usage = sub.format_usage().replace("usage: ", "").strip()
        lines += [".PP", _escape(" ".join(usage.split()))]
    lines += [EXTRA.strip()]
    lines += [".SH OPTIONS", "Common:"] + _options(parser)
    for name, sub in subparsers.choices.items():
        lines += [f'.SS "unicorn\\-shim {name}"', _escape(sub.description or "")]
        lines += _options(sub)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
