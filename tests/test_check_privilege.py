"""Issue 23.3: `unicorn-shim check` never runs release code with more privilege than the
service has. A release's config (and its Gemfile, under `bundle exec`) writes who ran
it; check runs as root, as `sudo unicorn-shim check APP` would: the code runs as the
unit's user with that user's groups and home, or not at all (DynamicUser=, a User= that
is no user here, a caller who is neither root nor that user), and then check says so."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess

import pytest

from check_fixtures import UNIT, Layout, gemfile_lock, run_check, world_readable_dir
from support.deploy import SHIM

NOBODY = pwd.getpwnam("nobody")

# Each writes "uid euid groups HOME" to a file of its own in OUT.
RUBY_WHO = ('File.write(File.join("{out}", "{what}-#{{Process.pid}}"), '
            '[Process.uid, Process.euid, Process.groups.join(","), ENV["HOME"]].join(" "))\n')
PYTHON_WHO = ('import os\nopen(os.path.join("{out}", "{what}-%d" % os.getpid()), "w").write('
              '"%d %d %s %s" % (os.getuid(), os.geteuid(), ",".join(map(str, os.getgroups())), '
              'os.environ.get("HOME")))\n')

SERVERS = {
    "unicorn": ("bundle exec --keep-file-descriptors unicorn -c config/unicorn.rb -E production", "SIGQUIT"),
    "gunicorn": ("gunicorn -c gunicorn.conf.py app:application", "SIGTERM"),
    "puma": ("puma -C config/puma.rb -e production", "SIGTERM"),
}


def release_files(server: str, out: str) -> dict:
    if server == "unicorn":
        return {"config/unicorn.rb": RUBY_WHO.format(out=out, what="unicorn.rb") + 'pid "/run/app/server.pid"\n',
                # The Gemfile is release code too: Bundler evaluates it.
                "Gemfile": RUBY_WHO.format(out=out, what="Gemfile") + 'gem "unicorn"\n',
                "Gemfile.lock": gemfile_lock(), "config.ru": "run ->(e) { [200, {}, []] }\n"}
    if server == "puma":
        return {"config/puma.rb": RUBY_WHO.format(out=out, what="puma.rb") + "workers 2\n",
                "config.ru": "run ->(e) { [200, {}, []] }\n"}
    return {"gunicorn.conf.py": PYTHON_WHO.format(out=out, what="gunicorn.conf.py") + 'pidfile = "/run/app/server.pid"\n',
            "app.py": "def application(env, start):\n    pass\n"}


@pytest.fixture
def setup():
    root = world_readable_dir()
    out = os.path.join(root, "who")
    os.mkdir(out)
    os.chmod(out, 0o1777)     # whoever runs the config can write here: what it writes tells who that was
    yield Layout(root), out
    shutil.rmtree(root)


def unit_for(layout: Layout, server: str, user_lines: str) -> str:
    command, kill_signal = SERVERS[server]
    text = UNIT.format(pid_file="/run/app/server.pid", current=layout.current, options="", command=command,
                       kill_signal=kill_signal, extra="")
    text = text.replace("User=nobody\nGroup=nogroup\n", user_lines)
    path = os.path.join(layout.root, "app.service")
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.join(layout.root, "app.socket"), "w") as f:
        f.write("[Socket]\nListenStream=127.0.0.1:8080\n")
    return path


def who_ran(out: str) -> list:
    found = []
    for path in sorted(glob.glob(os.path.join(out, "*"))):
        with open(path) as f:
            uid, euid, groups, home = f.read().split(" ", 3)
        found.append((os.path.basename(path).rsplit("-", 1)[0], int(uid), int(euid),
                      {int(g) for g in groups.split(",") if g}, home))
    return found


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_a_known_user_runs_the_release_code_with_its_own_groups_and_home(setup, server):
    layout, out = setup
    layout.release("r1", release_files(server, out))
    r = run_check(unit_for(layout, server, "User=nobody\nGroup=nogroup\n"))
    ran = who_ran(out)
    expected = {"unicorn": {"unicorn.rb", "Gemfile"}, "gunicorn": {"gunicorn.conf.py"}, "puma": {"puma.rb"}}
    assert {what for what, *_ in ran} == expected[server], (ran, r.stdout)
    for what, uid, euid, groups, home in ran:
        assert (uid, euid, groups, home) == (NOBODY.pw_uid, NOBODY.pw_uid, {NOBODY.pw_gid}, NOBODY.pw_dir), what
    assert "not evaluated" not in r.stdout and f"cannot tell: the {server} config" not in r.stdout, r.stdout


@pytest.mark.parametrize("server", sorted(SERVERS))
@pytest.mark.parametrize("user_lines,why", [
    ("DynamicUser=yes\n", "not evaluated: DynamicUser=yes: the unit's user exists only while it runs"),
    ("User=no-such-user-x\n", "not evaluated: User=no-such-user-x is no user on this machine"),
    ("User=nobody\nGroup=no-such-group-x\n", "not evaluated: Group=no-such-group-x is no group on this machine"),
])
def test_no_release_code_runs_when_the_units_user_is_unknown(setup, server, user_lines, why):
    layout, out = setup
    layout.release("r1", release_files(server, out))
    r = run_check(unit_for(layout, server, user_lines))
    assert who_ran(out) == [], r.stdout
    assert f"cannot tell: the {server} config: {why}; check runs release code only as the unit's user" in r.stdout, \
        r.stdout
    if user_lines.startswith("DynamicUser"):
        # How to see it by hand: what check would have run, under a dynamic user of systemd's own.
        assert "to tell: run what check would, as a dynamic user" in r.stdout
        assert "systemd-run --wait --pipe -p DynamicUser=yes" in r.stdout and "unicorn_shim_eval" in r.stdout
    else:
        key = why.split(": ")[1].split("=")[0]
        status = {"User": "217/USER", "Group": "216/GROUP"}[key]
        assert r.returncode == 1 and f"status={status}" in r.stdout
        assert f"to tell: correct {key}= (or create that {key.lower()}), then check again" in r.stdout


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_a_caller_who_is_not_the_units_user_runs_nothing(setup, server):
    layout, out = setup
    layout.release("r1", release_files(server, out))
    unit = unit_for(layout, server, "User=nobody\nGroup=nogroup\n")
    caller = pwd.getpwnam("daemon")
    r = subprocess.run(["runuser", "-u", "daemon", "--", SHIM, "check", unit], capture_output=True, text=True,
                       timeout=120)
    assert who_ran(out) == [], r.stdout + r.stderr
    assert (f"cannot tell: the {server} config: not evaluated: this check runs as uid {caller.pw_uid} and the "
            "unit as nobody; check runs release code only as the unit's user; nothing in it was checked\n"
            "    to tell: check as root (it evaluates as nobody), or as nobody itself") in r.stdout, r.stdout
    # The unit's own user may: what runs is what the service would run.
    r = subprocess.run(["runuser", "-u", "nobody", "--", SHIM, "check", unit], capture_output=True, text=True,
                       timeout=120)
    assert who_ran(out) and all(uid == NOBODY.pw_uid for _w, uid, *_ in who_ran(out)), r.stdout + r.stderr
