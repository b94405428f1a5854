"""The shipped deploy-tool integrations (packaging/examples/ansible and
packaging/examples/capistrano), run with Debian's ansible-core and capistrano
against a fleet of three booted containers with the .deb, one app each behind
unicorn-shim@myapp.socket, under load: host1 (the canary) is Debian 13,
host2 and host3 Debian 12.

Both tools connect as the non-root user `deploy`, set up as the README says:
it owns /srv/myapp, and the packaged sudoers example and polkit rule, installed
verbatim, let it reload its app and nothing else. Both tools reload through
sudo (their default for a user other than root); Capistrano's failing rollout
goes through polkit (`systemctl reload`). What is asserted is what an operator sees: the tool's
exit status and last lines, what each host serves (curl), its `current`, the
shim's status, and no failed request.

The tools log in over real SSH (OpenSSH's client for Ansible, net-ssh for
Capistrano) to the containers' real sshd; the containers have no network, so
the transport is a ProxyCommand that starts `sshd -i` inside the container
(what inetd would do) instead of a TCP connection."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from typing import Callable, List

import pytest

from support.deploy import REPO
from support.fleet import APP_DIR, CONFIG_RU, UNICORN_RB, Host, LoadOnAll, fleet_of, in_parallel

EXAMPLES = os.path.join(REPO, "packaging", "examples")
# A release that needs a file only host1 and host3 have: it fails on host2 alone.
NEEDS_FEATURE_RU = 'File.read("/etc/myapp/feature")\n' + CONFIG_RU
FEATURE_ERROR = "/etc/myapp/feature"


@pytest.fixture(scope="module")
def hosts(deb, base_dir):  # noqa: F811 (deb: the session's fixture)
    work = tempfile.mkdtemp(prefix="fleet-tools.", dir=base_dir)
    with fleet_of(["trixie-fleet", "bookworm-fleet", "bookworm-fleet"], deb, work) as (hs, key):
        for h in (hs[0], hs[2]):
            h.run("sh", "-c", "mkdir -p /etc/myapp && echo on > /etc/myapp/feature", check=True)
        yield hs, key, work


def release_dir(parent: str, tool: str, name: str, config_ru: str = CONFIG_RU) -> str:
    d = os.path.join(parent, tool, "build", name)
    os.makedirs(os.path.join(d, "config"))
    with open(os.path.join(d, "config.ru"), "w") as f:
        f.write(config_ru % name)
    with open(os.path.join(d, "config", "unicorn.rb"), "w") as f:
        f.write(UNICORN_RB)
    return d


def last_lines(out: str, n: int) -> str:
    return "\n".join(out.rstrip().splitlines()[-n:])


def roll_out_under_load(hs: List[Host], deploy: Callable[[], subprocess.CompletedProcess], new: str) -> tuple:
    """`deploy` rolls release `new` out; it reaches every host with no failed request.
    Returns the tool's result and its run time."""
    olds = [h.serves() for h in hs]
    generations = [h.status()["generation"] for h in hs]
    with LoadOnAll(hs) as load:
        t0 = time.monotonic()
        r = deploy()
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    for h, generation, old in zip(hs, generations, olds):
        result = load.results[h.name]
        assert result["failed"] == 0 and result["ok"] > 0, (h.name, result)
        assert result["releases"] == sorted({f"release={old}", f"release={new}"}), (h.name, result)
        assert h.serves() == new, h.name
        status = h.status()
        assert status["generation"] == generation + 1 and status["release"] == h.current(), (h.name, status)
    print(f"rolled {new} out to {len(hs)} hosts in {took:.1f} s; requests:",
          {h: (x["ok"], x["failed"]) for h, x in load.results.items()})
    return r, took, load.results


def fails_on_host2_under_load(hs: List[Host], deploy: Callable[[], subprocess.CompletedProcess],
                              bad: str) -> tuple:
    """A release that fails on host2: the run fails, host1 (which had taken it) is put
    back, host3 is never touched; every host serves what it served before, with no
    failed request anywhere. Returns the tool's result and its output (stdout, stderr)."""
    before = [h.status() for h in hs]
    currents = [h.current() for h in hs]
    served = [h.serves() for h in hs]
    with LoadOnAll(hs) as load:
        r = deploy()
    out = r.stdout + r.stderr
    print(out[-3000:])                  # for the record (pytest -rP)
    assert r.returncode != 0, out[-4000:]
    for h, result in load.results.items():
        assert result["failed"] == 0 and result["ok"] > 0, (h, result)
    assert load.results["host1"]["releases"] == sorted({f"release={served[0]}", f"release={bad}"})
    for h, was, current, serving in zip(hs, before, currents, served):
        assert h.serves() == serving, h.name
        assert h.current() == current, (h.name, "current names the release that serves")
    s1, s2, s3 = (h.status() for h in hs)
    assert s1["generation"] == before[0]["generation"] + 2, "host1 took the release, then was put back"
    assert s2["generation"] == before[1]["generation"] and FEATURE_ERROR in s2["last_reload"], s2
    assert (s3["generation"], s3["last_reload"]) == (before[2]["generation"], before[2]["last_reload"])
    assert hs[2].run("test", "-d", f"{APP_DIR}/releases/{hs[2].release_named(bad)}").returncode == 0, \
        "the release was put on every host before the first one took it"
    # the reason, in the server's own words, once
    assert out.count(FEATURE_ERROR) == 1, out
    return r, out


# -- Ansible --------------------------------------------------------------------


def ansible_env(hs: List[Host], work: str, key: str) -> tuple:
    inventory = os.path.join(work, "inventory")
    with open(inventory, "w") as f:
        f.write("[app]\n")
        for h in hs:
            f.write(f"{h.name} ansible_ssh_common_args='-o ProxyCommand=\"{h.proxy}\" "
                    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n")
        f.write(f"[app:vars]\nansible_user=deploy\nansible_ssh_private_key_file={key}\n"
                "ansible_python_interpreter=/usr/bin/python3\n")
    env = dict(hs[0].ct.env, ANSIBLE_HOME=os.path.join(work, "ansible"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_SSH_CONTROL_PATH_DIR=os.path.join(work, "cp"), ANSIBLE_RETRY_FILES_ENABLED="0",
               ANSIBLE_PIPELINING="1", ANSIBLE_HOST_KEY_CHECKING="0")
    return inventory, env


def test_ansible_fleet_rollout_as_a_non_root_deploy_user(hosts):
    hs, key, work = hosts
    inventory, env = ansible_env(hs, work, key)

    def playbook(release, config_ru=CONFIG_RU, *extra, src=True):
        args = ["-e", f"release_src={release_dir(work, 'ansible', release, config_ru)}"] if src else []
        return subprocess.run(["ansible-playbook", "-i", inventory, os.path.join(EXAMPLES, "ansible", "deploy.yml"),
                               "-e", "app=myapp", "-e", f"release={release}", *args, *extra],
                              capture_output=True, text=True, env=env, timeout=600)

    # a good release, copied as deploy (no chown: deploy owns what it copies), rolls through
    r, took, _ = roll_out_under_load(hs, lambda: playbook("a2"), "a2")
    tail = last_lines(r.stdout, 16)
    assert "myapp: every host serves a2" in tail and "host1: serves a2 (took a2)" in tail, tail
    assert hs[0].run("stat", "-c", "%U", f"{APP_DIR}/releases/a2/config.ru").stdout.strip() == "deploy"

    # a release that fails on host2: host1 is put back, host3 untouched; the last lines say so
    _, out = fails_on_host2_under_load(hs, lambda: playbook("a3", NEEDS_FEATURE_RU), "a3")
    tail = last_lines(out.split("PLAY RECAP")[0], 14)
    for line in ("host1: serves a2 (had taken a3, rolled back)", "host2: serves a2 (a3 failed here: ",
                 "host3: serves a2 (not reached: a host before it failed)",
                 "myapp: a3 failed on host2; no host serves a3: every host serves the release it served before"):
        assert line in tail, (line, tail)
    recap = {line.split()[0]: line for line in out.split("PLAY RECAP")[1].splitlines() if "failed=" in line}
    assert ["failed=1" in recap[h.name] for h in hs] == [False, True, False], recap   # the host that failed

    # a re-run without release_src never publishes an empty release (what a copy that
    # failed used to leave): the canary refuses it, nothing changes anywhere
    for h in hs:
        h.run("runuser", "-u", "deploy", "--", "mkdir", f"{APP_DIR}/releases/a4", check=True)
    generations = [h.status()["generation"] for h in hs]
    r = playbook("a4", src=False)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "host1: serves a2 (a4 failed here: /srv/myapp/releases/a4 is missing or empty" in r.stdout, r.stdout
    assert [h.status()["generation"] for h in hs] == generations
    assert [h.current() for h in hs] == [f"{APP_DIR}/releases/a2"] * 3

    # the opt-out: host1 is left on the release, and the fleet is said to be mixed
    r = playbook("a5", NEEDS_FEATURE_RU, "-e", "unicorn_shim_fleet_rollback=false")
    assert r.returncode != 0
    tail = last_lines(r.stdout.split("PLAY RECAP")[0], 14)
    assert "host1: serves a5 (took a5, not rolled back: unicorn_shim_fleet_rollback is false)" in tail, tail
    assert "myapp: a5 failed on host2; the fleet is mixed: host1 serves a5, the others do not" in tail, tail
    assert [h.serves() for h in hs] == ["a5", "a2", "a2"]


# -- Capistrano -------------------------------------------------------------------

CAPFILE = """require "capistrano/setup"
require "capistrano/deploy"
require_relative "upload_scm"
install_plugin UploadSCM
import {tasks!r}
"""
# The test's SCM: the release is a local directory, uploaded to every server
# (what the git plugin's clone and archive do, without a repository).
UPLOAD_SCM = """require "capistrano/scm/plugin"
class UploadSCM < Capistrano::SCM::Plugin
  def define_tasks
    namespace :upload do
      task :create_release do
        on release_roles(:all) do
          upload! fetch(:source_dir), release_path.to_s, recursive: true
        end
      end
      task(:set_current_revision) { set :current_revision, File.basename(fetch(:source_dir)) }
    end
  end

  def register_hooks
    after "deploy:new_release_path", "upload:create_release"
    before "deploy:set_current_revision", "upload:set_current_revision"
  end
end
"""
# As the README says for a deploy user: by default through the packaged sudoers
# example, or through the packaged polkit rule.
DEPLOY_RB = """set :application, "myapp"
set :deploy_to, "/srv/myapp"
set :source_dir, ENV.fetch("SOURCE")
set :keep_releases, 10
set :unicorn_shim_reload, %w[systemctl reload unicorn-shim@myapp.service] if ENV["VIA_POLKIT"]
# The test watches SSHKit's pause between servers: each one is written down.
SSHKit::Runner::Sequential.prepend(Module.new do
  def sleep(seconds)
    File.write(ENV.fetch("PAUSES"), "#{seconds}\n", mode: "a") if seconds.to_f > 0
    super
  end
end)
"""
SERVER_RB = """server {name!r}, user: "deploy", roles: %w[app], ssh_options: {{
  proxy: Net::SSH::Proxy::Command.new({proxy!r}), keys: [{key!r}], auth_methods: ["publickey"],
  verify_host_key: :never, user_known_hosts_file: "/dev/null" }}
"""


def test_capistrano_fleet_rollout_as_a_non_root_deploy_user(hosts):
    hs, key, work = hosts
    project = os.path.join(work, "cap")
    os.makedirs(os.path.join(project, "config", "deploy"))
    files = {"Capfile": CAPFILE.format(tasks=os.path.join(EXAMPLES, "capistrano", "unicorn_shim.rake")),
             "upload_scm.rb": UPLOAD_SCM, "config/deploy.rb": DEPLOY_RB,
             "config/deploy/test.rb": "require \"net/ssh/proxy/command\"\n" + "".join(
                 SERVER_RB.format(name=h.name, proxy=h.proxy, key=key) for h in hs)}
    for name, text in files.items():
        with open(os.path.join(project, name), "w") as f:
            f.write(text)
    env = dict(hs[0].ct.env, HOME=work)

    def cap(release, config_ru=CONFIG_RU, **more_env):
        src = release_dir(work, "cap", release, config_ru)
        return subprocess.run(["cap", "test", "deploy"], cwd=project, capture_output=True, text=True,
                              env=dict(env, SOURCE=src, PAUSES=pauses, **more_env), timeout=600)
    pauses = os.path.join(work, "pauses")

    r, took, _ = roll_out_under_load(hs, lambda: cap("c4"), "c4")          # through sudo
    assert "/releases/2" in hs[0].current()          # Capistrano's own timestamped release
    assert "unicorn-shim: myapp: every server serves" in r.stdout, r.stdout[-3000:]
    # one server after the other, with no pause between them (SSHKit's default is 2 s)
    assert not os.path.exists(pauses), open(pauses).read()
    starts, dones = (hosts_events(hs, event) for event in ("reload-start", "reload-done"))
    gaps = [starts[i + 1] - dones[i] for i in range(len(hs) - 1)]
    assert all(gap > 0 for gap in gaps), gaps
    print(f"gaps between one host's reload and the next one's: {[round(g, 2) for g in gaps]} s")

    r, _ = fails_on_host2_under_load(hs, lambda: cap("c5", NEEDS_FEATURE_RU, VIA_POLKIT="1"), "c5")
    bad, was = hs[2].release_named("c5"), os.path.basename(hs[0].current())
    # the last lines: the fleet, after Capistrano's own report of the failure
    lines = last_lines(r.stderr, 4).splitlines()
    assert lines[0] == (f"unicorn-shim: myapp: {bad} failed on host2; no server serves {bad}: "
                        "every server serves the release it served before"), lines
    assert lines[1] == f"  host1: serves {was} (had taken {bad}, rolled back)", lines
    assert lines[2].startswith(f"  host2: serves {was} ({bad} failed here: last reload failed after "), lines
    assert FEATURE_ERROR in lines[2], lines
    assert lines[3] == f"  host3: serves {was} (not reached: a server before it failed)", lines


def hosts_events(hs: List[Host], event: str) -> List[float]:
    """When each host's last `event` of the shim was logged (the hosts share one clock)."""
    times = []
    for h in hs:
        h.run("journalctl", "--sync")
        entries = h.run("journalctl", "-u", "unicorn-shim@myapp", "-o", "json", f"SHIM_EVENT={event}").stdout
        times.append(int(json.loads(entries.splitlines()[-1])["__REALTIME_TIMESTAMP"]) / 1e6)
    return times


# -- what the deploy user may not do ---------------------------------------------------


def test_the_deploy_user_may_reload_its_app_and_nothing_else(hosts):
    """On Debian 13 (host1) and 12 (host2), through the packaged sudoers example and
    polkit rule: the reload works, by hand and through Ansible's systemd module with no
    `become`; another unit, another verb, a shell and odd arguments are refused, and
    the app serves on, untouched by them."""
    hs, key, work = hosts
    inventory, env = ansible_env(hs, work, key)

    def reloads_only(h: Host) -> None:
        master = h.main_pid()
        generation = h.status()["generation"]
        for cmd in (["systemctl", "stop", "unicorn-shim@myapp.service"],
                    ["systemctl", "restart", "unicorn-shim@myapp.service"],
                    ["systemctl", "kill", "unicorn-shim@myapp.service"],
                    ["systemctl", "reload", "ssh.service"],
                    ["systemctl", "reload", "unicorn-shim@myapp.socket"],
                    ["systemctl", "start", "unicorn-shim@other.service"],
                    ["sudo", "-n", "-u", "myapp", "sh"],
                    ["sudo", "-n", "-u", "myapp", "unicorn-shim", "reload", "other"],
                    ["sudo", "-n", "-u", "myapp", "unicorn-shim", "reload", "myapp", "--timeout", "1"],
                    ["sudo", "-n", "-u", "myapp", "unicorn-shim", "reload", "--control",
                     "/run/unicorn-shim/myapp/control.sock"],
                    ["sudo", "-n", "-u", "myapp", "unicorn-shim", "run", "--", "sh"],
                    ["sudo", "-n", "-u", "root", "unicorn-shim", "reload", "myapp"],
                    ["sudo", "-n", "systemctl", "reload", "unicorn-shim@myapp.service"],
                    ["sudo", "-n", "/bin/sh", "-c", "id"]):
            r = h.as_deploy(*cmd)
            assert r.returncode != 0, (h.name, cmd, r.stdout)
            said = r.stderr.lower()
            assert ("password is required" in said or "access denied" in said
                    or "interactive authentication required" in said), (h.name, cmd, r.stderr)
        assert (h.main_pid(), h.status()["generation"]) == (master, generation), h.name
        # what it may: a reload through polkit, and through sudo as the app's user
        assert h.as_deploy("systemctl", "reload", "unicorn-shim@myapp.service").returncode == 0
        r = h.as_deploy("sudo", "-n", "-u", "myapp", "unicorn-shim", "reload", "myapp")
        assert r.returncode == 0 and "generation" in r.stdout, (h.name, r.stderr)
        assert h.status()["generation"] == generation + 2

    in_parallel(reloads_only, hs[:2])

    def module(*args):
        return subprocess.run(["ansible", "-i", inventory, "host1:host2", *args], capture_output=True, text=True,
                              env=env, timeout=300)
    generations = [h.status()["generation"] for h in hs[:2]]
    r = module("-m", "ansible.builtin.systemd", "-a", "name=unicorn-shim@myapp.service state=reloaded")
    assert r.returncode == 0 and r.stdout.count("CHANGED") == 2, r.stdout + r.stderr
    assert [h.status()["generation"] for h in hs[:2]] == [g + 1 for g in generations]
    for args in ("name=unicorn-shim@myapp.service state=stopped", "name=unicorn-shim@myapp.service state=restarted",
                 "name=ssh.service state=reloaded"):
        r = module("-m", "ansible.builtin.systemd", "-a", args)
        assert r.returncode != 0 and r.stdout.count("FAILED") == 2, (args, r.stdout)
    # `become` cannot be narrowed by sudo (the module runs as /bin/sh -c '... python3 ...'),
    # to root as to the app's user
    for become in ([], ["--become-user", "myapp"]):
        r = module("-b", *become, "-m", "ansible.builtin.command", "-a", "id")
        assert r.returncode != 0 and r.stdout.count("Missing sudo password") == 2, (become, r.stdout)
    for h in hs[:2]:
        assert h.run("systemctl", "is-active", "unicorn-shim@myapp.service").stdout.strip() == "active"
        assert h.status()["release"] == h.current(), h.name
