"""Where a fix that `check` prints is applied: the operator's own unit file, or, for
an app of the packaged units, its /etc/unicorn-shim/APP.conf (the generator turns
that into the unit's settings). A fix names the place the operator configures, so
it can be applied as printed."""
from __future__ import annotations

from typing import Optional

from shim.tooling.check_setup import Setup

# Unit settings that APP.conf sets, through the generator.
CONF_KEYS = {"User": "USER", "Group": "GROUP", "WorkingDirectory": "APP_DIR", "EnvironmentFile": "ENVIRONMENT_FILE",
             "ListenStream": "LISTEN", "SocketUser": "SOCKET_USER", "SocketGroup": "SOCKET_GROUP",
             "SocketMode": "SOCKET_MODE"}
# `unicorn-shim run` options that APP.conf has a key of its own for; any other goes in SHIM_OPTIONS=.
OPTION_KEYS = {"--pid-file": "PID_FILE", "--chdir": "APP_DIR", "--no-fallback": "FALLBACK=no"}


class Place:
    def __init__(self, setup: Setup) -> None:
        self.conf_path: Optional[str] = setup.conf_path
        self.unit = setup.name or "the service"

    @property
    def packaged(self) -> bool:
        return self.conf_path is not None

    def key(self, unit_key: str) -> str:
        """How the operator names the setting: `USER= in /etc/unicorn-shim/APP.conf` or `User=`."""
        if self.packaged and unit_key in CONF_KEYS:
            return f"{CONF_KEYS[unit_key]}= in {self.conf_path}"
        return f"{unit_key}="

    def setting(self, unit_key: str, value: str) -> str:
        """The fix `unit_key=value`, where the operator applies it. A setting the package
        itself makes right can only be wrong through a drop-in: that is what to remove."""
        if not self.packaged:
            return f"{unit_key}={value}"
        if unit_key in CONF_KEYS:
            return f"{CONF_KEYS[unit_key]}={value} in {self.conf_path}"
        return (f"remove {unit_key}= from the drop-in that sets it (systemctl cat {self.unit} shows which): "
                f"the package sets {unit_key}={value}")

    def option(self, text: str) -> str:
        """A `unicorn-shim run` option: ExecStart=, or its key in APP.conf."""
        if not self.packaged:
            return f"{text} in ExecStart="
        flag = text.split()[0]
        if flag in OPTION_KEYS:
            return f"{OPTION_KEYS[flag]}{'' if '=' in OPTION_KEYS[flag] else '=' + text[len(flag):].strip()} " \
                   f"in {self.conf_path}"
        return f"{text} in SHIM_OPTIONS= of {self.conf_path}"

    def command(self, text: str) -> str:
        """The server command: after `--` in ExecStart=, or SERVER_COMMAND=."""
        if self.packaged:
            return f"SERVER_COMMAND={text} in {self.conf_path}"
        return f"ExecStart=... -- {text}"
