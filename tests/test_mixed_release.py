"""Issue 22, case 5: a mixed release (the new release's code run with the old
release's gems) is never reported as serving cleanly, and its workers answer as
little as the server allows before it is refused.

`--upgrade usr2` without the guides' `before_exec` BUNDLE_GEMFILE reset: Unicorn's
own re-exec hands the first master's BUNDLE_GEMFILE to every later master. Real
systemd (a private user manager), real Unicorn and Bundler from Debian's
packages, the classic config (tests/support/classic.py), load running. Each
release answers `release=rN ... gemfile=<the Gemfile its Bundler loaded>`, so a
mixed response is one whose Gemfile is not its own release's."""
from __future__ import annotations

import os
import re
import time
from typing import Dict, List

import pytest

from support.classic import ClassicDeployment, classic  # noqa: F401 (a fixture)
from support.load import Load, Result, get
from support.systemd import eventually
from test_client import shim


def fields(body: str) -> Dict[str, str]:
    return dict(w.split("=", 1) for w in body.split() if "=" in w)


def is_mixed(d: ClassicDeployment, r: Result) -> bool:
    """The code of one release with the Gemfile of another. The guides' reset names the
    Gemfile through `current`, which named the master's own release when it booted."""
    own = os.path.join(d.root, "releases", r.release or "?")
    gemfile = fields(r.body).get("gemfile", "").replace(d.current + "/", own + "/")
    return bool(r.release) and os.path.dirname(gemfile) != own


def mixed(d: ClassicDeployment, load: Load) -> List[Result]:
    with load._lock:
        return [r for r in load.results if not r.error and is_mixed(d, r)]


def claimed_release(line: str) -> str:
    """The release a status line says serves (the reason after it may name others)."""
    m = re.search(r"\bmaster \d+, [^;]*?release (\S+), generation", line)
    assert m, line
    return m.group(1)


def assert_reported_as_served(d: ClassicDeployment, manager) -> Result:
    """What answers is what StatusText, `unicorn-shim status` and MainPID say; a mixed
    master is never reported without "degraded" in front."""
    st = eventually(d.state, lambda s: not s["StatusText"].startswith("reloading"))
    answers = [get(d.port, timeout=5) for _ in range(8)]
    assert all(not a.error for a in answers), answers
    assert len({(a.release, fields(a.body)["gemfile"]) for a in answers}) == 1, answers   # one master serves
    served = answers[0]
    line = shim(manager, "status", "--unit", "app", "--user").stdout.splitlines()[0]
    for said in (st["StatusText"], line):
        assert claimed_release(said) == os.path.join(d.root, "releases", served.release), (said, served.body)
        assert said.startswith("degraded") == is_mixed(d, served), (said, served.body)
    worker = int(fields(served.body)["pid"])
    assert int(st["MainPID"]) == int(open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[1])
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    return served


@pytest.mark.parametrize("quit_oldbin", [True, False], ids=["quit-oldbin-hook", "no-hook"])
def test_a_release_pinned_to_old_gems_is_refused_and_never_reported_clean(classic, manager, quit_oldbin):
    """(a) with the guides' before_fork hook that QUITs the .oldbin master, (b) without it:
    the reload fails with the exact reason, what serves is what is reported, and the
    load never sees the new release's code with the old release's gems."""
    d = classic(shim_args="--upgrade usr2", before_exec=False, quit_oldbin=quit_oldbin)
    d.start()
    old_gemfile = os.path.join(d.root, "releases", "r1", "Gemfile")
    with Load(d.port) as load:
        for n in range(1, 4):
            time.sleep(0.5)
            new = d.release()
            r = d.reload()
            assert r.returncode != 0, r.stdout
            # systemctl says only that the job failed; the shim's event and ExecReload='s client say why
            failed = manager.wait_events("reload-failed", n)[-1]
            assert failed["REASON"].startswith(f"the new master runs with BUNDLE_GEMFILE={old_gemfile}, which is "
                                               f"not in the deployed release {d.root}/releases/{new}: "), failed
            served = assert_reported_as_served(d, manager)
            assert (served.release, fields(served.body)["gemfile"]) == ("r1", old_gemfile)
        time.sleep(0.5)
    assert load.failures() == [], load.failure_kinds()
    seen_mixed = mixed(d, load)
    print(f"mixed responses: {len(seen_mixed)} of {load.ok_count()}")
    assert seen_mixed == [], [r.body for r in seen_mixed[:5]]
    assert len(manager.wait_events("reload-failed", 3)) == 3 and manager.events("reload-done") == []


# The guides' reset names the Gemfile through `current`; this one names the release itself,
# as a deploy tool's templated config may: read before its exec, a new master would show
# the Gemfile of the release its parent was exec'd in, and be refused.
REAL_PATH_RESET = "before_exec do |server|\n  ENV['BUNDLE_GEMFILE'] = File.realpath(APP_PATH) + '/Gemfile'\nend"


@pytest.mark.parametrize("before_exec", [True, REAL_PATH_RESET], ids=["guides-reset", "real-path-reset"])
def test_a_correct_before_exec_reset_deploys_every_release_under_usr2(classic, manager, before_exec):
    """Never a false refusal: with a before_exec reset each new master is read only
    once it has exec'd (before, it is a copy of the old master, old Gemfile and all)."""
    d = classic(shim_args="--upgrade usr2", before_exec=before_exec)
    d.start()
    with Load(d.port) as load:
        for _ in range(4):
            new = d.release()
            r = d.reload()
            assert r.returncode == 0, r.stderr + d.journal_text()[-3000:]
            served = assert_reported_as_served(d, manager)
            assert served.release == new
            assert os.path.realpath(fields(served.body)["gemfile"]) == os.path.join(d.root, "releases", new, "Gemfile")
    assert load.failures() == [], load.failure_kinds()
    assert mixed(d, load) == []


def test_a_kept_master_of_another_release_is_reported_degraded(classic, manager):
    """The release whose config pins `working_directory` to the first release is seen
    only once its master is ready (its config moves it there), by when the guides' hook
    has QUIT the old master: the new one is kept, since nothing else serves, and the
    reload fails. What serves (release r1's code) is what StatusText and `status`
    name, with "degraded:" in front: never the deployed release as if clean."""
    d = classic(shim_args="--upgrade usr2")
    d.start()
    new = d.release()
    with open(os.path.join(d.root, "releases", new, "config", "unicorn.rb"), "a") as f:
        f.write(f'working_directory "{d.root}/releases/r1"\n')
    with Load(d.port) as load:
        r = d.reload()
        assert r.returncode != 0
        failed = manager.wait_events("reload-failed")[-1]
        assert failed["REASON"].startswith(f"the new master serves {d.root}/releases/r1, not the deployed release "
                                           f"{d.root}/releases/{new}: "), failed
        st = eventually(d.state, lambda s: not s["StatusText"].startswith("reloading"))
        served = get(d.port, timeout=5)
        assert served.release == "r1"
        line = shim(manager, "status", "--unit", "app", "--user").stdout.splitlines()[0]
        for said in (st["StatusText"], line):
            assert said.startswith("degraded: reload to generation 2 failed and its master serves on: "), said
            assert claimed_release(said) == os.path.join(d.root, "releases", "r1"), said
        worker = int(fields(served.body)["pid"])
        assert int(st["MainPID"]) == int(open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[1])
        assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert load.failures() == [], load.failure_kinds()
