"""Issues 24.3 and 23.3 on Debian 13 (Ruby 3.3, systemd 257 as PID 1 of a booted container):
the classic guides' before_fork calls File.exists?, which Ruby 3.2 removed. A real
start fails on it; `unicorn-shim check` then names File.exists? from the reason the
shim recorded, says a start (not a reload) is what follows a fix when no shim runs,
and flags the hook in a release before it is started. For DynamicUser=yes, where check
runs no release code, the command it prints to check by hand works as printed."""
from __future__ import annotations

import json
import time

import pytest

from check_fixtures import finding
from support import classic
from support.containers import Container, image
from support.deploy import REPO

SHIM = "/mnt/repo/bin/unicorn-shim"
# The classic guides' config with its before_fork as they print it (File.exists?); without
# its own `listen`, which the shim's socket unit replaces.
UNICORN_RB = "\n".join(line for line in classic.CLASSIC_UNICORN_RB.format(preload="true", before_exec="", quit_oldbin=classic.QUIT_OLDBIN).splitlines()
                       if not line.startswith("listen ")).replace("File.exist?(", "File.exists?(") + "\n"
CONFIG_RU = 'run ->(env) { [200, {"content-type" => "text/plain"}, ["release={name}\\n"]] }\n'
SERVICE = f"""\
[Unit]
Requires=app.socket
After=app.socket
[Service]
Type=notify
NotifyAccess=all
User=app
Group=app
WorkingDirectory=/srv/app/current
RuntimeDirectory=app
StateDirectory=app
ExecStart={SHIM} run --pid-file /srv/app/current/tmp/pids/unicorn.pid --chdir /srv/app/current \\
    -- unicorn -c config/unicorn.rb -E production
ExecReload={SHIM} reload
TimeoutStartSec=150
KillSignal=SIGQUIT
"""
SOCKET = "[Socket]\nListenStream=127.0.0.1:8080\n"


@pytest.fixture
def debian13(base_dir):
    ct = Container(image("trixie"), base_dir, binds=[f"{REPO}:/mnt/repo"], unified_cgroup=True)
    try:
        yield ct
    finally:
        ct.down()


def write(ct: Container, path: str, text: str) -> None:
    ct.run("python3", "-c", f"open({path!r}, 'w').write({text!r})", check=True)


def release(ct: Container, name: str, config: str, owner: str = "app") -> None:
    d = f"/srv/app/releases/{name}"
    ct.run("mkdir", "-p", f"{d}/config", check=True)
    write(ct, f"{d}/config/unicorn.rb", config)
    write(ct, f"{d}/config.ru", CONFIG_RU.replace("{name}", name))
    ct.run("sh", "-c", f"ln -sfn /srv/app/shared/tmp {d}/tmp && ln -sfn {d} /srv/app/current.new && "
           f"mv -T /srv/app/current.new /srv/app/current && chown -R {owner}: /srv/app", check=True)


def state(ct: Container) -> dict:
    r = ct.run("cat", "/var/lib/app/state.json")
    return json.loads(r.stdout) if r.returncode == 0 else {}


def until(what, deadline_s: float = 60.0):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.3)
    return what()


def test_file_exists_is_named_and_the_fix_fits_what_runs(debian13):
    ct = debian13
    assert ct.run("ruby", "-e", "print RUBY_VERSION").stdout >= "3.2"
    ct.run("useradd", "--system", "--create-home", "--home-dir", "/srv/app", "app", check=True)
    ct.run("mkdir", "-p", "/srv/app/shared/tmp/pids", "/srv/app/shared/tmp/sockets", check=True)
    write(ct, "/etc/systemd/system/app.service", SERVICE)
    write(ct, "/etc/systemd/system/app.socket", SOCKET)
    ct.run("systemctl", "daemon-reload", check=True)
    release(ct, "r1", UNICORN_RB)

    # Before any start: the hook itself, read from the config as Unicorn loaded it.
    r = ct.run(SHIM, "check", "app")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: the config's before_fork calls File.exists?, which this Ruby (3." in r.stdout, r.stdout
    assert "(gone since 3.2): the master dies before its first worker starts" in r.stdout

    # A real start fails on it; the shim records why.
    assert ct.run("systemctl", "start", "app.service", timeout=200).returncode != 0
    recorded = until(lambda: state(ct).get("last_failed_reason"))
    assert recorded and "exists?" in recorded, (state(ct), ct.run("journalctl", "-u", "app", "--no-pager").stdout[-3000:])
    r = ct.run(SHIM, "check", "app")
    f = finding(r.stdout, "error: /srv/app/current points at /srv/app/releases/r1, the release whose last start")
    assert "File.exists? is gone since Ruby 3.2 (the classic config's before_fork calls it)" in f, f
    assert "no shim is running: `systemctl start app.service` would start the broken release first" in f, f
    assert f.endswith("fix: deploy a release whose config calls File.exist? instead, then systemctl start "
                      "app.service"), f

    # Fixed and started; then a broken deploy whose reload fails while r2's shim serves.
    release(ct, "r2", UNICORN_RB.replace("File.exists?", "File.exist?"))
    assert ct.run("systemctl", "start", "app.service", timeout=200).returncode == 0, \
        ct.run("journalctl", "-u", "app", "--no-pager").stdout[-3000:]
    release(ct, "r3", UNICORN_RB)
    assert ct.run("systemctl", "reload", "app.service", timeout=200).returncode != 0
    until(lambda: state(ct).get("last_failed_release") == "/srv/app/releases/r3")
    r = ct.run(SHIM, "check", "app")
    f = finding(r.stdout, "error: /srv/app/current points at /srv/app/releases/r3, the release whose last start")
    assert "the running master serves /srv/app/releases/r2: a restart or reboot would start the broken" in f, f
    assert "fix: flip it back: ln -sfn /srv/app/releases/r2 /srv/app/current.tmp && mv -T /srv/app/current.tmp " \
           "/srv/app/current; or deploy a release whose config calls File.exist? instead, then systemctl reload " \
           "app.service" in f, f


def test_the_by_hand_check_for_a_dynamic_user_runs_as_printed(debian13):
    """check evaluates nothing for DynamicUser=yes; the command it prints instead runs
    the same evaluation under a dynamic user of systemd's own, and it works as printed."""
    ct = debian13
    ct.run("mkdir", "-p", "/srv/app/shared/tmp/pids", check=True)
    release(ct, "r1", UNICORN_RB.replace("File.exists?", "File.exist?"), owner="root")
    ct.run("chmod", "-R", "a+rX", "/srv/app", check=True)
    write(ct, "/etc/systemd/system/app.service", SERVICE.replace("User=app\nGroup=app\n", "DynamicUser=yes\n"))
    write(ct, "/etc/systemd/system/app.socket", SOCKET)
    ct.run("systemctl", "daemon-reload", check=True)
    r = ct.run(SHIM, "check", "app")
    f = finding(r.stdout, "cannot tell: the unicorn config: not evaluated: DynamicUser=yes")
    prefix = "    to tell: run what check would, as a dynamic user (it prints the config as the server loads it): "
    command = f.splitlines()[1]
    assert command.startswith(prefix + "systemd-run --wait --pipe -p DynamicUser=yes"), f
    r = ct.run("sh", "-c", command[len(prefix):], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout.split("unicorn-shim-eval: ", 1)[1])
    assert report["pid"] == "/srv/app/current/tmp/pids/unicorn.pid", report
    # Unicorn's own check, as a user who owns nothing here: not root, which could write there.
    assert report["error"] == "ArgumentError: directory for pid=/srv/app/current/tmp/pids/unicorn.pid not writable"
