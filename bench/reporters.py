#!/usr/bin/python3
"""What the failure reporters cost a server (a benchmark, not a test).

    bench/reporters.py [--runs 7] [--compare REV]

Side by side in one run, for Ruby and Python: the bare interpreter, and the
same interpreter as a master of the shim gets started — the hooks directory
on RUBYLIB/PYTHONPATH and a report channel open at an fd named by
UNICORN_SHIM_CHANNEL, so the reporter is loaded and active. Each process
writes 200,000 log lines to stdout and 40,000 progress updates ending in
'\\r' to stderr (what tqdm sends), both to /dev/null, and times each loop
itself in CPU time (the machine may be busy: CPU time is what a reporter
adds), three times over, keeping its fastest; then it fails, and the benchmark checks that its reporter did send the
failure over the channel (a reporter that was not active would measure
nothing). Medians of --runs, in turns, each setup first every other time. --compare REV runs the reporters of an
earlier commit too (once each: they were quadratic for '\\r').
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
HOOKS = os.path.join(REPO, "shim", "hooks")
LINES, PROGRESS = 200_000, 40_000
REPEAT = 3        # each process runs both loops this often and keeps its fastest

RUBY = r"""
line = "I, [2026-12-04T07:00:00.000000 #1234]  INFO -- : GET /orders/42 200 1.2ms\n"
clock = Process::CLOCK_PROCESS_CPUTIME_ID
lines = progress = Float::INFINITY
%(repeat)d.times do
  t0 = Process.clock_gettime(clock)
  %(lines)d.times { $stdout.write(line) }
  $stdout.flush
  t1 = Process.clock_gettime(clock)
  %(progress)d.times { |i| $stderr.write("\r#{i}") }
  t2 = Process.clock_gettime(clock)
  lines, progress = [lines, t1 - t0].min, [progress, t2 - t1].min
end
File.write(ARGV[0], "#{lines} #{progress}")
raise "benchmark over"
"""

PYTHON = r"""
import sys, time
line = "I, [2026-12-04T07:00:00.000000 #1234]  INFO -- : GET /orders/42 200 1.2ms\n"
lines = progress = float("inf")
for _ in range(%(repeat)d):
    t0 = time.process_time()
    for _ in range(%(lines)d):
        sys.stdout.write(line)
    sys.stdout.flush()
    t1 = time.process_time()
    for i in range(%(progress)d):
        sys.stderr.write("\r%%d" %% i)
    t2 = time.process_time()
    lines, progress = min(lines, t1 - t0), min(progress, t2 - t1)
with open(sys.argv[1], "w") as f:
    f.write("%%r %%r" %% (lines, progress))
raise RuntimeError("benchmark over")
"""

INTERPRETERS = {"ruby": (["ruby"], RUBY, "RUBYLIB"), "python": (["/usr/bin/python3"], PYTHON, "PYTHONPATH")}


def run(lang: str, workdir: str, hooks: str | None, old: bool = False, repeat: int = REPEAT) -> tuple:
    """CPU seconds of (the log lines, the '\\r' writes, the whole process) of one run."""
    argv, source, var = INTERPRETERS[lang]
    script = os.path.join(workdir, f"load.{'rb' if lang == 'ruby' else 'py'}")
    with open(script, "w") as f:
        f.write(source % {"lines": LINES, "progress": PROGRESS, "repeat": repeat})
    out = os.path.join(workdir, "times")
    env = {k: v for k, v in os.environ.items() if k not in ("RUBYLIB", "PYTHONPATH", "RUBYOPT")}
    # Every setup starts the same way, with the same variables (their size moves the
    # stack, which alone changed a tight loop's time by several percent): only the
    # hooks on RUBYLIB/PYTHONPATH differ, and what they find.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    fds, listener = [theirs.fileno()], None
    env["CHANNEL"] = f"{theirs.fileno()}:{os.fstat(theirs.fileno()).st_ino}"
    env["UNICORN_SHIM_READY_SOCKET"] = os.path.join(workdir, "ready.sock")
    env[var] = os.path.join(hooks or workdir, lang)
    cmd = ["/bin/sh", "-c", 'UNICORN_SHIM_CHANNEL="$CHANNEL:$$" exec "$@"', "sh"] + argv + [script, out]
    if hooks and old:      # the reporters before the channel: the socket file named in the environment
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(env["UNICORN_SHIM_READY_SOCKET"])
    with open(os.devnull, "w") as null:
        child = subprocess.Popen(cmd, env=env, stdout=null, stderr=null, pass_fds=fds)
        _pid, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    theirs.close()
    reported = None
    source_of_report = listener if listener is not None else ours
    source_of_report.settimeout(2 if hooks else 0.2)
    try:
        reported = source_of_report.recv(600).decode(errors="replace")
    except (TimeoutError, socket.timeout):
        pass          # bare: nothing; the old Python reporter missed the traceback behind the '\r' line
    ours.close()
    if listener is not None:
        listener.close()
        os.unlink(env["UNICORN_SHIM_READY_SOCKET"])
    if hooks and not old:
        assert reported and "benchmark over" in reported, f"{lang}: the reporter sent nothing: {reported!r}"
    assert hooks or not reported, "a bare interpreter reported"
    with open(out) as f:
        lines, progress = (float(x) for x in f.read().split())
    return lines, progress, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--compare", metavar="REV", help="also the reporters of this commit (one run each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reporters.") as workdir:
        old_hooks = None
        if args.compare:
            old_hooks = os.path.join(workdir, "old")
            os.mkdir(old_hooks)
            archive = subprocess.run(["git", "-C", REPO, "archive", args.compare, "shim/hooks"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", old_hooks, "--strip-components=2"], input=archive, check=True)
        results = {}
        for lang in INTERPRETERS:
            for i in range(args.runs):                  # in turns, each first every other time
                for setup, hooks in (("bare", None), ("reporter", HOOKS))[::1 if i % 2 else -1]:
                    results.setdefault((lang, setup), []).append(run(lang, workdir, hooks))
            if old_hooks:
                results[(lang, "old")] = [run(lang, workdir, old_hooks, old=True, repeat=1)]
    setups = ["bare", "reporter"] + (["old"] if old_hooks else [])
    names = {"bare": "bare", "reporter": "with the reporter", "old": f"reporter of {args.compare}"}
    print(f"\n{args.runs} runs each; CPU seconds, medians; ratio to bare\n")
    print("| interpreter | measure | " + " | ".join(names[s] for s in setups) + " |")
    print("|---|---|" + "---|" * len(setups))
    for lang in INTERPRETERS:
        for i, measure in enumerate((f"{LINES:,} log lines (stdout)", f"{PROGRESS:,} '\\r' writes (stderr)",
                                     "whole process, start to exit")):
            base = statistics.median(r[i] for r in results[(lang, "bare")])
            cells = []
            for setup in setups:
                value = statistics.median(r[i] for r in results[(lang, setup)])
                cells.append(f"{value:.3f}" + ("" if setup == "bare" else f" ({value / base:.2f}x)"))
            print(f"| {lang} | {measure} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
