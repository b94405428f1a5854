"""`unicorn-shim check`'s rules on the server's config, as the server evaluated it."""
from __future__ import annotations

import os
import pwd
import re
from typing import Any, Dict, List, Optional

from shim.tooling import config_eval
from shim.tooling.check_release import RUBY_32_GONE
from shim.tooling.findings import CANNOT, ERROR, WARNING
from shim.tooling.check_rules import Context, inside, writable_dir

# Unicorn's own check that the pid/log directories are writable runs after the
# whole config loaded: failing it leaves every value known (checked by our rules).
PATH_CHECK = "ArgumentError: directory for "
SHIM_ENV = ("UNICORN_SHIM_", "RACK_ENV")


class ConfigRules:
    def __init__(self, ctx: Context, run_as: Optional[config_eval.RunAs], evaluation: config_eval.Evaluation,
                 env_uncertain: bool, env: Optional[Dict[str, str]] = None) -> None:
        self.ctx = ctx
        self.env = env or {}
        self.run_as = run_as
        self.e = evaluation
        self.v: Dict[str, Any] = evaluation.values
        self.unknown_env = [k for k in evaluation.unset_env if not k.startswith(SHIM_ENV)] if env_uncertain else []

    def error(self, what: str, fix: str) -> None:
        """An error that rests on the config's values: only as sure as the environment it was evaluated in."""
        if self.unknown_env:
            self.ctx.add(CANNOT, f"{what} (as evaluated with {', '.join(self.unknown_env)} unset; the unit "
                         "may pass more environment than this check can see)", fix)
        else:
            self.ctx.add(ERROR, what, fix)

    def run(self) -> None:
        who = f" as {self.run_as.name}" if self.run_as and self.e.as_user else ""
        where = f" in {self.ctx.start_dir}" if self.ctx.start_dir else ""
        if self.v.get("syntax_error"):
            # The server reads the same file: no environment or gem makes it start.
            checker = "ruby -c" if self.e.server != "gunicorn" else "python3 -m py_compile"
            where = self.v["syntax_error"].split(":")[0]
            self.ctx.add(ERROR, f"the {self.e.server} config has a syntax error: {self.v['syntax_error']}: "
                         "every master fails to start", f"correct it (`{checker} {where}` shows the same)")
            return
        if self.e.cannot:
            self.ctx.add(CANNOT, f"the {self.e.server} config: {self.e.cannot}; nothing in it was checked",
                         self.e.by_hand or (f"what `check` ran{who}{where} is what the shim will run: make it "
                                            "load there" if self.e.server in config_eval.EVALUATED else ""))
            return
        error = self.v.get("error")
        if error and not error.startswith(PATH_CHECK):
            self.ctx.add(CANNOT, f"the {self.e.server} config did not load with the server's own code{who}{where}: "
                         f"{error}; nothing in it was checked",
                         "if it needs the app's gems or environment, give the unit what the shim will give the "
                         f"master ({self._environment_keys()}), then check again")
            return
        {"unicorn": self.unicorn, "gunicorn": self.gunicorn, "puma": self.puma}[self.ctx.profile.name]()

    def _environment_keys(self) -> str:
        if self.ctx.place.packaged:
            return f"ENV_NAME= or ENVIRONMENT_FILE= in {self.ctx.place.conf_path}"
        return "Environment=, EnvironmentFile="

    # --- Unicorn ---

    def unicorn(self) -> None:
        self.pid_file(self.v.get("pid"))
        self.listeners()
        self.release_pinning(self.v.get("working_directory"), "working_directory")
        self.bundler()
        self.oldbin_hook()
        self.gone_in_ruby_32()
        self.readiness("require \"unicorn_shim\" in the Unicorn config")
        user = self.v.get("user")
        self.privilege_drop(user[0] if user else None, user[1] if user else None)
        for key in ("stderr_path", "stdout_path"):
            if self.v.get(key):
                writable_dir(self.ctx, self.run_as, self.v[key], f"the config's {key}")

    def listeners(self) -> None:
        for address in self.v.get("listeners", []):
            if not _held(address, self.ctx.held) and not self.ctx.setup.socket_known:
                self.ctx.add(CANNOT, f"whether the shim holds {address}, which the config listens on: no "
                             f".socket unit next to {self.ctx.setup.label} was seen",
                             "check the unit by name (unicorn-shim check NAME.service) or put its .socket "
                             "next to it")
            elif not _held(address, self.ctx.held):
                self.error(f"the config listens on {address}, which the shim does not hold "
                           f"({', '.join(self.ctx.held) or 'nothing'}): each master binds it itself and a "
                           "reload can collide with it",
                           "remove the `listen` line and give the address to the shim ("
                           f"{self.ctx.key('ListenStream') if self.ctx.place.packaged else 'ListenStream= or --listen'}"
                           "); the shim passes its sockets with -l")

    def bundler(self) -> None:
        words = [os.path.basename(w) for w in self.ctx.command]
        if not (words[:1] == ["bundle"] and "exec" in words) or self.ctx.upgrade != "usr2" or not self.ctx.chdir:
            return
        hook = self.v.get("hooks", {}).get("before_exec") or {}
        gemfile = (hook.get("effect") or {}).get("gemfile")
        current = os.path.join(self.ctx.chdir, "Gemfile")
        fix = (f"before_exec {{ |server| ENV[\"BUNDLE_GEMFILE\"] = \"{current}\" }} in the config, "
               f"or remove --upgrade usr2 from {'SHIM_OPTIONS=' if self.ctx.place.packaged else 'ExecStart='}")
        # The shim refuses a new master whose BUNDLE_GEMFILE is outside the deployed release.
        refused = ", and the shim refuses such a master: every reload to another release fails"
        if hook.get("default", True):
            self.error("`bundle exec` under --upgrade usr2 and no before_exec setting BUNDLE_GEMFILE: Bundler "
                       "pins BUNDLE_GEMFILE to the first release's Gemfile (its real path), so every re-exec'd "
                       "master would load that release's gems" + refused, fix)
        elif gemfile is None:
            if "BUNDLE_GEMFILE" not in (hook.get("source") or ""):
                self.error("`bundle exec` under --upgrade usr2 and the config's before_exec does not set "
                           "BUNDLE_GEMFILE: every re-exec'd master would load the first release's gems" + refused, fix)
            else:
                self.ctx.add(CANNOT, "where the config's before_exec points BUNDLE_GEMFILE: "
                             f"{(hook.get('effect') or {}).get('error', 'it did not say')}")
        elif not inside(gemfile, self.ctx.chdir):
            self.error(f"the config's before_exec sets BUNDLE_GEMFILE={gemfile}, outside --chdir "
                       f"{self.ctx.chdir}: every re-exec'd master would load that release's gems" + refused, fix)

    def oldbin_hook(self) -> None:
        hook = self.v.get("hooks", {}).get("before_fork") or {}
        source = hook.get("source") or ""
        # Under spawn the shim leaves no .oldbin for the hook to find (the next master starts
        # beside the old one, which the shim retires itself): the hook does nothing there.
        if ".oldbin" in source and self.ctx.upgrade == "usr2":
            stall = "every reload stalls by its sleep, and " if "sleep" in source else ""
            self.ctx.add(WARNING, f"the before_fork hook QUITs the .oldbin master: {stall}the old master is gone "
                         "before the shim knows the new release is good (no rollback with preload_app false)",
                         "remove the hook: the shim retires the old master once the new one serves")

    def gone_in_ruby_32(self) -> None:
        version = self.v.get("ruby_version") or "0"
        if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (3, 2):
            return
        for name, hook in sorted(self.v.get("hooks", {}).items()):
            if RUBY_32_GONE.search(hook.get("source") or ""):
                # Measured on Debian 13: a before_fork that raises takes the master down at its first fork.
                effect = ("the master dies before its first worker starts" if name == "before_fork"
                          else "it raises NoMethodError each time it runs")
                self.ctx.add(ERROR, f"the config's {name} calls File.exists?, which this Ruby ({version}) no "
                             f"longer has (gone since 3.2): {effect}", "File.exist? in the config")

    # --- Gunicorn ---

    def gunicorn(self) -> None:
        self.pid_file(self.v.get("pidfile"))
        self.release_pinning(self.v.get("chdir"), "chdir")
        self.readiness("from unicorn_shim_gunicorn import post_worker_init in the Gunicorn config")
        uid, gid = self.v.get("user"), self.v.get("group")
        if self.e.as_user and (uid != self.v.get("own_uid") or gid != self.v.get("own_gid")):
            try:
                user = pwd.getpwuid(uid).pw_name
            except (KeyError, TypeError):
                user = str(uid)
            self.privilege_drop(user, str(gid))

    # --- Puma ---

    def puma(self) -> None:
        self.pid_file(self.v.get("pidfile"))
        self.release_pinning(self.v.get("directory"), "directory")
        if not self.v.get("workers"):
            self.error("Puma would run in single mode (workers 0): the shim judges readiness by the master's "
                       "workers, and there are none, so every start and reload fails at --ready-timeout",
                       "workers 2 (or more) in the Puma config")
        if self.v.get("fork_worker"):
            self.error("fork_worker: Puma's workers are then children of worker 0, not of the master, and "
                       "the shim cannot follow them", "remove fork_worker from the Puma config")
        self.readiness('require "unicorn_shim_puma" in the Puma config')

    # --- all ---

    def pid_file(self, pid: Optional[str]) -> None:
        mine = os.path.abspath(self.ctx.shim.pid_file) if self.ctx.shim.pid_file else None
        # The same file by another path (releases/rN/tmp -> shared/tmp) is the same pid file.
        if pid and (not mine or os.path.realpath(pid) != os.path.realpath(mine)):
            self.error(f"the config's pid file {pid} is not the shim's --pid-file ({mine or 'not given'}): "
                       "the shim cannot keep it truthful for the server and its hooks",
                       f"{self.ctx.place.option('--pid-file ' + pid)}, or the config's pid set to "
                       f"{mine or 'the --pid-file'}")

    def release_pinning(self, directory: Optional[str], setting: str) -> None:
        """A directory the config sets for the master must follow `current`. Under spawn
        each master starts in the real release behind --chdir, so that release's own path
        is fine; under usr2 Unicorn's re-exec returns to it, so only --chdir is."""
        chdir = self.ctx.chdir
        if not directory or not chdir or inside(directory, chdir):
            return
        real, resolved = os.path.realpath(chdir), os.path.realpath(directory)
        if self.ctx.upgrade == "spawn" and inside(resolved, real):
            return
        if inside(resolved, real):
            what = ("the release `current` points at now, where Unicorn's own re-exec (--upgrade usr2) starts "
                    "every later master")
            fix = f"{setting} through the symlink ({chdir}), or the default --upgrade spawn"
        else:
            what = "not the release `current` points at, and every master is started there"
            fix = (f"{setting} through the symlink ({chdir}; e.g. computed from __FILE__ of a config named "
                   "through it), or drop it: the shim starts each master in --chdir")
        self.error(f"the config's {setting} resolves to {directory}, outside --chdir {chdir}: {what}, so "
                   "deploys never take effect", fix)

    def readiness(self, how: str) -> None:
        if not self.v.get("readiness_hook"):
            self.ctx.add(WARNING, "the readiness hook is not loaded: readiness is a heuristic that costs a "
                         "settle window per boot and reload", how)

    def privilege_drop(self, user: Optional[str], group: Optional[str]) -> None:
        if not user or user == "None":
            return
        place = self.ctx.place
        unit_user = self.run_as.name if self.run_as else None
        if unit_user and unit_user != "root":
            if user not in (unit_user, str(self.run_as.uid)):
                self.error(f"the config makes workers run as {user}, but the master runs as {unit_user} "
                           f"({place.key('User')}), which cannot switch users: every worker dies at boot",
                           f"remove `user` from the config, or {place.setting('User', user)}")
            return
        # Their readiness reports go over the channel the workers inherit, which works
        # across the switch; what is left is a master that keeps root for its life.
        self.ctx.add(WARNING, f"a root master whose workers run as {user}: the master keeps root for as long "
                     "as it runs, and reads the release's code as root at every reload",
                     f"{place.setting('User', user)} and remove `user` from the config: the shim needs no root")


def _held(address: str, held: List[str]) -> bool:
    if address.startswith("/"):
        return address in held
    host, _, port = address.rpartition(":")
    for h in held:
        h_host, _, h_port = h.rpartition(":")
        if h == address or (h_host == "*" and port == h_port and host in ("0.0.0.0", "[::]")):
            return True
    return False
