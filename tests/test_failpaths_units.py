"""Fast unit tests for the failure paths: no systemd, no server."""
from __future__ import annotations

from shim.runtime.release import config_through

FLAGS = ("-c", "--config-file")


def test_a_master_of_another_release_reads_nothing_through_current():
    argv = ["bundle", "exec", "unicorn", "-c", "/srv/app/current/config/unicorn.rb", "-E", "production",
            "--config-file=/srv/app/current/x.rb", "/srv/app/currently"]
    assert config_through(argv, FLAGS, "/srv/app/releases/r2", "/srv/app/current/") == [
        "bundle", "exec", "unicorn", "-c", "/srv/app/releases/r2/config/unicorn.rb", "-E", "production",
        "--config-file=/srv/app/releases/r2/x.rb", "/srv/app/currently"]


def test_a_relative_config_is_named_through_the_link():
    argv = ["unicorn", "-c", "config/unicorn.rb"]
    assert config_through(argv, FLAGS, "/srv/app/current", "/srv/app/current") == [
        "unicorn", "-c", "/srv/app/current/config/unicorn.rb"]
    assert config_through(argv, FLAGS, "/srv/app/releases/r2", "/srv/app/current") == [
        "unicorn", "-c", "/srv/app/releases/r2/config/unicorn.rb"]
    # the master of the deployed release keeps the path through current (Unicorn's re-exec reads it again)
    assert config_through(["unicorn", "-c", "/srv/app/current/c.rb"], FLAGS, "/srv/app/current",
                          "/srv/app/current") == ["unicorn", "-c", "/srv/app/current/c.rb"]
