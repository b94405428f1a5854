"""The shipped deploy-tool integrations (packaging/examples/ansible and
packaging/examples/capistrano), run with Debian's ansible-core and capistrano
against three hosts: three booted Debian 12 containers with the .deb, one app
each behind unicorn-shim@myapp.socket, under load.

The tools log in over real SSH (OpenSSH's client for Ansible, net-ssh for
Capistrano) to the containers' real sshd; the containers have no network, so
the transport is a ProxyCommand that starts `sshd -i` inside the container
(what inetd would do) instead of a TCP connection."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Callable, Dict, List

import pytest

from support.containers import HARNESS, Container, image
from support.deploy import REPO
from test_package import APP_CONF, BROKEN_RU, CONFIG_RU, UNICORN_RB
from test_package import LOAD as LOAD_FOR_SECONDS

EXAMPLES = os.path.join(REPO, "packaging", "examples")
APP_DIR = "/srv/myapp"
# The package test's client, until /mnt/share/stop appears (or 10 minutes pass).
LOAD = LOAD_FOR_SECONDS.replace("while time.monotonic() < end:",
                                "while time.monotonic() < end and not os.path.exists('/mnt/share/stop'):"
                                ).replace("import http.client,", "import os, http.client,")
assert "/mnt/share/stop" in LOAD and "import os," in LOAD


class Host:
    """One container with the package and the app, reachable over SSH."""

    def __init__(self, ct: Container, name: str) -> None:
        self.ct, self.name = ct, name
        self.proxy = f"{HARNESS}/ct-exec.sh {ct.name} /usr/sbin/sshd -i"

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.ct.run(*cmd, check=check)

    def status(self) -> dict:
        r = self.run("unicorn-shim", "status", "myapp", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def serves(self) -> str:
        return self.run("curl", "-s", "127.0.0.1:8080/").stdout.strip()

    def current(self) -> str:
        return self.run("readlink", "-e", f"{APP_DIR}/current").stdout.strip()


def set_up(ct: Container, deb_path: str, pubkey: str) -> None:
    def run(*cmd):
        return ct.run(*cmd, check=True)
    run("useradd", "--system", "--create-home", "--home-dir", APP_DIR, "myapp")
    d = f"{APP_DIR}/releases/r1"
    run("mkdir", "-p", f"{d}/config", "/etc/unicorn-shim", "/root/.ssh")
    run("python3", "-c", f"open('{d}/config.ru','w').write({CONFIG_RU % 'r1'!r});"
        f"open('{d}/config/unicorn.rb','w').write({UNICORN_RB!r});"
        f"open('/etc/unicorn-shim/myapp.conf','w').write({APP_CONF!r});"
        f"open('/root/.ssh/authorized_keys','w').write({pubkey!r})")
    run("sh", "-c", f"ln -sfn {d} {APP_DIR}/current && chown -R myapp:myapp {APP_DIR}")
    shutil.copy(deb_path, ct.share)
    run("apt-get", "install", "-y", f"/mnt/share/{os.path.basename(deb_path)}")
    run("systemctl", "enable", "--now", "unicorn-shim@myapp.socket")
    run("curl", "-s", "--max-time", "60", "127.0.0.1:8080/")       # starts the service


@pytest.fixture(scope="module")
def hosts(deb, base_dir):  # noqa: F811 (deb: the fixture imported above)
    keys = tempfile.mkdtemp(prefix="deploy-tools.", dir=base_dir)
    key = os.path.join(keys, "id_ecdsa")
    # PEM: net-ssh 7.0 cannot sign with an ECDSA key in OpenSSH's own format under OpenSSL 3
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-m", "PEM", "-N", "", "-f", key], check=True)
    pubkey = open(key + ".pub").read()
    rootfs = image("bookworm")
    cts: List[Container] = []
    try:
        for _ in range(3):
            cts.append(Container(rootfs, base_dir))
        in_parallel(lambda ct: set_up(ct, deb, pubkey), cts)
        hs = [Host(ct, f"host{i + 1}") for i, ct in enumerate(cts)]
        for h in hs:
            assert h.serves() == "release=r1" and h.status()["state"] == "serving", h.name
        yield hs, key, keys
    finally:
        in_parallel(lambda ct: ct.down(), cts)


def in_parallel(action: Callable[[Container], None], cts: List[Container]) -> None:
    """`action` on every container at once; the first error is raised here."""
    errors: List[BaseException] = []

    def act(ct: Container) -> None:
        try:
            action(ct)
        except BaseException as e:      # noqa: B902 (raised below, in the test's thread)
            errors.append(e)
    threads = [threading.Thread(target=act, args=(ct,)) for ct in cts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def release_dir(parent: str, tool: str, name: str, broken: bool = False) -> str:
    d = os.path.join(parent, tool, "build", name)
    os.makedirs(os.path.join(d, "config"))
    with open(os.path.join(d, "config.ru"), "w") as f:
        f.write((BROKEN_RU if broken else CONFIG_RU) % name)
    with open(os.path.join(d, "config", "unicorn.rb"), "w") as f:
        f.write(UNICORN_RB)
    return d


class LoadOnAll:
    """A client in each host, each asking its own app, for the duration of a `with`."""

    def __init__(self, hs: List[Host]) -> None:
        self.hosts = hs
        self.results: Dict[str, dict] = {}

    def __enter__(self) -> "LoadOnAll":
        for h in self.hosts:
            with open(os.path.join(h.ct.share, "load.py"), "w") as f:
                f.write(LOAD)
            h.run("rm", "-f", "/mnt/share/stop", check=True)
        self.procs = [h.ct.popen("python3", "/mnt/share/load.py", "600") for h in self.hosts]
        time.sleep(1)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hosts:
            open(os.path.join(h.ct.share, "stop"), "w").close()
        for h, p in zip(self.hosts, self.procs):
            self.results[h.name] = json.loads(p.communicate(timeout=60)[0])


def roll_out_under_load(hs: List[Host], deploy: Callable[[], subprocess.CompletedProcess], new: str) -> None:
    """`deploy` rolls release `new` out; it reaches every host with no failed request."""
    old = hs[0].serves().split("=")[1]
    generations = [h.status()["generation"] for h in hs]
    with LoadOnAll(hs) as load:
        r = deploy()
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    for h, generation in zip(hs, generations):
        result = load.results[h.name]
        assert result["failed"] == 0 and result["ok"] > 0, (h.name, result)
        assert result["releases"] == sorted([f"release={old}", f"release={new}"]), (h.name, result)
        assert h.serves() == f"release={new}", h.name
        status = h.status()
        assert status["generation"] == generation + 1 and status["release"] == h.current(), (h.name, status)


def assert_stopped_at_the_first(hs: List[Host], out: str, serving: str, bad_release_path: str,
                                before: List[dict], currents: List[str]) -> None:
    """`before`: each host's status before the rollout; `currents`: where its current pointed."""
    # the shim's own reason, with the server's error, in the tool's output
    print(out)                      # for the record (pytest -rP)
    assert "reload failed" in out and "broken release (RuntimeError)" in out, out
    first, rest = hs[0], hs[1:]
    assert first.serves() == f"release={serving}"
    assert first.current() == currents[0], "current is pointed back at the release that serves"
    status = first.status()
    assert status["generation"] == before[0]["generation"] and "broken release" in status["last_reload"], status
    for h, was, current in zip(rest, before[1:], currents[1:]):
        assert h.serves() == f"release={serving}", h.name
        assert h.current() == current, h.name
        status = h.status()
        assert (status["generation"], status["last_reload"]) == (was["generation"], was["last_reload"]), h.name
        assert h.run("test", "-d", bad_release_path).returncode == 0, "the release was put on every host"


def test_ansible_rolls_a_good_release_through_and_stops_a_bad_one_at_the_first_host(hosts):
    hs, key, work = hosts
    inventory = os.path.join(work, "inventory")
    with open(inventory, "w") as f:
        f.write("[app]\n")
        for h in hs:
            f.write(f"{h.name} ansible_ssh_common_args='-o ProxyCommand=\"{h.proxy}\" "
                    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n")
        f.write(f"[app:vars]\nansible_user=root\nansible_ssh_private_key_file={key}\n"
                "ansible_python_interpreter=/usr/bin/python3\n")
    env = dict(hs[0].ct.env, ANSIBLE_HOME=os.path.join(work, "ansible"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_SSH_CONTROL_PATH_DIR=os.path.join(work, "cp"), ANSIBLE_RETRY_FILES_ENABLED="0",
               ANSIBLE_PIPELINING="1")

    def playbook(release, broken=False):
        src = release_dir(work, "ansible", release, broken)
        return subprocess.run(["ansible-playbook", "-i", inventory, os.path.join(EXAMPLES, "ansible", "deploy.yml"),
                               "-e", "app=myapp", "-e", f"release={release}", "-e", f"release_src={src}"],
                              capture_output=True, text=True, env=env, timeout=600)

    roll_out_under_load(hs, lambda: playbook("a2"), "a2")

    before = [h.status() for h in hs]
    currents = [h.current() for h in hs]
    r = playbook("a3", broken=True)
    assert r.returncode == 2, r.stdout[-4000:] + r.stderr[-2000:]
    assert "fatal: [host1]: FAILED!" in r.stdout and "NO MORE HOSTS LEFT" in r.stdout, r.stdout[-4000:]
    assert_stopped_at_the_first(hs, r.stdout, "a2", f"{APP_DIR}/releases/a3", before, currents)


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
          execute :chown, "-R", "myapp:myapp", release_path
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
DEPLOY_RB = """set :application, "myapp"
set :deploy_to, "/srv/myapp"
set :source_dir, ENV.fetch("SOURCE")
set :keep_releases, 10
"""
SERVER_RB = """server {name!r}, user: "root", roles: %w[app], ssh_options: {{
  proxy: Net::SSH::Proxy::Command.new({proxy!r}), keys: [{key!r}], auth_methods: ["publickey"],
  verify_host_key: :never, user_known_hosts_file: "/dev/null" }}
"""


def test_capistrano_rolls_a_good_release_through_and_stops_a_bad_one_at_the_first_host(hosts):
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

    def cap(release, broken=False):
        src = release_dir(work, "cap", release, broken)
        return subprocess.run(["cap", "test", "deploy"], cwd=project, capture_output=True, text=True,
                              env=dict(env, SOURCE=src), timeout=600)

    roll_out_under_load(hs, lambda: cap("c4"), "c4")
    assert "/releases/2" in hs[0].current()          # Capistrano's own timestamped release

    before = [h.status() for h in hs]
    currents = [h.current() for h in hs]
    r = cap("c5", broken=True)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-4000:]
    assert "reload of myapp failed on host1" in out and "current points back at" in out, out[-4000:]
    bad = [p for p in hs[1].run("ls", "-1t", f"{APP_DIR}/releases").stdout.split()][0]
    assert_stopped_at_the_first(hs, out, "c4", f"{APP_DIR}/releases/{bad}", before, currents)
