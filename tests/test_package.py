"""The Debian package, installed with apt into a booted systemd (PID 1 of a
systemd-nspawn container) of Debian 12 (systemd 252) and Debian 13 (systemd 257):
one .deb runs an app through the templated units on both; and the RPM builds
with the expected files.

The images are cached (tests/support/containers.py) with the package's
dependencies pre-seeded, so the containers need no network."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from support.containers import Container, RebootableContainer, image
from support.deploy import REPO

CONFIG_RU = """run lambda { |env| [200, {"content-type" => "text/plain"}, ["release=%s\\n"]] }\n"""
BROKEN_RU = 'raise "broken release"\n' + CONFIG_RU
UNICORN_RB = """worker_processes 2
preload_app true
pid "/run/unicorn-shim/myapp/server.pid"
require "unicorn_shim"
"""
APP_CONF = """# written by the test
APP_DIR=/srv/myapp/current
SERVER_COMMAND=unicorn -c config/unicorn.rb -E production config.ru
LISTEN=127.0.0.1:8080
USER=myapp
"""
LOAD = """
import http.client, json, sys, time
end = time.monotonic() + float(sys.argv[1]); ok = failed = 0; releases = set(); errors = []
while time.monotonic() < end:
    c = http.client.HTTPConnection("127.0.0.1", 8080, timeout=10)
    try:
        c.request("GET", "/"); r = c.getresponse(); body = r.read().decode()
        if r.status == 200: ok += 1; releases.add(body.strip())
        else: failed += 1; errors.append(r.status)
    except Exception as e:
        failed += 1; errors.append(type(e).__name__)
    finally:
        c.close()
print(json.dumps({"ok": ok, "failed": failed, "releases": sorted(releases), "errors": errors[:5]}))
"""


@pytest.fixture(params=["bookworm", "trixie"])
def container(request, base_dir):
    ct = Container(image(request.param), base_dir, unified_cgroup=request.param != "bookworm")

    def run(*cmd, check=False, timeout=300):
        return ct.run(*cmd, check=check, timeout=timeout)
    run.popen = ct.popen
    run.suite = request.param
    try:
        yield run, ct.share
    finally:
        ct.down()


def write_release(run, name, broken=False):
    d = f"/srv/myapp/releases/{name}"
    run("mkdir", "-p", f"{d}/config", check=True)
    run("python3", "-c", f"open('{d}/config.ru','w').write({(BROKEN_RU if broken else CONFIG_RU) % name!r});"
        f"open('{d}/config/unicorn.rb','w').write({UNICORN_RB!r})", check=True)
    run("sh", "-c", f"ln -sfn {d} /srv/myapp/current.new && mv -T /srv/myapp/current.new /srv/myapp/current "
        "&& chown -R myapp:myapp /srv/myapp", check=True)


def test_deb_installs_and_runs_an_app_through_the_templates(deb, container):
    run, share = container
    # The app and its conf are there before the package (a deploy tool's order): the
    # package's own daemon-reload runs the generator, `enable --now` works at once.
    run("useradd", "--system", "--create-home", "--home-dir", "/srv/myapp", "myapp", check=True)
    write_release(run, "r1")
    run("mkdir", "-p", "/etc/unicorn-shim", check=True)
    run("python3", "-c", f"open('/etc/unicorn-shim/myapp.conf','w').write({APP_CONF!r})", check=True)
    shutil.copy(deb, share)
    r = run("apt-get", "install", "-y", f"/mnt/share/{os.path.basename(deb)}")   # no network inside: deps are pre-seeded
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout[-2000:] + r.stderr[-2000:]
    assert run("unicorn-shim", "--version").stdout.startswith("unicorn-shim ")
    assert run("test", "-f", "/usr/share/man/man1/unicorn-shim.1.gz").returncode == 0
    # the configs' readiness hooks load from Ruby's own path, outside the shim too (doing nothing there)
    hooks = run("ruby", "-e", 'require "unicorn_shim"; require "unicorn_shim_puma"; puts :loaded')
    assert hooks.stdout.strip() == "loaded", hooks.stderr

    # the templates are valid units as installed, and so is the configured app
    # (--man=no: the image has no man-db to look the man page up with)
    verify = run("systemd-analyze", "verify", "--man=no", "/usr/lib/systemd/system/unicorn-shim@.socket",
                 "/usr/lib/systemd/system/unicorn-shim@.service")
    assert verify.returncode == 0 and "unicorn-shim" not in verify.stdout + verify.stderr, verify
    verify = run("systemd-analyze", "verify", "--man=no", "--generators=yes", "unicorn-shim@myapp.socket",
                 "unicorn-shim@myapp.service")     # as the README tells an operator
    assert verify.returncode == 0 and "unicorn-shim" not in verify.stdout + verify.stderr, verify

    r = run("systemctl", "enable", "--now", "unicorn-shim@myapp.socket")
    assert r.returncode == 0, r.stderr
    assert run("systemctl", "is-enabled", "unicorn-shim@myapp.socket").stdout.strip() == "enabled"
    for unit in ("unicorn-shim@myapp.socket", "unicorn-shim@myapp.service"):
        deadline = time.monotonic() + 60
        while run("systemctl", "is-active", unit).stdout.strip() != "active" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run("systemctl", "is-active", unit).stdout.strip() == "active", \
            run("journalctl", "-u", unit, "--no-pager").stdout[-3000:]
    assert run("curl", "-s", "127.0.0.1:8080/").stdout.strip() == "release=r1"
    show = dict(line.split("=", 1) for line in run("systemctl", "show", "unicorn-shim@myapp.service", "-p",
                                                     "MainPID,User,KillSignal").stdout.splitlines())
    assert show["User"] == "myapp"
    master = show["MainPID"]
    assert "unicorn master" in run("ps", "-o", "args=", "-p", master).stdout
    assert run("ps", "-o", "user=", "-p", master).stdout.strip() == "myapp"

    # a good deploy under load
    with open(os.path.join(share, "load.py"), "w") as f:
        f.write(LOAD)
    load = run.popen("python3", "/mnt/share/load.py", "6")
    time.sleep(1)
    write_release(run, "r2")
    r = run("systemctl", "reload", "unicorn-shim@myapp")
    assert r.returncode == 0, r.stderr + run("journalctl", "-u", "unicorn-shim@myapp", "--no-pager").stdout[-3000:]
    result = json.loads(load.communicate(timeout=60)[0])
    assert result["failed"] == 0 and result["ok"] > 0, result
    assert result["releases"] == ["release=r1", "release=r2"]
    assert run("curl", "-s", "127.0.0.1:8080/").stdout.strip() == "release=r2"

    # a bad deploy: visible failure, the old release serves on
    write_release(run, "r3", broken=True)
    r = run("systemctl", "reload", "unicorn-shim@myapp")
    assert r.returncode != 0
    assert run("curl", "-s", "127.0.0.1:8080/").stdout.strip() == "release=r2"

    # the journal shows the shim's events with their fields (once journald has read them all)
    run("journalctl", "--sync")
    entries = [json.loads(line) for line in run("journalctl", "-u", "unicorn-shim@myapp", "-o", "json",
                                                "SYSLOG_IDENTIFIER=unicorn-shim").stdout.splitlines()]
    events = {e.get("SHIM_EVENT"): e for e in entries}
    assert {"ready", "reload-start", "reload-done", "reload-failed", "retired"} <= set(events)
    assert events["reload-done"]["GENERATION"] == "2" and events["reload-done"]["RELEASE"].endswith("/r2")
    assert "exited" in events["reload-failed"]["REASON"]
    # the template's kill line reached the shim, and each `systemctl reload` was one reload
    assert events["signal"]["SIGNAL"] == "SIGHUP"
    assert [e["GENERATION"] for e in entries if e.get("SHIM_EVENT") == "reload-start"] == ["2", "3"]
    new_master = run("systemctl", "show", "-p", "MainPID", "--value", "unicorn-shim@myapp.service").stdout.strip()
    assert events["reload-done"]["MASTER_PID"] == new_master

    # a conf the generator rejects: the reason reaches the journal; no plain file
    # appears where the container has no /dev/kmsg device
    kmsg_before = run("test", "-e", "/dev/kmsg").returncode == 0
    run("sh", "-c", "printf 'APP_DIR=/srv/bad\\n' > /etc/unicorn-shim/bad.conf", check=True)
    run("systemctl", "daemon-reload", check=True)
    run("journalctl", "--sync")
    logged = run("journalctl", "-b", "--no-pager", "-t", "unicorn-shim-generator").stdout
    assert "/etc/unicorn-shim/bad.conf: SERVER_COMMAND= is missing" in logged, logged
    assert (run("test", "-e", "/dev/kmsg").returncode == 0) == kmsg_before
    assert run("test", "-f", "/dev/kmsg").returncode != 0
    run("rm", "/etc/unicorn-shim/bad.conf", check=True)

    # purge (the operator's conf gone first): everything stops, what the package
    # installed is gone, and dpkg finds no directory of its own it cannot remove:
    # units and generator live under /usr/lib, shared with systemd on Debian 13.
    # Debian 12's systemd still lists its generators under /lib, so there dpkg
    # alone owns /usr/lib/systemd/system-generators and says it is not empty.
    run("rm", "/etc/unicorn-shim/myapp.conf", check=True)
    r = run("apt-get", "purge", "-y", "unicorn-shim")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in (r.stdout + r.stderr).splitlines() if "warning" in line.lower()]
    expected = {"bookworm": ["dpkg: warning: while removing unicorn-shim, directory "
                             "'/usr/lib/systemd/system-generators' not empty so not removed"]}
    assert warnings == expected.get(run.suite, []), r.stdout + r.stderr
    assert run("pgrep", "-f", "unicorn").stdout == ""
    for path in ("/usr/bin/unicorn-shim", "/usr/lib/systemd/system/unicorn-shim@.service",
                 "/usr/lib/systemd/system/unicorn-shim@.socket",
                 "/usr/lib/systemd/system-generators/unicorn-shim-generator", "/usr/lib/ruby/vendor_ruby/unicorn_shim.rb",
                 "/usr/lib/ruby/vendor_ruby/unicorn_shim_puma.rb",
                 "/etc/systemd/system/sockets.target.wants/unicorn-shim@myapp.socket",
                 "/run/systemd/generator/unicorn-shim@myapp.socket.d"):
        assert run("test", "-e", path).returncode != 0, path
    assert run("systemctl", "cat", "unicorn-shim@myapp.socket").returncode != 0
    assert run("curl", "-s", "--max-time", "2", "127.0.0.1:8080/").returncode != 0


@pytest.mark.parametrize("container", ["bookworm"], indirect=True)
def test_per_app_commands_and_the_deploy_users_sudoers_example(deb, container):
    """`unicorn-shim reload/status APP` on the packaged units, from root, from the app's
    user, and from a deploy user through the shipped sudoers example, which lets it
    reload its own app only."""
    run, share = container
    shutil.copy(deb, share)
    assert run("apt-get", "install", "-y", f"/mnt/share/{os.path.basename(deb)}").returncode == 0
    for user in ("myapp", "other", "deploy"):
        run("useradd", "--system", "--create-home", "--home-dir", f"/srv/{user}", user, check=True)
    for app, port in (("myapp", 8080), ("other", 8081)):
        write_app_release(run, app, "r1")
        run("python3", "-c", f"open('/etc/unicorn-shim/{app}.conf','w').write("
            f"{APP_CONF.replace('myapp', app).replace('8080', str(port))!r})", check=True)
    run("systemctl", "daemon-reload", check=True)
    run("systemctl", "enable", "--now", "unicorn-shim@myapp.socket", "unicorn-shim@other.socket", check=True)

    def as_user(user, *cmd):
        return run("runuser", "-u", user, "--", *cmd)

    def serving(*status):
        return status[-1].returncode == 0 and json.loads(status[-1].stdout)["state"] == "serving"

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:      # the services start with their sockets
        status = run("unicorn-shim", "status", "myapp", "--json")
        if serving(status) and serving(as_user("other", "unicorn-shim", "status", "other", "--json")):
            break
        time.sleep(0.3)
    assert serving(status), status.stdout + status.stderr
    main_pid = run("systemctl", "show", "-p", "MainPID", "--value", "unicorn-shim@myapp.service").stdout.strip()
    assert json.loads(status.stdout)["master_pid"] == int(main_pid)
    r = run("unicorn-shim", "status", "--unit", "unicorn-shim@myapp")
    assert r.returncode == 0 and f"master {main_pid}" in r.stdout, r.stderr
    # the installed entry point (ExecReload=) loads none of what only `run` needs
    r = run("python3", "-X", "importtime", "/usr/bin/unicorn-shim", "status", "myapp")
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert r.returncode == 0 and "shim" in loaded and not loaded & {"asyncio", "psutil", "systemd", "argparse"}

    write_app_release(run, "myapp", "r2")
    r = run("unicorn-shim", "reload", "myapp")
    assert r.returncode == 0 and r.stdout.startswith("reloaded: generation 2"), r.stderr
    write_app_release(run, "myapp", "r3")
    r = as_user("myapp", "unicorn-shim", "reload", "myapp")          # the app's own user
    assert r.returncode == 0, r.stderr
    assert run("curl", "-s", "127.0.0.1:8080/").stdout.strip() == "release=r3"
    r = run("unicorn-shim", "reload", "nosuchapp")
    assert r.returncode == 9 and "no such app 'nosuchapp'" in r.stderr

    # a deploy user with no rights: told who may, and where the example is
    r = as_user("deploy", "unicorn-shim", "reload", "myapp")
    assert r.returncode == 9 and "Permission denied" in r.stderr and "its user myapp" in r.stderr
    assert "/usr/share/doc/unicorn-shim/examples" in r.stderr
    assert run("test", "-f", "/usr/share/doc/unicorn-shim/examples/sudoers-deploy").returncode == 0

    # the shipped example, both variants, installed as its comments say
    run("sh", "-c", "sed 's/^#deploy/deploy/' /usr/share/doc/unicorn-shim/examples/sudoers-deploy > /tmp/sd && "
        "visudo -cf /tmp/sd && install -m 0440 /tmp/sd /etc/sudoers.d/unicorn-shim-myapp", check=True)
    write_app_release(run, "myapp", "r4")
    r = as_user("deploy", "sudo", "-n", "-u", "myapp", "unicorn-shim", "reload", "myapp")
    assert r.returncode == 0 and "generation 4" in r.stdout, r.stderr
    r = as_user("deploy", "sudo", "-n", "-u", "myapp", "unicorn-shim", "status", "myapp", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["generation"] == 4
    write_app_release(run, "myapp", "r5", broken=True)
    r = as_user("deploy", "sudo", "-n", "-u", "myapp", "unicorn-shim", "reload", "myapp")
    assert r.returncode == 10 and "reload failed" in r.stderr
    write_app_release(run, "myapp", "r6")
    assert as_user("deploy", "sudo", "-n", "systemctl", "reload", "unicorn-shim@myapp.service").returncode == 0
    assert run("curl", "-s", "127.0.0.1:8080/").stdout.strip() == "release=r6"
    # ... and nothing else: not the other app, not another verb, not another user
    for cmd in (("-u", "other", "unicorn-shim", "reload", "other"), ("-u", "myapp", "unicorn-shim", "reload", "other"),
                ("-u", "myapp", "unicorn-shim", "reload", "--control", "/run/unicorn-shim/other/control.sock"),
                ("systemctl", "reload", "unicorn-shim@other.service"),
                ("systemctl", "restart", "unicorn-shim@myapp.service"), ("-u", "myapp", "sh")):
        r = as_user("deploy", "sudo", "-n", *cmd)
        assert r.returncode == 1 and "password is required" in r.stderr, (cmd, r.stderr)
    assert run("unicorn-shim", "status", "other", "--json").stdout.count('"generation": 1') == 1


def write_app_release(run, app, name, broken=False):
    d = f"/srv/{app}/releases/{name}"
    run("mkdir", "-p", f"{d}/config", check=True)
    config = UNICORN_RB.replace("/myapp/", f"/{app}/")
    run("python3", "-c", f"open('{d}/config.ru','w').write({(BROKEN_RU if broken else CONFIG_RU) % name!r});"
        f"open('{d}/config/unicorn.rb','w').write({config!r})", check=True)
    run("sh", "-c", f"ln -sfn {d} /srv/{app}/current.new && mv -T /srv/{app}/current.new /srv/{app}/current "
        f"&& chown -R {app}:{app} /srv/{app}", check=True)


def test_rpm_builds_with_its_files():
    r = subprocess.run([os.path.join(REPO, "packaging", "build-rpm")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rpm = r.stdout.strip().splitlines()[-1]
    files = subprocess.run(["rpm", "-qlp", os.path.join(REPO, rpm)], capture_output=True, text=True).stdout.split()
    for expected in ("/usr/bin/unicorn-shim", "/usr/lib/systemd/system/unicorn-shim@.service",
                     "/usr/lib/systemd/system/unicorn-shim@.socket",
                     "/usr/lib/systemd/system-generators/unicorn-shim-generator",
                     "/usr/share/man/man1/unicorn-shim.1.gz"):
        assert expected in files or expected[:-3] in files, (expected, files)
    assert any(f.endswith("/shim/runtime/supervisor.py") for f in files)
    assert any(f.endswith("/shim/hooks/ruby/unicorn_shim.rb") for f in files)
    assert any(f.endswith("/ruby/vendor_ruby/unicorn_shim.rb") for f in files)
    assert any(f.endswith("/ruby/vendor_ruby/unicorn_shim_puma.rb") for f in files)
    with open(os.path.join(REPO, "debian", "unicorn-shim.examples")) as f:
        examples = [os.path.basename(line.strip()) for line in f if line.strip()]
    shipped = {os.path.basename(path) for path in files}
    assert [e for e in examples if e not in shipped] == [], "the .deb's examples missing from the RPM"
    scripts = subprocess.run(["rpm", "-qp", "--scripts", os.path.join(REPO, rpm)], capture_output=True,
                             text=True).stdout
    assert "systemctl stop 'unicorn-shim@*.socket' 'unicorn-shim@*.service'" in scripts
    assert "daemon-reload" in scripts and "%systemd" not in scripts


def test_a_reboot_after_a_failed_deploy_serves_the_last_good_release(deb, base_dir):
    """Debian 12 booted with the .deb: good r2, bad r3 (`current` left on r3, as deploy
    tools leave it), then `systemctl reboot` and a boot of the same root file system:
    the app serves r2, says it is degraded, and a client that starts after the boot
    has every request answered."""
    ct = RebootableContainer(image("bookworm"), base_dir)
    run = ct.run
    try:
        run("useradd", "--system", "--create-home", "--home-dir", "/srv/myapp", "myapp", check=True)
        write_release(run, "r1")
        run("mkdir", "-p", "/etc/unicorn-shim", check=True)
        run("python3", "-c", f"open('/etc/unicorn-shim/myapp.conf','w').write({APP_CONF!r})", check=True)
        shutil.copy(deb, ct.share)
        run("apt-get", "install", "-y", f"/mnt/share/{os.path.basename(deb)}", check=True)
        run("systemctl", "enable", "--now", "unicorn-shim@myapp.socket", check=True)
        assert run("curl", "-s", "--max-time", "60", "127.0.0.1:8080/").stdout.strip() == "release=r1"
        write_release(run, "r2")
        assert run("systemctl", "reload", "unicorn-shim@myapp").returncode == 0
        write_release(run, "r3", broken=True)
        assert run("systemctl", "reload", "unicorn-shim@myapp").returncode != 0
        assert run("readlink", "-e", "/srv/myapp/current").stdout.strip() == "/srv/myapp/releases/r3"

        ct.reboot()
        assert len(run("journalctl", "--list-boots", "--no-pager").stdout.strip().splitlines()) == 3, \
            "two boots of one root file system (and the header)"
        with open(os.path.join(ct.share, "load.py"), "w") as f:
            f.write(LOAD)
        result = json.loads(run("python3", "/mnt/share/load.py", "4", check=True).stdout)
        assert result["failed"] == 0 and result["ok"] > 0 and result["releases"] == ["release=r2"], result

        status = run("systemctl", "status", "--no-pager", "unicorn-shim@myapp.service").stdout
        assert "Status: \"degraded: serving last good release /srv/myapp/releases/r2" in status, status
        assert "broken release" in status, status
        show = dict(line.split("=", 1) for line in run(
            "systemctl", "show", "-p", "ActiveState,SubState,NRestarts", "unicorn-shim@myapp.service").stdout.split())
        assert show == {"ActiveState": "active", "SubState": "running", "NRestarts": "0"}, show
        # the app serves, no unit failed: "running" is the truth at the system's level;
        # the degraded release is the unit's own status, above, and the journal's event
        assert run("systemctl", "is-system-running").stdout.strip() == "running"
        run("journalctl", "--sync")
        events = [json.loads(line) for line in run("journalctl", "-b", "-o", "json", "SHIM_EVENT=fallback").stdout
                  .splitlines()]
        assert len(events) == 1 and events[0]["RELEASE"] == "/srv/myapp/releases/r2", events
        assert events[0]["FAILED_RELEASE"] == "/srv/myapp/releases/r3" and "broken release" in \
            events[0]["SERVER_ERROR"], events
    finally:
        ct.down()
