"""`unicorn-shim check UNIT_FILE [-- SERVER_COMMAND...]`: a pre-flight.

Reads a unit file (and, where it can, the server's config) and reports the
known mistakes, each with its fix. Errors make the check fail; warnings don't.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from typing import Dict, List, Optional

from shim import servers
from shim.sockets import parse_address


@dataclass
class Finding:
    level: str        # "error" or "warning"
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.level}: {self.what}\n    fix: {self.fix}"


def parse_unit(text: str) -> Dict[str, Dict[str, List[str]]]:
    """systemd unit syntax: [Section], Key=value (repeatable), `\\` continuations, # and ; comments."""
    sections: Dict[str, Dict[str, List[str]]] = {}
    current: Dict[str, List[str]] = {}
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line:
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _last(section: Dict[str, List[str]], key: str) -> Optional[str]:
    values = section.get(key)
    return values[-1] if values else None


def _command_words(value: str) -> List[str]:
    # %t is the runtime directory (/run for system units), the one specifier that
    # commonly names pid files and sockets.
    words = shlex.split(value.replace("%t", "/run"))
    while words and words[0][:1] in "-@:+!":     # ExecStart= prefixes
        words[0] = words[0][1:] or words.pop(0)
    return words


class ShimArgs:
    """The shim's own options in ExecStart=, without running its parser."""

    def __init__(self, words: List[str]) -> None:
        self.listen: List[str] = []
        self.pid_file: Optional[str] = None
        self.control: Optional[str] = None
        self.server_override: Optional[str] = None
        self.command: List[str] = []
        i = 0
        while i < len(words):
            w = words[i]
            if w == "--":
                self.command = words[i + 1:]
                break
            key, _, inline = w.partition("=")
            value = inline or (words[i + 1] if i + 1 < len(words) else "")
            if key in ("--listen", "--pid-file", "--control", "--server"):
                if not inline:
                    i += 1
                if key == "--listen":
                    self.listen.append(value)
                elif key == "--pid-file":
                    self.pid_file = value
                elif key == "--control":
                    self.control = value
                else:
                    self.server_override = value
            i += 1


def check_unit(path: str, server_command: Optional[List[str]] = None) -> List[Finding]:
    with open(path) as f:
        unit = parse_unit(f.read())
    service = unit.get("Service", {})
    found: List[Finding] = []

    def error(what: str, fix: str) -> None:
        found.append(Finding("error", what, fix))

    def warn(what: str, fix: str) -> None:
        found.append(Finding("warning", what, fix))

    if _last(service, "Type") != "notify":
        error(f"Type={_last(service, 'Type') or 'simple (default)'}: systemd would not wait for the app "
              "nor learn the master's pid", "Type=notify")
    if _last(service, "NotifyAccess") != "all":
        error(f"NotifyAccess={_last(service, 'NotifyAccess') or 'none (default)'}: once MAINPID is the "
              "master, systemd refuses the shim's own messages", "NotifyAccess=all")
    start = _last(service, "ExecStart")
    words = _command_words(start) if start else []
    if not words or os.path.basename(words[0]) != "unicorn-shim" or words[1:2] != ["run"]:
        error("ExecStart= does not run `unicorn-shim run`",
              "ExecStart=/usr/bin/unicorn-shim run [options] -- SERVER_COMMAND")
        return found
    shim = ShimArgs(words[2:])
    command = server_command or shim.command
    reload = _last(service, "ExecReload")
    if not reload or "unicorn-shim" not in reload or " reload" not in reload:
        error("no ExecReload= calling `unicorn-shim reload`: `systemctl reload` would not deploy, "
              "or would not report the outcome", "ExecReload=/usr/bin/unicorn-shim reload")
    if not _last(service, "RuntimeDirectory") and not shim.control:
        error("no RuntimeDirectory=: the control socket has nowhere to live and `unicorn-shim reload` "
              "cannot find the shim", "RuntimeDirectory=app (any name)")
    if not command:
        error("no server command after `--` in ExecStart=", "... run [options] -- unicorn -c config/unicorn.rb")
        return found
    try:
        profile = servers.detect(command, shim.server_override)
    except Exception as e:   # ShimError: tell it as a finding
        error(str(e), "add --server unicorn|gunicorn to ExecStart=")
        return found

    graceful = profile.graceful_stop.name
    kill_signal = _last(service, "KillSignal") or "SIGTERM"
    if not kill_signal.startswith("SIG"):
        kill_signal = "SIG" + kill_signal
    if kill_signal != graceful:
        error(f"KillSignal={kill_signal}: {profile.name}'s graceful stop is {graceful}; with "
              f"{kill_signal} `systemctl stop` cuts requests in flight", f"KillSignal={graceful}")
    kill_mode = _last(service, "KillMode") or "control-group"
    if kill_mode not in ("control-group", "mixed"):
        error(f"KillMode={kill_mode}: stop would leave workers running or signal only the master",
              "KillMode=control-group")
    if not _last(service, "Restart"):
        warn("no Restart=: a crashed master is not brought back", "Restart=on-failure")
    for flag in profile.daemon_flags:
        if flag in command[1:]:
            error(f"{flag} in the server command: a daemonized master escapes the shim and its logs go "
                  "to /dev/null", f"remove {flag}")
    if "bundle" in map(os.path.basename, command[:1]) and "exec" in command[1:2] \
            and "--keep-file-descriptors" not in command:
        error("`bundle exec` without --keep-file-descriptors closes the sockets the shim hands over",
              "bundle exec --keep-file-descriptors ...")

    held = _held_addresses(path, unit, shim)
    workdir = _last(service, "WorkingDirectory")
    if profile.name == "unicorn":
        found += _check_unicorn_config(command, workdir, shim.pid_file, held)
    return found


def _held_addresses(path: str, unit: Dict[str, Dict[str, List[str]]], shim: ShimArgs) -> List[str]:
    """Addresses the shim will hold: --listen, and the matching .socket unit's ListenStream=."""
    held = []
    for text in shim.listen:
        try:
            held.append(str(parse_address(text)).replace("unix:", ""))
        except Exception:
            pass
    socket_file = re.sub(r"\.service$", ".socket", path)
    if socket_file != path and os.path.exists(socket_file):
        with open(socket_file) as f:
            for stream in parse_unit(f.read()).get("Socket", {}).get("ListenStream", []):
                held.append(stream if ":" in stream or stream.startswith("/") else f"0.0.0.0:{stream}")
    return held


def _check_unicorn_config(command: List[str], workdir: Optional[str], pid_file: Optional[str],
                          held: List[str]) -> List[Finding]:
    found: List[Finding] = []
    config = None
    for i, w in enumerate(command):
        if w in ("-c", "--config-file") and i + 1 < len(command):
            config = command[i + 1]
        elif w.startswith("--config-file="):
            config = w.split("=", 1)[1]
    if not config:
        return found
    path = config if os.path.isabs(config) else os.path.join(workdir or ".", config)
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return found   # not on this machine: nothing to say about it
    pid = re.search(r"""^\s*pid\s*\(?\s*["']([^"']+)["']""", text, re.M)
    if pid and pid.group(1) != pid_file:
        found.append(Finding("error", f"the config's pid file {pid.group(1)} is not the shim's "
                             f"--pid-file ({pid_file or 'not given'}): the shim cannot keep it truthful "
                             "for the server and its hooks", f"--pid-file {pid.group(1)}"))
    for m in re.finditer(r"""^\s*listen\s*\(?\s*["']?([^"'\s,)]+)""", text, re.M):
        addr = m.group(1)
        normal = f"0.0.0.0:{addr}" if addr.isdigit() else addr.replace("unix:", "")
        if normal not in held:
            found.append(Finding("error", f"the config listens on {addr}, which the shim does not hold "
                                 f"({', '.join(held) or 'nothing'}): each master binds it itself and a "
                                 "reload can collide with it", "remove the `listen` line; the shim passes "
                                 "its sockets with -l"))
    if re.search(r"\.oldbin", text) and re.search(r"before_fork", text):
        found.append(Finding("warning", "the before_fork hook QUITs the .oldbin master: every reload stalls "
                             "by its sleep, and the old master is gone before the shim knows the new "
                             "release is good (no rollback with preload_app false)",
                             "remove the hook: the shim retires the old master once the new one serves"))
    if "unicorn_shim" not in text:
        found.append(Finding("warning", "the readiness hook is not loaded: readiness is a heuristic that "
                             "costs a settle window per boot and reload", 'require "unicorn_shim"'))
    return found
