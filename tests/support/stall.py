"""A release that breaks right after it was found ready: each worker serves normally
for AFTER seconds, then every request takes SECONDS (longer than the probe's 1 s,
shorter than a failed master's 10 s drain, so the requests in flight still finish).

Ruby (Unicorn, Puma, the classic app): a middleware appended to config.ru, timed from
the worker's first request (preload on or off). Python (Gunicorn): the app module
wrapped, timed from its import in the worker (preload off) or master (on)."""
from __future__ import annotations

import os

RUBY = """
# stall: {seconds} s per request from {after} s after this worker's first one
use(Class.new do
  def initialize(app)
    @app = app
  end

  def call(env)
    now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    $stall_from ||= now + {after}
    sleep {seconds} if now >= $stall_from
    @app.call(env)
  end
end)
"""

PYTHON = """
_STALL_FROM = time.monotonic() + {after}
_serve = application


def application(environ, start_response):
    if time.monotonic() >= _STALL_FROM:     # stall: {seconds} s per request from {after} s after import
        time.sleep({seconds})
    return _serve(environ, start_response)
"""


def make_stall(release_dir: str, after: float, seconds: float = 3.0) -> None:
    """Make the release in `release_dir` (already written) stall as above."""
    ru, py = os.path.join(release_dir, "config.ru"), os.path.join(release_dir, "app.py")
    path, text = (ru, RUBY) if os.path.exists(ru) else (py, PYTHON)
    with open(path, "a") as f:
        f.write(text.format(after=after, seconds=seconds))
