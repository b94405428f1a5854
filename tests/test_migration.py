"""Issue 15: docs/migration.md, performed as written. Each starting point's
blocks are read from the guide itself (so the guide and the test cannot drift)
and run in a booted Debian 12 with runit, nginx, Puma and the package installed,
while a client polls the app through nginx the whole time: 0 failed requests,
the old supervisor gone, the environment reaching the master, the first deploy
afterwards serving the new release, and a restart of the service and a reboot
serving it again."""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from support.containers import RebootableContainer, image
from support.deploy import REPO

GUIDE = os.path.join(REPO, "docs", "migration.md")
SECRET = "0c2b9a7e5d"

POLL = """
import http.client, json, os, sys, time
ok = failed = 0; bodies = set(); errors = []
while not os.path.exists(sys.argv[1]):
    c = http.client.HTTPConnection("127.0.0.1", 80, timeout=60)
    try:
        c.request("GET", "/"); r = c.getresponse(); body = r.read().decode().strip()
        if r.status == 200: ok += 1; bodies.add(body)
        else: failed += 1; errors.append(r.status)
    except Exception as e:
        failed += 1; errors.append(repr(e))
    finally:
        c.close()
    time.sleep(0.01)
print(json.dumps({"ok": ok, "failed": failed, "bodies": sorted(bodies), "errors": errors[:5]}))
"""

# unicornherder's process model (it is not packaged by Debian): Unicorn daemonized
# with a pid file, followed by polling; HUP and USR2 become USR2 for the master,
# INT/QUIT/TERM are passed on; the herder exits once no master is left.
HERDER = """#!/usr/bin/python3
import os, signal, subprocess, sys, time
args = sys.argv[1:]
unicorn, pidfile = args[args.index("-u") + 1], args[args.index("-p") + 1]
subprocess.run([unicorn, "-D", *args[args.index("--") + 1:]], check=True)
def master():
    try:
        pid = int(open(pidfile).read()); os.kill(pid, 0); return pid
    except (OSError, ValueError):
        return None
def forward(number, frame):
    pid = master()
    if pid:
        os.kill(pid, signal.SIGUSR2 if number == signal.SIGHUP else number)
    if number in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
        sys.exit(0)
for s in (signal.SIGHUP, signal.SIGUSR2, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
    signal.signal(s, forward)
missing = 0
while missing < 3:
    time.sleep(2)
    missing = 0 if master() else missing + 1
"""
CONFIG_RU = 'run lambda { |env| [200, {"content-type" => "text/plain"}, ["release=%s secret=#{ENV["SECRET_KEY_BASE"]}\\n"]] }\n'
WSGI = """import os
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("release=%s secret=" + os.environ.get("SECRET_KEY_BASE", "")).encode() + b"\\n"]
"""
# A gem that only the app's bundle has (a path gem in the release): the release
# boots only under `bundle exec`.
GEMFILE = 'gem "unicorn"\ngem "rack"\ngem "bundled_only", path: "vendor/bundled_only"\n'
BUNDLED_GEM = {"vendor/bundled_only/bundled_only.gemspec":
               'Gem::Specification.new { |s| s.name = "bundled_only"; s.version = "1.0"; s.summary = "x"; '
               's.authors = ["app"]; s.files = ["lib/bundled_only.rb"] }\n',
               "vendor/bundled_only/lib/bundled_only.rb": "module BundledOnly; end\n"}
GUNICORN_CONF = "workers = 2\n"
VENV_GUNICORN = "#!{venv}/bin/python3\nimport sys\nfrom gunicorn.app.wsgiapp import run\nsys.exit(run())\n"


def guide() -> dict:
    """{name: (kind, text)} of the guide's marked blocks, in order."""
    blocks = re.findall(r"^<!-- (sh|file): (\S+)(?: (#\w+))? -->\n```\w*\n(.*?)^```", open(GUIDE).read(),
                        re.M | re.S)
    return {name + version: (kind, text) for kind, name, version, text in blocks}


def test_guide_blocks_are_found():
    blocks = guide()
    for name in ("install", "herder-switch", "runit-remove", "deploy-app", "gunicorn-switch", "plain-switch",
                 "/etc/sv/app/run#plain", "RELEASE/config/unicorn.rb#plain",
                 "/etc/unicorn-shim/app.conf", "/etc/unicorn-shim/pyapp.conf", "RELEASE/config/unicorn.rb",
                 "/etc/systemd/system/app.service", "/etc/unicorn-shim/app.conf#forking", "forking-switch",
                 "/etc/systemd/system/puma.service",
                 "RELEASE/config/puma.rb", "/etc/unicorn-shim/app.conf#puma", "puma-config", "puma-switch"):
        assert name in blocks


class Host:
    """A booted Debian 12 with the package's .deb at hand."""

    def __init__(self, ct: RebootableContainer, deb_path: str) -> None:
        self.ct = ct
        self.blocks = guide()
        shutil.copy(deb_path, ct.share)

    def run(self, *cmd: str, check: bool = True):
        return self.ct.run(*cmd, check=check)

    def sh(self, script: str, check: bool = True):
        return self.run("sh", "-ec", script, check=check)

    def write(self, path: str, text: str, mode: str = "644") -> None:
        with open(os.path.join(self.ct.share, "file"), "w") as f:
            f.write(text)
        self.sh(f"mkdir -p '{os.path.dirname(path)}' && install -m {mode} /mnt/share/file '{path}'")

    def step(self, name: str, release: str = "", mode: str = "644"):
        """One block of the guide: a file written where it says, or a script run as root."""
        kind, text = self.blocks[name]
        if kind == "file":
            self.write(name.split("#")[0].replace("RELEASE", release), text, mode)
            return None
        r = self.sh("cd /mnt/share\n" + text, check=False)
        assert r.returncode == 0, (name, r.stdout[-3000:], r.stderr[-3000:], self.journal())
        return r

    def journal(self) -> str:
        return self.run("journalctl", "-b", "--no-pager", "-n", "60", check=False).stdout

    def get(self) -> str:
        return self.run("curl", "-sS", "--max-time", "30", "http://127.0.0.1/", check=False).stdout.strip()

    def wait_for(self, body: str) -> None:
        deadline = time.monotonic() + 60
        while self.get() != body and time.monotonic() < deadline:
            time.sleep(0.5)
        assert self.get() == body, self.journal()

    def poll(self):
        """The client; returns a function that stops it and gives its result."""
        with open(os.path.join(self.ct.share, "poll.py"), "w") as f:
            f.write(POLL)
        proc = self.ct.popen("python3", "/mnt/share/poll.py", "/mnt/share/stop-polling")
        time.sleep(1)

        def stop() -> dict:
            open(os.path.join(self.ct.share, "stop-polling"), "w").close()
            result = json.loads(proc.communicate(timeout=120)[0])
            if result["failed"]:
                result["nginx"] = self.run("tail", "-n", "5", "/var/log/nginx/error.log").stdout
            return result
        return stop

    def master_env(self, unit: str) -> str:
        pid = self.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()
        return self.run("cat", f"/proc/{pid}/environ").stdout


@pytest.fixture
def host(deb, base_dir):
    ct = RebootableContainer(image("bookworm-migrate"), base_dir)
    try:
        h = Host(ct, deb)
        h.run("rm", "-f", "/etc/nginx/sites-enabled/default")
        yield h
    finally:
        ct.down()


def served_throughout(host: Host, stop, unit: str) -> None:
    """The client saw no failure from before the switch-over to after the first
    deploy, the old release then the new one; the master has the app's environment."""
    time.sleep(1)
    result = stop()
    assert result["failed"] == 0 and result["ok"] > 0, json.dumps(result, indent=1)
    assert result["bodies"] == [f"release=r1 secret={SECRET}", f"release=r2 secret={SECRET}"], result
    assert host.get() == f"release=r2 secret={SECRET}"
    assert f"SECRET_KEY_BASE={SECRET}" in host.master_env(unit)


def restart_and_reboot_keep_serving(host: Host, unit: str, old_gone) -> None:
    """The socket belongs to the socket unit: a restart of the service leaves it in
    place. After a reboot the app serves again, and only through the shim."""
    host.run("systemctl", "restart", unit)
    assert host.get() == f"release=r2 secret={SECRET}"
    host.ct.reboot()
    host.wait_for(f"release=r2 secret={SECRET}")
    assert host.run("systemctl", "is-active", unit).stdout.strip() == "active"
    old_gone(host)


def ruby_release(host: Host, name: str, config: str = "RELEASE/config/unicorn.rb", bundler: bool = False) -> None:
    """A release of the Rack app with the guide's `config` block, linked as `current`."""
    d = f"/srv/app/releases/{name}"
    host.write(f"{d}/config.ru", ('require "bundled_only"\n' if bundler else "") + CONFIG_RU % name)
    host.step(config, release=d)
    if bundler:     # the deploy tool's `bundle install`, offline against Debian's gems
        host.write(f"{d}/Gemfile", GEMFILE)
        for path, text in BUNDLED_GEM.items():
            host.write(f"{d}/{path}", text)
        host.sh(f"cd {d} && HOME=/tmp bundle lock --local")
    host.sh(f"ln -sfn /srv/app/shared/tmp {d}/tmp && chown -R app:app {d} && ln -sfn {d} /srv/app/current.new "
            "&& mv -T /srv/app/current.new /srv/app/current")


def unicorn_release(host: Host, name: str, version: str = "") -> None:
    # the unicornherder case runs under Bundler (its run script's `bundle exec`)
    ruby_release(host, name, "RELEASE/config/unicorn.rb" + version, bundler=not version)


def capistrano_layout(host: Host) -> None:
    host.sh("useradd --system --no-create-home --home-dir /srv/app app && "
            "mkdir -p /srv/app/releases /srv/app/shared/tmp/sockets /srv/app/shared/tmp/pids && "
            "chown -R app:app /srv/app")


def runit_app(host: Host, version: str = "") -> str:
    """What you have: a Capistrano layout, runit running Unicorn, nginx in front;
    returns the old master's pid."""
    capistrano_layout(host)
    unicorn_release(host, "r1", version)
    host.step("/etc/sv/app/run" + version, mode="755")
    host.step("/etc/nginx/sites-enabled/app" + version)
    host.sh("ln -s /etc/sv/app /etc/service/app && systemctl reload nginx")
    host.wait_for(f"release=r1 secret={SECRET}")
    return host.run("cat", "/srv/app/shared/tmp/pids/unicorn.pid").stdout.strip()


def runit_gone(host: Host) -> None:
    """runit is gone, and nothing of it starts at boot."""
    assert host.run("pgrep", "-a", "runsv", check=False).stdout == ""
    assert host.run("pgrep", "-af", "unicornherder", check=False).stdout == ""
    assert host.run("systemctl", "is-enabled", "runit.service", check=False).stdout.strip() == "disabled"
    assert host.run("systemctl", "is-failed", "runit.service", check=False).stdout.strip() != "failed"
    assert host.run("systemctl", "is-system-running", check=False).stdout.strip() == "running", \
        host.run("systemctl", "list-units", "--failed", "--no-legend", check=False).stdout
    assert host.run("test", "-e", "/etc/service/app", check=False).returncode != 0
    assert host.run("systemctl", "is-enabled", "unicorn-shim@app.socket").stdout.strip() == "enabled"


def switch_and_deploy(host: Host, switches: tuple, config: str, release_r2) -> None:
    """Under the client's eye: the guide's switch-over blocks, then the first deploy."""
    stop = host.poll()
    for switch in switches:
        host.step(switch)
    release_r2()
    host.step(config)                # the config's change, made in the app's repository, is in r2 too
    host.step("deploy-app")
    served_throughout(host, stop, "unicorn-shim@app.service")


def runit_switch_and_deploy(host: Host, switch: str, config: str, version: str = "") -> None:
    """The switch-over, runit's service removed, the first deploy."""
    switch_and_deploy(host, (switch, "runit-remove"), config, lambda: unicorn_release(host, "r2", version))


def test_from_runit_and_unicornherder(host):
    host.write("/usr/local/bin/unicornherder", HERDER, mode="755")
    old_master = runit_app(host)

    host.step("install")
    host.step("/etc/unicorn-shim/app.conf")
    host.step("herder-pid")
    check = host.step("herder-check")
    assert "0 errors" in check.stdout, check.stdout

    runit_switch_and_deploy(host, "herder-switch", "herder-pid")
    assert host.run("kill", "-0", old_master, check=False).returncode != 0
    runit_gone(host)
    restart_and_reboot_keep_serving(host, "unicorn-shim@app.service", runit_gone)


def test_from_runit_and_plain_unicorn_on_tcp(host):
    old_master = runit_app(host, "#plain")
    host.step("install")
    host.step("/etc/unicorn-shim/app.conf#plain")
    host.step("plain-config")
    check = host.step("plain-check")
    assert "0 errors" in check.stdout, check.stdout

    runit_switch_and_deploy(host, "plain-switch", "plain-config", "#plain")
    assert host.run("kill", "-0", old_master, check=False).returncode != 0
    runit_gone(host)
    restart_and_reboot_keep_serving(host, "unicorn-shim@app.service", runit_gone)


def gunicorn_release(host: Host, name: str) -> None:
    d = f"/srv/pyapp/releases/{name}"
    host.write(f"{d}/app.py", WSGI % name)
    host.write(f"{d}/gunicorn.conf.py", GUNICORN_CONF)
    host.sh(f"python3 -m venv --system-site-packages --without-pip {d}/venv")
    host.write(f"{d}/venv/bin/gunicorn", VENV_GUNICORN.format(venv=f"{d}/venv"), mode="755")
    host.sh(f"chown -R pyapp:pyapp {d} && ln -sfn {d} /srv/pyapp/current.new && "
            "mv -T /srv/pyapp/current.new /srv/pyapp/current")


def units_gone(host: Host, pattern: str, *paths: str) -> None:
    """No unit of `pattern` is loaded or enabled at boot, and none of `paths` is left."""
    units = host.run("systemctl", "list-units", "--all", "--plain", "--no-legend", pattern).stdout
    assert units.strip() == "", units
    files = host.run("systemctl", "list-unit-files", "--plain", "--no-legend", pattern, check=False).stdout
    assert files.strip() == "", files
    for path in paths:
        assert host.run("test", "-e", path, check=False).returncode != 0, path


def gunicorn_gone(host: Host) -> None:
    units_gone(host, "gunicorn*", "/run/gunicorn.sock")


def test_from_gunicorns_documented_unit(host):
    host.sh("useradd --system --no-create-home --home-dir /srv/pyapp pyapp && mkdir -p /srv/pyapp/releases")
    gunicorn_release(host, "r1")
    # What you have: Gunicorn's documented units, nginx in front.
    host.step("/etc/systemd/system/gunicorn.socket")
    host.step("/etc/systemd/system/gunicorn.service")
    host.step("/etc/nginx/sites-enabled/pyapp")
    host.sh("systemctl daemon-reload && systemctl enable --now gunicorn.socket gunicorn.service && "
            "systemctl reload nginx")
    host.wait_for(f"release=r1 secret={SECRET}")

    host.step("install")
    host.step("/etc/unicorn-shim/pyapp.conf")
    check = host.step("gunicorn-check")
    assert "0 errors" in check.stdout, check.stdout

    stop = host.poll()
    host.step("gunicorn-switch")
    gunicorn_release(host, "r2")
    host.step("gunicorn-deploy")
    served_throughout(host, stop, "unicorn-shim@pyapp.service")

    # Gunicorn's units are gone; the master runs the new release's virtualenv
    gunicorn_gone(host)
    pid = host.run("systemctl", "show", "-p", "MainPID", "--value", "unicorn-shim@pyapp.service").stdout.strip()
    assert "/srv/pyapp/releases/r2/venv/bin/python3" in host.run("cat", f"/proc/{pid}/cmdline").stdout
    restart_and_reboot_keep_serving(host, "unicorn-shim@pyapp.service", gunicorn_gone)


def forking_gone(host: Host) -> None:
    units_gone(host, "app.service", "/etc/systemd/system/multi-user.target.wants/app.service")
    assert host.run("pgrep", "-a", "-u", "app", "-f", " -D -c ", check=False).stdout == ""   # its master, workers


def test_from_a_type_forking_unit(host):
    capistrano_layout(host)
    ruby_release(host, "r0", bundler=True)
    # What you have: Unicorn daemonized under a Type=forking unit, nginx in front,
    # a deploy by USR2 that systemd follows through the pid file.
    host.step("/etc/systemd/system/app.service")
    host.step("/etc/nginx/sites-enabled/app")
    host.sh("systemctl daemon-reload && systemctl enable --now app.service && systemctl reload nginx")
    host.wait_for(f"release=r0 secret={SECRET}")
    ruby_release(host, "r1", bundler=True)
    host.run("systemctl", "reload", "app.service", check=True)
    host.wait_for(f"release=r1 secret={SECRET}")
    old_master = host.run("systemctl", "show", "-p", "MainPID", "--value", "app.service").stdout.strip()
    assert old_master == host.run("cat", "/srv/app/shared/tmp/pids/unicorn.pid").stdout.strip()

    host.step("install")
    host.step("/etc/unicorn-shim/app.conf#forking")
    host.step("herder-pid")
    check = host.step("herder-check")
    assert "0 errors" in check.stdout, check.stdout

    switch_and_deploy(host, ("forking-switch",), "herder-pid", lambda: ruby_release(host, "r2", bundler=True))
    # the deploy's master runs under Bundler with the new release's Gemfile
    assert "BUNDLE_GEMFILE=/srv/app/releases/r2/Gemfile\0" in host.master_env("unicorn-shim@app.service")
    assert host.run("kill", "-0", old_master, check=False).returncode != 0
    forking_gone(host)
    restart_and_reboot_keep_serving(host, "unicorn-shim@app.service", forking_gone)


def puma_gone(host: Host) -> None:
    units_gone(host, "puma*")
    assert host.run("pgrep", "-af", "tcp://127.0.0.1:3000", check=False).stdout == ""
    assert host.run("curl", "-sS", "--max-time", "5", "http://127.0.0.1:3000/", check=False).returncode != 0


def test_from_pumas_documented_unit(host):
    capistrano_layout(host)
    ruby_release(host, "r0", "RELEASE/config/puma.rb")
    # What you have: Puma's documented socket and notify units, nginx in front,
    # a deploy by USR1 (a phased restart into the release `current` points to).
    host.step("/etc/systemd/system/puma.socket")
    host.step("/etc/systemd/system/puma.service")
    host.step("/etc/nginx/sites-enabled/app#puma")
    host.sh("systemctl daemon-reload && systemctl enable --now puma.socket puma.service && systemctl reload nginx")
    host.wait_for(f"release=r0 secret={SECRET}")
    ruby_release(host, "r1", "RELEASE/config/puma.rb")
    host.run("systemctl", "reload", "puma.service", check=True)
    host.wait_for(f"release=r1 secret={SECRET}")
    old_master = host.run("systemctl", "show", "-p", "MainPID", "--value", "puma.service").stdout.strip()

    host.step("install")
    host.step("/etc/unicorn-shim/app.conf#puma")
    host.step("puma-config")
    check = host.step("puma-check")
    assert "0 errors" in check.stdout, check.stdout

    switch_and_deploy(host, ("puma-switch",), "puma-config",
                      lambda: ruby_release(host, "r2", "RELEASE/config/puma.rb"))
    assert host.run("kill", "-0", old_master, check=False).returncode != 0
    puma_gone(host)
    restart_and_reboot_keep_serving(host, "unicorn-shim@app.service", puma_gone)
