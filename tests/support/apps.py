"""Sample Rack apps in a Capistrano layout: releases/rN and a `current` symlink.

Each release answers `release=rN` so a test can tell which one serves; the
variants make the failures a real deploy meets (a release that raises at load,
a master that never gets workers, a failing health page).
"""
from __future__ import annotations

import os
import socket
from typing import Optional

CONFIG_RU = """\
# release {name}
{broken}
app = lambda do |env|
  req = Rack::Request.new(env)
  case req.path_info
  when "/slow"
    sleep((req.params["s"] || "2").to_f)
    [200, {{"content-type" => "text/plain"}}, ["slow done release={name}\\n"]]
  when "/health"
    [{health_status}, {{"content-type" => "text/plain"}}, ["health release={name}\\n"]]
  else
    [200, {{"content-type" => "text/plain"}}, ["release={name} pid=#{{Process.pid}}\\n"]]
  end
end
run app
"""

# The before_fork hook that most Unicorn configs carry (from Unicorn's own example
# config): the new master QUITs the .oldbin master when it forks its last worker.
SEED_HOOK = """\
before_fork do |server, worker|
  old_pid = "#{server.config[:pid]}.oldbin"
  if old_pid != server.pid
    begin
      sig = (worker.nr + 1) >= server.worker_processes ? :QUIT : :TTOU
      Process.kill(sig, File.read(old_pid).to_i)
    rescue Errno::ENOENT, Errno::ESRCH
    end
  end
  sleep 1
end
"""

# The widely copied before_fork body (blog posts, deployment guides, many apps' configs):
# QUIT the .oldbin master as the first worker is forked.
QUIT_OLDBIN = """\
  old_pid = "#{server.config[:pid]}.oldbin"
  if File.exist?(old_pid) && server.pid != old_pid
    begin
      Process.kill("QUIT", File.read(old_pid).to_i)
    rescue Errno::ENOENT, Errno::ESRCH
    end
  end
"""
# ... then sleep: under a USR2 upgrade nothing accepts from the QUIT until that first
# worker runs, a second later.
QUIT_FIRST_HOOK = "before_fork do |server, worker|\n" + QUIT_OLDBIN + "  sleep 1\nend\n"
SEED_HOOKS = {True: SEED_HOOK, "quit-first": QUIT_FIRST_HOOK}

UNICORN_RB = """\
worker_processes {workers}
preload_app {preload}
timeout 30
pid "{pid_file}"
{require_hook}
{seed_hook}
{extra}
"""


APP_PY = """\
# release {name}
import os
import time
{broken}
NAME = "{name}"


def application(environ, start_response):
    path, status = environ.get("PATH_INFO", "/"), "200 OK"
    params = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
    if path == "/slow":
        time.sleep(float(params.get("s", "2")))
        body = "slow done release=%s\\n" % NAME
    elif path == "/health":
        status, body = "{health_status} health", "health release=%s\\n" % NAME
    else:
        body = "release=%s pid=%d\\n" % (NAME, os.getpid())
    start_response(status, [("Content-Type", "text/plain")])
    return [body.encode()]
"""

GUNICORN_CONF = """\
workers = {workers}
preload_app = {preload}
pidfile = "{pid_file}"
timeout = 30
graceful_timeout = 30
{require_hook}
{extra}
"""

PUMA_RB = """\
workers {workers}
{preload}
pidfile "{pid_file}"
{require_hook}
{extra}
"""

# A master that never gets workers: blocked in the hook that runs just before.
NEVER_READY = {
    "unicorn": "before_fork { |s, w| sleep 600 }",
    "gunicorn": "import time\ndef when_ready(server):\n    time.sleep(600)",
    "puma": "before_fork { sleep 600 }",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """/.../app/{releases/rN, current -> releases/rN}"""

    def __init__(self, root: str, pid_file: str, workers: int = 2, preload: bool = True,
                 seed_hook: "bool | str" = False, ready_hook: bool = True, server: str = "unicorn",
                 queue_requests: Optional[bool] = None) -> None:
        self.server = server
        # Puma: without the hook its graceful stop closes a connection it accepted just
        # before whose request had not arrived yet (puma/puma#2398), unless its reactor
        # is off: the README's advice for that setup, and the default here.
        self.queue_requests = ready_hook if queue_requests is None else queue_requests
        self.root = root
        self.pid_file = pid_file
        self.workers, self.preload = workers, preload
        self.seed_hook, self.ready_hook = seed_hook, ready_hook
        self.count = 0
        os.makedirs(os.path.join(root, "releases"), exist_ok=True)
        os.makedirs(os.path.dirname(pid_file), exist_ok=True)
        self.current = os.path.join(root, "current")

    def release(self, broken: bool = False, health_status: int = 200, extra: str = "",
                preload: Optional[bool] = None) -> str:
        """Write the next release and point `current` at it; return its name."""
        self.count += 1
        name = f"r{self.count}"
        d = os.path.join(self.root, "releases", name)
        os.makedirs(os.path.join(d, "config"))
        preload = self.preload if preload is None else preload
        if self.server in ("unicorn", "puma"):
            self._write(d, "config.ru", CONFIG_RU.format(
                name=name, health_status=health_status,
                broken='raise "release %s is broken"' % name if broken else ""))
        if self.server == "unicorn":
            self._write(d, "config/unicorn.rb", UNICORN_RB.format(
                workers=self.workers, preload=str(preload).lower(), pid_file=self.pid_file,
                require_hook='require "unicorn_shim"' if self.ready_hook else "",
                seed_hook=SEED_HOOKS[self.seed_hook] if self.seed_hook else "", extra=extra))
        elif self.server == "puma":
            self._write(d, "config/puma.rb", PUMA_RB.format(
                workers=self.workers, preload="preload_app!" if preload else "", pid_file=self.pid_file,
                require_hook=('require "unicorn_shim_puma"' if self.ready_hook else "") +
                ("" if self.queue_requests else "\nqueue_requests false"), extra=extra))
        else:
            self._write(d, "app.py", APP_PY.format(
                name=name, health_status=health_status,
                broken='raise RuntimeError("release %s is broken")' % name if broken else ""))
            self._write(d, "gunicorn.conf.py", GUNICORN_CONF.format(
                workers=self.workers, preload=preload, pid_file=self.pid_file, extra=extra,
                require_hook="from unicorn_shim_gunicorn import post_worker_init" if self.ready_hook else ""))
        tmp = self.current + ".tmp"
        os.symlink(d, tmp)
        os.replace(tmp, self.current)   # the atomic switch a deploy tool does
        return name

    @staticmethod
    def _write(directory: str, name: str, text: str) -> None:
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)

    def command(self) -> str:
        if self.server == "gunicorn":
            return "gunicorn -c gunicorn.conf.py app:application"
        if self.server == "puma":
            return "puma -C config/puma.rb -e production config.ru"
        return "unicorn -c config/unicorn.rb -E production config.ru"

    @property
    def graceful_stop_signal(self) -> str:
        return "SIGQUIT" if self.server == "unicorn" else "SIGTERM"

    def never_ready(self) -> str:
        return NEVER_READY[self.server]

    def slow_boot(self, seconds: float) -> str:
        """Config that makes the master take `seconds` to read it: keeps a hand-over
        in flight long enough for a test to act on it, on a machine of any speed."""
        if self.server in ("unicorn", "puma"):
            return f"sleep {seconds}"
        return f"import time\ntime.sleep({seconds})"
