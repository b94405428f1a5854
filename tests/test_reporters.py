"""The failure reporters are loaded and speak only in the process the shim started
(through `bundle exec` too) and its forks, never in a program they run; Unicorn's
USR2 re-exec keeps the channel and names itself; what they report is the error
where it was raised. Real Ruby, Bundler and Python, started by the shim's own
spawn with a real channel; Bundler 2.6's failure inside <internal:gem_prelude>
in a booted Debian 13."""
from __future__ import annotations

import os
import subprocess
import time
import xml.etree.ElementTree as ET

from shim.runtime import spawn
from shim.runtime.channel import HOOK_ENV, HookChannels, HookReports
from shim.runtime.loop import Loop
from shim.runtime.readiness import hook_environment
from support.containers import Container, image
from support.deploy import REPO

RUBY_PROBE = r"""
def says(where)
  "#{where}=#{defined?(UnicornShimReport) ? 'loaded' : 'absent'}:#{UnicornShimChannel::IO_ ? 'open' : 'closed' rescue 'absent'}"
end
lines = [says("master")]
r, w = IO.pipe
fork { r.close; w.puts says("fork"); w.close }
w.close
lines << r.read.strip
probe = 'puts(defined?(UnicornShimReport) ? "loaded" : "absent")'
lines << "subprocess=" + IO.popen(["ruby", "-e", probe], &:read).strip
lines << "system_sh=" + `sh -c 'ruby -e #{probe.inspect}'`.strip
File.write(ARGV[0], lines.join("\n"))
raise "probe failed on purpose"
"""

PYTHON_PROBE = r"""
import os, subprocess, sys
def says(where):
    return "%s=%s" % (where, "loaded" if "unicorn_shim_channel" in sys.modules and
                      sys.modules["unicorn_shim_channel"].FD is not None else "absent")
lines = [says("master")]
r, w = os.pipe()
if os.fork() == 0:
    os.write(w, says("fork").encode()); os._exit(0)
os.close(w)
lines.append(os.read(r, 100).decode())
probe = "import sys; print('loaded' if 'unicorn_shim_channel' in sys.modules else 'absent')"
lines.append("subprocess=" + subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                            text=True).stdout.strip())
lines.append("pythonpath=" + os.environ.get("PYTHONPATH", ""))
open(sys.argv[1], "w").write("\n".join(lines))
raise RuntimeError("probe failed on purpose")
"""


def line_of(source: str, start: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if line.startswith(start))


def start_as_master(argv, tmp_path, extra_env=None):
    """`argv` started exactly as the shim starts a master (its spawn, a channel, the
    hooks on RUBYLIB/PYTHONPATH); every report it and its tree send, by sender."""
    loop = Loop()
    got = []
    channels = HookChannels(loop, HookReports(), None)
    channels.reports.record = lambda sender, text, family: got.append((sender, text))
    channels._of_the_unit = lambda pid: True
    channel = channels.open()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **(extra_env or {})}
    env.update({**hook_environment(env), HOOK_ENV: channel.environment(spawn.FD_START)})
    master = spawn.spawn(argv, env, [channel.peer.fileno()], chdir=str(tmp_path), pid_env=(HOOK_ENV,))
    channels.started(channel, master)
    deadline = time.monotonic() + 60
    while channels.channels and time.monotonic() < deadline:     # end of file: the whole tree is gone
        loop.poll(0.1)
    channels.close()
    loop.close()
    return master, got


def test_the_ruby_reporter_lives_in_the_master_and_its_forks_only(tmp_path):
    (tmp_path / "probe.rb").write_text(RUBY_PROBE)
    master, got = start_as_master(["ruby", "probe.rb", str(tmp_path / "out")], tmp_path)
    lines = (tmp_path / "out").read_text().splitlines()
    assert lines == ["master=loaded:open", "fork=loaded:open", "subprocess=absent", "system_sh=absent"], lines
    assert [(sender, text) for sender, text in got if text.startswith("error")] == \
        [(master, f"error probe failed on purpose (RuntimeError) at probe.rb:{line_of(RUBY_PROBE, 'raise')}")], got


def test_the_ruby_reporter_survives_bundle_exec_and_reports_bundlers_error(tmp_path):
    """`bundle exec` keeps the pid through its exec: the reporter is active in what it
    runs, and Bundler's own failure (a gem that is not installed) is reported."""
    (tmp_path / "probe.rb").write_text(RUBY_PROBE)
    (tmp_path / "Gemfile").write_text('gem "rack"\n')
    subprocess.run(["bundle", "lock", "--local"], cwd=tmp_path, check=True, capture_output=True,
                   env=dict(os.environ, HOME=str(tmp_path)))
    _master, got = start_as_master(["bundle", "exec", "--keep-file-descriptors", "ruby", "probe.rb",
                                    str(tmp_path / "out")], tmp_path)
    assert (tmp_path / "out").read_text().splitlines()[:2] == ["master=loaded:open", "fork=loaded:open"]
    assert [text for _s, text in got if "probe failed on purpose" in text], got
    (tmp_path / "Gemfile").write_text('gem "rack"\ngem "no-such-gem-here"\n')
    _master, got = start_as_master(["bundle", "exec", "--keep-file-descriptors", "ruby", "probe.rb",
                                    str(tmp_path / "out2")], tmp_path)
    errors = [text for _s, text in got if text.startswith("error")]
    assert errors and "no-such-gem-here" in errors[0], got


def test_unicorns_usr2_re_exec_keeps_the_channel_and_names_itself(tmp_path):
    """Unicorn marks every fd but its listeners close-on-exec before its USR2 re-exec:
    the reporter opens the channel again for the next master and says `exec` from
    that master's pid, which is how the shim learns it shares its parent's channel."""
    (tmp_path / "reexec.rb").write_text(r"""
if ENV["GENERATION"] == "2"
  File.write(ARGV[0], "#{Process.pid} #{UnicornShimChannel::IO_ ? 'open' : 'closed'}")
  exit 0
end
pid = fork do
  (3..1024).each do |fd|        # as Unicorn's close_sockets_on_exec does
    io = IO.for_fd(fd) rescue next
    io.autoclose = false
    io.close_on_exec = true
  end
  ENV["GENERATION"] = "2"
  exec("ruby", "reexec.rb", ARGV[0], {})
end
Process.wait(pid)
""")
    master, got = start_as_master(["ruby", "reexec.rb", str(tmp_path / "out")], tmp_path)
    child, state = (tmp_path / "out").read_text().split()
    assert state == "open" and (int(child), "exec") in got, got


def test_the_python_reporter_lives_in_the_master_and_its_forks_only(tmp_path):
    (tmp_path / "probe.py").write_text(PYTHON_PROBE)
    master, got = start_as_master(["/usr/bin/python3", "probe.py", str(tmp_path / "out")], tmp_path,
                                  {"PYTHONPATH": "/somewhere/else"})
    lines = (tmp_path / "out").read_text().splitlines()
    # the master takes the hooks off PYTHONPATH: nothing it runs loads them
    assert lines == ["master=loaded", "fork=loaded", "subprocess=absent", "pythonpath=/somewhere/else"], lines
    where = f"{tmp_path}/probe.py:{line_of(PYTHON_PROBE, 'raise')}"
    assert got == [(master, f"error RuntimeError: probe failed on purpose at {where}")], got


def test_bundlers_error_is_the_reason_on_debian_13(base_dir):
    """Bundler 2.6 (Debian 13) requires bundler/setup from RubyGems itself when
    `bundle exec` runs the server: a missing gem raises inside <internal:gem_prelude>
    where at_exit sees no $!. The reason test runs under a systemd 257 user manager
    in a booted Debian 13, with a non-root User=, beside the same test for an
    exception in the app (Unicorn and Gunicorn) and the reporters' own tests."""
    ct = Container(image("trixie-bundler"), base_dir, binds=[f"{REPO}:/mnt/repo"], unified_cgroup=True,
                   prefix="trust-")
    try:
        version = ct.run("bundle", "--version").stdout
        assert "Bundler version 2.6" in version, version
        keyword = "(missing_gem or exception_in_the_app or reporter) and not puma"
        r = ct.run("systemd-run", "--wait", "--pipe", "--quiet", "--collect", "--unit=trust-tests",
                   "-p", "WorkingDirectory=/mnt/repo", "-E", "HOME=/root", "-E", "PYTHONDONTWRITEBYTECODE=1",
                   "/usr/bin/python3", "-m", "pytest", "-p", "no:cacheprovider", "-ra",
                   "--junitxml=/mnt/share/report.xml", "-k", keyword, "tests/test_reasons.py",
                   "tests/test_reporters.py", "--deselect",
                   "tests/test_reporters.py::test_bundlers_error_is_the_reason_on_debian_13", timeout=900)
        output = r.stdout[-20000:] + r.stderr[-5000:]
        assert r.returncode == 0, output
        ran = {c.get("name"): [e.tag for e in c if e.tag in ("failure", "error", "skipped")]
               for c in ET.parse(os.path.join(ct.share, "report.xml")).getroot().iter("testcase")}
        assert not [name for name, outcome in ran.items() if outcome], output
        assert "test_missing_gem_is_the_reason_under_a_non_root_user" in ran, sorted(ran)
        assert len([n for n in ran if n.startswith("test_exception_in_the_app")]) == 4, sorted(ran)
        assert "test_the_ruby_reporter_survives_bundle_exec_and_reports_bundlers_error" in ran, sorted(ran)
    finally:
        ct.down()
