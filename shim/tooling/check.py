"""`unicorn-shim check APP|UNIT|UNIT_FILE [-- SERVER_COMMAND...]`: a pre-flight.

Reads the service as systemd will run it (shim.tooling.check_setup), the server's
config as the server sees it (shim.tooling.config_eval) and this machine's users and
directories (shim.tooling.check_rules), and reports the known mistakes, each with its
fix. Three levels: errors make the check fail; warnings don't; "cannot tell"
says what could not be known here, and never fails the check.
"""
from __future__ import annotations

import os
import re
import shlex
from typing import Dict, List, Optional, Tuple

from shim.runtime import servers
from shim.tooling import check_setup, generator
from shim.tooling.check_setup import Setup
from shim.tooling.placement import Place
from shim.tooling.findings import CANNOT, ERROR, WARNING, Finding, last  # noqa: F401 (CANNOT: part of check's interface)

def _command_words(value: str, env: Dict[str, str]) -> List[str]:
    """ExecStart= as systemd runs it: `${VAR}` replaced in a word, a lone `$VAR` split into words."""
    words = []
    for word in shlex.split(value):
        lone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if lone:
            words += env.get(lone.group(1), "").split()
        else:
            # `$$` is a literal `$` (what the generator writes for one): never expanded
            words.append(re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""), word))
    while words and words[0][:1] in "-@:+!":     # ExecStart= prefixes
        words[0] = words[0][1:] or words.pop(0)
    return words


parse_run_options = generator.run_options     # `unicorn-shim run`'s options, read by its own parser


def held_addresses(setup: Setup, listen: List[str]) -> List[str]:
    """Addresses the shim will hold, in the server's spelling: --listen and the .socket's ListenStream=."""
    held = [a[len("unix:"):] if a.startswith("unix:") else (f"0.0.0.0:{a}" if a.isdigit() else a)
            for a in listen]
    for stream in setup.socket.get("Socket", {}).get("ListenStream", []):
        held.append(stream if ":" in stream or stream.startswith("/") else f"*:{stream}")
    return held


def check(target: str, server_command: Optional[List[str]] = None,
          host: bool = True) -> Tuple[str, List[Finding]]:
    """(what was checked, findings). Raises check_setup.SetupError when the target is nowhere."""
    setup = check_setup.load(target)
    found = [Finding(*p) for p in setup.problems]
    if any(f.level == ERROR for f in found):
        return setup.label, found
    found += _unit_rules(setup, server_command, host)
    return setup.label, found


def _unit_rules(setup: Setup, server_command: Optional[List[str]], host: bool) -> List[Finding]:
    from shim.tooling import check_config, check_release, check_rules
    service = setup.service.get("Service", {})
    place = Place(setup)
    found: List[Finding] = []

    def error(what: str, fix: str) -> None:
        found.append(Finding(ERROR, what, fix))

    def warn(what: str, fix: str) -> None:
        found.append(Finding(WARNING, what, fix))

    if last(service, "Type") != "notify":
        error(f"Type={last(service, 'Type') or 'simple (default)'}: systemd would not wait for the app "
              "nor learn the master's pid", place.setting("Type", "notify"))
    if last(service, "NotifyAccess") != "all":
        error(f"NotifyAccess={last(service, 'NotifyAccess') or 'none (default)'}: once MAINPID is the "
              "master, systemd refuses the shim's own messages", place.setting("NotifyAccess", "all"))
    start = last(service, "ExecStart")
    words = _command_words(start, check_setup.environment_files(service)[0]) if start else []
    if not words or os.path.basename(words[0]) != "unicorn-shim" or words[1:2] != ["run"]:
        error("ExecStart= does not run `unicorn-shim run`",
              "ExecStart=/usr/bin/unicorn-shim run [options] -- SERVER_COMMAND")
        return found
    shim, why = parse_run_options(words[2:])
    if shim is None:
        error(f"ExecStart=: `unicorn-shim run` would refuse its options: {why}",
              f"correct SHIM_OPTIONS= in {place.conf_path} (unicorn-shim run --help)" if place.packaged
              else "unicorn-shim run --help")
        return found
    command = server_command or shim.command
    reload = last(service, "ExecReload")
    if not reload or "unicorn-shim" not in reload or " reload" not in reload:
        error("no ExecReload= calling `unicorn-shim reload`: `systemctl reload` would not deploy, "
              "or would not report the outcome", place.setting("ExecReload", "/usr/bin/unicorn-shim reload"))
    if not last(service, "RuntimeDirectory") and not shim.control:
        error("no RuntimeDirectory=: the control socket has nowhere to live and `unicorn-shim reload` "
              "cannot find the shim", place.setting("RuntimeDirectory", "app (any name)"))
    if not command:
        error("no server command after `--` in ExecStart=", place.command("unicorn -c config/unicorn.rb"))
        return found
    try:
        profile = servers.detect(command, shim.server)
    except Exception as e:   # ShimError: tell it as a finding
        error(str(e), f"SERVER=unicorn|gunicorn|puma in {place.conf_path}" if place.packaged
              else "add --server unicorn|gunicorn|puma to ExecStart=")
        return found

    if shim.upgrade == "usr2" and not profile.usr2_carries_sockets:
        error(f"--upgrade usr2: {profile.name}'s own re-exec cannot keep the sockets the shim holds; "
              "the shim refuses to start",
              f"remove --upgrade usr2 from {'SHIM_OPTIONS=' if place.packaged else 'ExecStart='} (spawn, the default)")
    graceful = profile.graceful_stop.name
    kill_signal = last(service, "KillSignal") or "SIGTERM"
    if not kill_signal.startswith("SIG"):
        kill_signal = "SIG" + kill_signal
    if kill_signal != graceful:
        error(f"KillSignal={kill_signal}: {profile.name}'s graceful stop is {graceful}; with "
              f"{kill_signal} `systemctl stop` cuts requests in flight", place.setting("KillSignal", graceful))
    kill_mode = last(service, "KillMode") or "control-group"
    if kill_mode not in ("control-group", "mixed"):
        error(f"KillMode={kill_mode}: stop would leave workers running or signal only the master",
              place.setting("KillMode", "control-group"))
    if not last(service, "Restart"):
        warn("no Restart=: a crashed master is not brought back", place.setting("Restart", "on-failure"))
    for flag in profile.daemon_flags:
        if flag in command[1:]:
            error(f"{flag} in the server command: a daemonized master escapes the shim and its logs go "
                  "to /dev/null", f"remove {flag} from {'SERVER_COMMAND=' if place.packaged else 'ExecStart='}")
    if "bundle" in map(os.path.basename, command[:1]) and "exec" in command[1:2] \
            and "--keep-file-descriptors" not in command:
        error("`bundle exec` without --keep-file-descriptors closes the sockets the shim hands over",
              place.command("bundle exec --keep-file-descriptors ..."))
    context = check_rules.Context(setup, service, shim, command, profile,
                                  held_addresses(setup, shim.listen))
    found += check_rules.unit_rules(context)
    if host:
        found += check_rules.host_rules(context, check_config.ConfigRules)
        found += check_release.release_rules(context)
    return found


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def report(label: str, findings: List[Finding]) -> Tuple[str, int]:
    """The printed report and the exit status: 1 on any error."""
    errors = sum(1 for f in findings if f.level == ERROR)
    warnings = sum(1 for f in findings if f.level == WARNING)
    cannot = len(findings) - errors - warnings
    order = {ERROR: 0, WARNING: 1, CANNOT: 2}
    lines = [str(f) for f in sorted(findings, key=lambda f: order[f.level])]
    lines.append(f"{label}: {_count(errors, 'error')}, {_count(warnings, 'warning')}, {cannot} cannot tell")
    return "\n".join(lines), 1 if errors else 0
