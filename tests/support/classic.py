"""The setup real Unicorn shops run: a Capistrano layout deployed by a tool,
the classic config from the widely read deployment guides, Bundler with a
Gemfile per release, and a non-root User=.

    ROOT/releases/rN/{config.ru, config/unicorn.rb, Gemfile, Gemfile.lock, tmp -> ROOT/shared/tmp}
    ROOT/current -> releases/rN
    ROOT/shared/tmp/{pids, sockets}
    ROOT/opt/unicorn-shim/{bin, shim}    a copy the unit's user can read

Each release answers `release=rN`; `/lazy` loads a file of its release at
request time, as an app's lazily required code or a template would.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Optional

import pytest

from support.apps import QUIT_OLDBIN, free_port
from support.deploy import TEST_PROBATION, with_probation
from support.deploy import REPO
from support.systemd import UserManager

USER = "shimtest"

CONFIG_RU = """\
# release {name}
{broken}
RELEASE = "{name}"
run lambda {{ |env|
  if env["PATH_INFO"] == "/lazy"
    body = File.read(File.join(Dir.pwd, "lib", "lazy.txt")).strip
    [200, {{"content-type" => "text/plain"}}, ["code=#{{RELEASE}} lazy=#{{body}}\\n"]]
  elsif env["PATH_INFO"] == "/health"
    [{health_status}, {{"content-type" => "text/plain"}}, ["health release=#{{RELEASE}} cwd=#{{Dir.pwd}}\\n"]]
  else
    [200, {{"content-type" => "text/plain"}}, ["release=#{{RELEASE}} pid=#{{Process.pid}} gemfile=#{{ENV['BUNDLE_GEMFILE']}}\\n"]]
  end
}}
"""

# From the classic guides, idioms unchanged: APP_PATH from __FILE__ for
# working_directory, listen and pid; Bundler's gemfile reset before a re-exec;
# the before_fork that QUITs the .oldbin master; ActiveRecord guards.
CLASSIC_UNICORN_RB = """\
APP_PATH = File.expand_path('../..', __FILE__)
worker_processes 2
working_directory APP_PATH
listen APP_PATH + "/tmp/sockets/unicorn.sock", :backlog => 64
timeout 30
pid APP_PATH + "/tmp/pids/unicorn.pid"
preload_app {preload}
{before_exec}
before_fork do |server, worker|
  defined?(ActiveRecord::Base) and ActiveRecord::Base.connection.disconnect!
{quit_oldbin}end
after_fork do |server, worker|
  defined?(ActiveRecord::Base) and ActiveRecord::Base.establish_connection
end
"""

BEFORE_EXEC = """\
before_exec do |server|
  ENV['BUNDLE_GEMFILE'] = APP_PATH + '/Gemfile'
end"""

GEMFILE = 'gem "unicorn"\ngem "rack"\n'

SERVICE = """\
[Unit]
Requires=app.socket
After=app.socket

[Service]
Type=notify
NotifyAccess=all
User={user}
Group={user}
WorkingDirectory={root}/current
Environment=PATH=/usr/bin:/bin HOME={root}/shared
RuntimeDirectory=app
# A user manager does not hand RuntimeDirectory= to User= as the system manager does.
ExecStartPre=+/bin/chown {user}:{user} %t/app
ExecStart=/usr/bin/python3 {root}/opt/unicorn-shim/bin/unicorn-shim run --pid-file {root}/current/tmp/pids/unicorn.pid --chdir {root}/current {shim_args} -- {command}
ExecReload=/usr/bin/python3 {root}/opt/unicorn-shim/bin/unicorn-shim reload
KillSignal=SIGQUIT
TimeoutStopSec=60
Restart=on-failure
RestartSec=200ms
SyslogIdentifier=app
{service_extra}
"""

SOCKET = """\
[Socket]
ListenStream={root}/current/tmp/sockets/unicorn.sock
ListenStream=127.0.0.1:{port}
Backlog=1024
"""


@pytest.fixture
def classic(manager):
    """Makes ClassicDeployments (a test module imports this fixture by name)."""
    made = []

    def make(**kw) -> "ClassicDeployment":
        d = ClassicDeployment(manager, **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.stop()


def ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        USER], check=True)
        return pwd.getpwnam(USER)


class ClassicDeployment:
    def __init__(self, manager: UserManager, *, bundler: bool = True, before_exec: "bool | str" = True,
                 preload: bool = True, absolute_config: bool = False, shim_args: str = "",
                 listen: bool = True, service_extra: str = "", quit_oldbin: bool = True,
                 probation: "str | None" = TEST_PROBATION) -> None:
        self.m = manager
        self.user = ensure_user()
        # The private manager's XDG_RUNTIME_DIR is root's 0700: the unit's user must reach
        # its RuntimeDirectory= inside, as it reaches /run/APP under the system manager.
        path = manager.runtime_dir
        while path not in ("/", tempfile.gettempdir()):
            os.chmod(path, os.stat(path).st_mode | 0o111)
            path = os.path.dirname(path)
        os.chmod(os.path.join(manager.runtime_dir, "systemd", "notify"), 0o777)   # like /run/systemd/notify
        self.root = tempfile.mkdtemp(prefix="shop.", dir="/tmp")
        os.chmod(self.root, 0o755)
        self.port = free_port()
        self.bundler, self.before_exec, self.preload = bundler, before_exec, preload
        self.absolute_config = absolute_config
        self.quit_oldbin = quit_oldbin      # False: the before_fork hook without the guides' QUIT of .oldbin
        self.listen = listen          # False: the config has no `listen` line (the shim names its sockets)
        self.shim_args = with_probation(shim_args, probation)
        self.service_extra = service_extra
        self.count = 0
        for d in ("releases", "shared/tmp/pids", "shared/tmp/sockets"):
            os.makedirs(os.path.join(self.root, d))
        for d in ("shared", "shared/tmp", "shared/tmp/pids", "shared/tmp/sockets"):
            os.chown(os.path.join(self.root, d), self.user.pw_uid, self.user.pw_gid)
        opt = os.path.join(self.root, "opt", "unicorn-shim")
        for part in ("bin", "shim"):
            shutil.copytree(os.path.join(REPO, part), os.path.join(opt, part),
                            ignore=shutil.ignore_patterns("__pycache__"))
        self.current = os.path.join(self.root, "current")
        self.lock_text: Optional[str] = None

    def command(self) -> str:
        config = f"{self.current}/config/unicorn.rb" if self.absolute_config else "config/unicorn.rb"
        server = f"unicorn -c {config} -E production"
        return f"bundle exec --keep-file-descriptors {server}" if self.bundler else server

    def release(self, broken: bool = False, lazy_text: Optional[str] = None, health_status: int = 200) -> str:
        """Write releases/rN as a deploy tool does and flip `current` to it."""
        self.count += 1
        name = f"r{self.count}"
        d = os.path.join(self.root, "releases", name)
        os.makedirs(os.path.join(d, "config"))
        os.makedirs(os.path.join(d, "lib"))
        _write(d, "config.ru", CONFIG_RU.format(name=name, health_status=health_status,
                                                broken=f'raise "release {name} is broken"' if broken else ""))
        _write(d, "lib/lazy.txt", (lazy_text or name) + "\n")
        config = CLASSIC_UNICORN_RB.format(preload=str(self.preload).lower(),
                                           before_exec=BEFORE_EXEC if self.before_exec is True
                                           else self.before_exec or "",
                                           quit_oldbin=QUIT_OLDBIN if self.quit_oldbin else "")
        if not self.listen:
            config = "".join(line for line in config.splitlines(True) if not line.startswith("listen "))
        _write(d, "config/unicorn.rb", config)
        os.symlink(os.path.join(self.root, "shared", "tmp"), os.path.join(d, "tmp"))
        if self.bundler:
            _write(d, "Gemfile", GEMFILE)
            if self.lock_text is None:     # resolved offline against Debian's gems, once
                subprocess.run(["bundle", "lock", "--local"], cwd=d, check=True, capture_output=True,
                               env=dict(os.environ, HOME=d))
                self.lock_text = open(os.path.join(d, "Gemfile.lock")).read()
            else:
                _write(d, "Gemfile.lock", self.lock_text)
        tmp = self.current + ".tmp"
        os.symlink(d, tmp)
        os.replace(tmp, self.current)
        return name

    def start(self) -> None:
        if not os.path.exists(self.current):
            self.release()
        self.m.write_unit("app.service", SERVICE.format(user=USER, root=self.root, shim_args=self.shim_args,
                                                        command=self.command(), service_extra=self.service_extra))
        self.m.write_unit("app.socket", SOCKET.format(root=self.root, port=self.port))
        r = self.m.systemctl("start", "app.socket")
        assert r.returncode == 0, r.stderr
        r = self.m.systemctl("start", "app.service")
        assert r.returncode == 0, r.stderr + self.journal_text()[-3000:]

    def reload(self) -> subprocess.CompletedProcess:
        return self.m.systemctl("reload", "app.service")

    def state(self) -> dict:
        return self.m.show("app.service", "MainPID", "ActiveState", "SubState", "StatusText", "User")

    def unix_get(self, path: str = "/") -> str:
        """A request through the unix socket, as nginx would send it."""
        r = subprocess.run(["curl", "-sS", "--max-time", "5", "--unix-socket",
                            os.path.join(self.current, "tmp", "sockets", "unicorn.sock"), f"http://app{path}"],
                           capture_output=True, text=True)
        return r.stdout.strip() or r.stderr.strip()

    def journal_text(self) -> str:
        """The unit's lines: `--user-unit` would only match the caller's own uid."""
        return "\n".join(str(e.get("MESSAGE", "")) for e in self.m.journal("_SYSTEMD_USER_UNIT=app.service"))

    def stop(self) -> None:
        self.m.systemctl("stop", "app.service")
        self.m.systemctl("stop", "app.socket")
        shutil.rmtree(self.root, ignore_errors=True)


def _write(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)
