"""What `unicorn-shim check` checks: a service as systemd will run it.

The target is an app of the packaged units (`shop`, `unicorn-shim@shop`,
`/etc/unicorn-shim/shop.conf`), a unit name (`myapp.service`) or a unit file.
A unit is merged with its drop-ins the way `systemctl cat` shows it: from
`systemctl cat` itself when systemd runs (and SYSTEMD_UNIT_PATH is not set),
otherwise from the unit directories, with the packaged generator's drop-in
computed from APP.conf by the generator's own code.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from shim.tooling import generator

Sections = Dict[str, Dict[str, List[str]]]
TEMPLATE = "unicorn-shim@"
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/run/systemd/generator",
             "/usr/local/lib/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
# From a checkout, the template units sit next to the package.
CHECKOUT_UNITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "units")
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SetupError(Exception):
    """The target cannot be found or read: nothing to check."""


@dataclass
class Setup:
    label: str                               # what was checked, for the summary line
    name: Optional[str]                      # the service's unit name, if known
    service: Sections                        # merged .service
    socket: Sections                         # merged .socket ({} if none)
    app: Optional[str] = None                # packaged app
    conf: Optional[Dict[str, str]] = None    # its APP.conf
    problems: List[Tuple[str, str, str]] = field(default_factory=list)   # (level, what, fix)
    socket_known: bool = True                # False: a lone unit file, its socket unit not seen
    conf_path: Optional[str] = None          # the packaged app's APP.conf: where its fixes go


def parse_unit(text: str, sections: Optional[Sections] = None) -> Sections:
    """systemd unit syntax: [Section], Key=value (repeatable; an empty value resets
    the list), `\\` continuations, # and ; comments. Later text overrides earlier."""
    sections = {} if sections is None else sections
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
            key, value = (part.strip() for part in line.split("=", 1))
            if value:
                current.setdefault(key, []).append(value)
            else:
                current[key] = []
    return sections


def expand_specifiers(text: str, unit_name: str) -> str:
    """The specifiers unit files commonly use (systemd.unit(5)), for a system unit."""
    stem, _, suffix = unit_name.rpartition(".")
    prefix, at, instance = stem.partition("@")
    values = {"i": instance, "I": instance, "n": unit_name, "N": stem, "p": prefix, "P": prefix,
              "t": "/run", "S": "/var/lib", "C": "/var/cache", "L": "/var/log", "E": "/etc", "%": "%"}
    return re.sub(r"%(.)", lambda m: values.get(m.group(1), m.group(0)), text)


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and "SYSTEMD_UNIT_PATH" not in os.environ


def _unit_dirs() -> List[str]:
    given = os.environ.get("SYSTEMD_UNIT_PATH")
    if given is None:
        return [*UNIT_DIRS, CHECKOUT_UNITS]
    dirs = [d for d in given.split(":") if d]
    return dirs + list(UNIT_DIRS) if given.endswith(":") else dirs


def _systemctl_cat(unit: str) -> Optional[str]:
    try:
        r = subprocess.run(["systemctl", "cat", "--no-pager", unit], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _read_unit_files(unit: str, extra_dropins: Dict[str, str]) -> Optional[str]:
    """The unit file and its drop-ins, merged in systemd's order, as one text
    (None if the unit file is nowhere). extra_dropins: {file name: text}."""
    dirs = _unit_dirs()
    stem, _, suffix = unit.rpartition(".")
    names = [unit]
    if "@" in stem:
        names.append(stem.split("@", 1)[0] + "@." + suffix)    # the template
    main = next((os.path.join(d, n) for n in names for d in dirs if os.path.isfile(os.path.join(d, n))), None)
    if main is None:
        return None
    dropins: Dict[str, str] = {}
    # Same file name: the instance's over the template's, an earlier directory over a later one.
    for name in reversed(names):
        for d in reversed(dirs):
            for path in glob.glob(os.path.join(d, name + ".d", "*.conf")):
                dropins[os.path.basename(path)] = path
    texts = [_read(main)]
    merged = {**{n: _read(p) for n, p in dropins.items()}, **extra_dropins}
    texts += [merged[n] for n in sorted(merged)]
    return "\n".join(texts)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def load(target: str) -> Setup:
    """The service and socket the target names, merged as systemd will run them."""
    conf_dir = os.environ.get("UNICORN_SHIM_CONF_DIR", generator.CONF_DIR)
    # The packaged units' own files (the template, a generated drop-in) stand for an app.
    m = re.search(r"(?:^|/)unicorn-shim@([^./]*)(?:\.service|\.socket)?(?:\.d/[^/]+\.conf)?$", target)
    if m and not m.group(1):
        raise SetupError(f"{target} is the template of the packaged units: check an app instead "
                         f"(unicorn-shim check APP, for {conf_dir}/APP.conf)")
    if m:
        return _load_app(m.group(1), os.path.join(conf_dir, m.group(1) + ".conf"))
    if target.endswith(".conf") and os.path.isfile(target):
        return _load_app(os.path.basename(target)[:-len(".conf")], target)
    if "/" not in target and os.path.isfile(os.path.join(conf_dir, target + ".conf")):
        return _load_app(target, os.path.join(conf_dir, target + ".conf"))
    if "/" in target or os.path.isfile(target):
        return _load_file(target)
    return _load_unit(target)


def _load_file(path: str) -> Setup:
    text = _read(path)
    for dropin in sorted(glob.glob(path + ".d/*.conf"), key=os.path.basename):
        text += "\n" + _read(dropin)
    name = os.path.basename(path)
    socket_path = re.sub(r"\.service$", ".socket", path)
    known = socket_path != path and os.path.exists(socket_path)
    socket = parse_unit(_read(socket_path)) if known else {}
    return Setup(path, name if name.endswith(".service") else None,
                 parse_unit(expand_specifiers(text, name)), socket, socket_known=known)


def _load_unit(name: str) -> Setup:
    service_name = name if name.endswith(".service") else name + ".service"
    socket_name = service_name[:-len(".service")] + ".socket"
    if _systemd_running():
        service_text, socket_text = _systemctl_cat(service_name), _systemctl_cat(socket_name)
    else:
        service_text, socket_text = _read_unit_files(service_name, {}), _read_unit_files(socket_name, {})
    if service_text is None:
        raise SetupError(f"{name}: no such app in {os.environ.get('UNICORN_SHIM_CONF_DIR', generator.CONF_DIR)} "
                         f"and no unit {service_name} (looked in {'systemd' if _systemd_running() else ':'.join(_unit_dirs())})")
    return Setup(service_name, service_name, parse_unit(expand_specifiers(service_text, service_name)),
                 parse_unit(expand_specifiers(socket_text or "", socket_name)))


def _load_app(app: str, conf_path: str) -> Setup:
    service_name, socket_name = f"{TEMPLATE}{app}.service", f"{TEMPLATE}{app}.socket"
    try:
        conf_text = _read(conf_path)
    except OSError as e:
        raise SetupError(f"cannot read {conf_path}: {e.strerror}") from None
    problems: List[Tuple[str, str, str]] = []
    generated: Dict[str, str] = {}
    conf: Optional[Dict[str, str]] = None
    try:
        conf = generator.parse_conf(conf_text)
        generated = generator.dropins(app, conf)
    except (generator.ConfError, ValueError) as e:
        problems.append(("error", f"{conf_path}: {e}: the generator writes no drop-in and "
                         f"{service_name} runs its placeholder, which exits 2",
                         f"correct {conf_path} (see /usr/share/doc/unicorn-shim/examples/app.conf), "
                         "then systemctl daemon-reload"))
    service_dropin = generated.get(f"{service_name}.d/{generator.DROPIN}")
    socket_dropin = generated.get(f"{socket_name}.d/{generator.DROPIN}")
    if _systemd_running():
        service_text, socket_text = _systemctl_cat(service_name), _systemctl_cat(socket_name)
        if service_text is not None and service_dropin and service_dropin not in service_text:
            problems.append(("warning", f"{conf_path} changed since systemd last loaded it: systemd runs "
                             "the settings of the previous daemon-reload", "systemctl daemon-reload"))
    else:
        service_text = _read_unit_files(service_name, {generator.DROPIN: service_dropin} if service_dropin else {})
        socket_text = _read_unit_files(socket_name, {generator.DROPIN: socket_dropin} if socket_dropin else {})
    if service_text is None:
        raise SetupError(f"{conf_path} exists but the unit {service_name} is nowhere "
                         f"({'systemd does not know it' if _systemd_running() else ':'.join(_unit_dirs())}): "
                         "is the unicorn-shim package installed?")
    return Setup(f"{service_name} ({conf_path})", service_name,
                 parse_unit(expand_specifiers(service_text, service_name)),
                 parse_unit(expand_specifiers(socket_text or "", socket_name)), app, conf, problems,
                 conf_path=conf_path)


def environment_files(service: Dict[str, List[str]]) -> Tuple[Dict[str, str], List[str]]:
    """Environment= and EnvironmentFile= of a [Service], and the files that could not be read
    (a missing optional `-` file is simply empty)."""
    env: Dict[str, str] = {}
    unread: List[str] = []
    for value in service.get("Environment", []):
        for word in shlex.split(value):
            key, sep, val = word.partition("=")
            if sep:
                env[key] = val
    for value in service.get("EnvironmentFile", []):
        optional, path = value.startswith("-"), value.lstrip("-")
        try:
            text = _read(path)
        except OSError:
            if not optional or os.path.exists(path):
                unread.append(path)
            continue
        for line in text.splitlines():
            line = line.strip()
            if line and line[0] not in "#;" and "=" in line:
                key, val = line.split("=", 1)
                words = shlex.split(val) if val.strip() else [""]
                env[key.strip()] = " ".join(words)
    return env, unread
