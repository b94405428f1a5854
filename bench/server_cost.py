#!/usr/bin/python3
"""What the shim costs a running server on the app's own work (a benchmark, not a test).

    bench/server_cost.py [--runs 7] [--requests 3000] [--clients 4] [--only NAME]

Side by side in one run, for each server: the bare server started by hand
(`unicorn -l 127.0.0.1:P ...`) and the same server, same config, same app,
started by `unicorn-shim run --listen 127.0.0.1:P -- ...` (no systemd needed:
without NOTIFY_SOCKET the shim tells nobody). So every hook the shim loads into
a server's processes is in the second one: the failure reporters, the Unicorn
`listen` hook, Gunicorn's gthread drain, the report channel, the probe socket.
The app does what apps do on each request: it logs a line to stdout (the
journal's pipe in production; here a file) and appends a line to a file of
its own. Each turn sends --requests requests from --clients clients (one
connection each, as Unicorn closes after each reply) to one server, then to
the other, alternating which goes first; it reads the CPU time the server's
processes (master and workers, psutil) used for those requests. Prints the
median CPU per 1000 requests and requests per second, and the ratio shim/bare;
with --syscalls also the system calls the server's processes make per request
(strace -c, one more turn each), a count the machine's load does not move.
Debian's Python (/usr/bin/python3), as root or not; needs the servers from
Debian's packages (unicorn, gunicorn, puma).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from support.apps import free_port  # noqa: E402

SHIM = [sys.executable, os.path.join(REPO, "bin", "unicorn-shim")]

CONFIG_RU = """\
log = File.open("own.log", "a")
run lambda { |env|
  $stdout.write("I, [#{Time.now.utc}] INFO -- : GET #{env['PATH_INFO']} 200\\n")
  $stdout.flush
  log.write("order #{rand(1000)} saved\\n")
  log.flush
  [200, {"content-type" => "text/plain"}, ["ok\\n"]]
}
"""
APP_PY = """\
import sys, random, datetime
log = open("own.log", "a")
def application(environ, start_response):
    sys.stdout.write("I, [%s] INFO -- : GET %s 200\\n" % (datetime.datetime.utcnow(), environ["PATH_INFO"]))
    sys.stdout.flush()
    log.write("order %d saved\\n" % random.randrange(1000))
    log.flush()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\\n"]
"""
# name: (files, command with {port} placeholder for the bare server, listen flag spelled by the shim)
SERVERS = {
    "unicorn": ({"config.ru": CONFIG_RU, "unicorn.rb": "worker_processes 2\npreload_app false\n"},
                ["unicorn", "-c", "unicorn.rb", "config.ru"], ["-l", "127.0.0.1:{port}"]),
    "gunicorn gthread": ({"app.py": APP_PY, "gunicorn.conf.py": "workers = 2\nworker_class = 'gthread'\nthreads = 4\n"},
                         ["gunicorn", "-c", "gunicorn.conf.py", "app:application"], ["--bind", "127.0.0.1:{port}"]),
    "gunicorn sync": ({"app.py": APP_PY, "gunicorn.conf.py": "workers = 2\n"},
                      ["gunicorn", "-c", "gunicorn.conf.py", "app:application"], ["--bind", "127.0.0.1:{port}"]),
    "puma": ({"config.ru": CONFIG_RU, "puma.rb": "workers 2\nthreads 1, 4\n"},
             ["puma", "-C", "puma.rb", "config.ru"], ["-b", "tcp://127.0.0.1:{port}"]),
}


def get(port: int) -> bool:
    """One request, by hand: http.client costs the clients several times the server's
    CPU per request, and they share the machine with it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /orders HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data.split(b" ", 2)[1:2] == [b"200"]
                data += chunk
    except OSError:
        return False


class Server:
    def __init__(self, name: str, via_shim: bool, base: str) -> None:
        files, command, listen = SERVERS[name]
        self.name, self.via_shim = name, via_shim
        self.dir = os.path.join(base, ("shim-" if via_shim else "bare-") + name.replace(" ", "-"))
        os.makedirs(os.path.join(self.dir, "run"))
        for file, text in files.items():
            with open(os.path.join(self.dir, file), "w") as f:
                f.write(text)
        self.port = free_port()
        if via_shim:
            argv = SHIM + ["run", "--listen", f"127.0.0.1:{self.port}", "--chdir", self.dir,
                           "--state-dir", os.path.join(self.dir, "run"), "--"] + command
        else:
            argv = command + [word.format(port=self.port) for word in listen]
        env = dict(os.environ, RUNTIME_DIRECTORY=os.path.join(self.dir, "run"))
        env.pop("NOTIFY_SOCKET", None)
        self.out = open(os.path.join(self.dir, "stdout.log"), "w")
        # A session of its own, as systemd starts a service (and the shim its masters):
        # with the kernel's autogroup scheduling a server sharing the benchmark's
        # session would compete with its clients differently.
        self.proc = subprocess.Popen(argv, cwd=self.dir, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while not get(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.label()} did not start: see {self.out.name}")
            time.sleep(0.2)
        time.sleep(1)     # every worker up

    def label(self) -> str:
        return f"{self.name} {'under the shim' if self.via_shim else 'bare'}"

    def server_processes(self) -> list:
        """The master and its workers (not the shim: it is not on the request path)."""
        # The shim's masters are not its children (it hands them to the service
        # manager): every process running in this server's directory but the shim.
        here = os.path.realpath(self.dir)
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != self.proc.pid or not self.via_shim:
                    if p.cwd() == here:
                        found.append(p)
            except psutil.Error:
                pass
        return found

    def cpu(self) -> float:
        total = 0.0
        for p in self.server_processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        masters = self.server_processes()
        self.proc.terminate()
        psutil.wait_procs(masters, timeout=30)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()


def turn(server: Server, requests: int, clients: int) -> tuple:
    """(CPU seconds of the server's processes per 1000 requests, requests per second)."""
    left = [requests]
    failed = [0]
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            if not get(server.port):
                with lock:
                    failed[0] += 1
    cpu0, t0 = server.cpu(), time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu = time.monotonic() - t0, server.cpu() - cpu0
    if failed[0]:
        raise SystemExit(f"{server.label()}: {failed[0]} requests failed")
    return cpu / requests * 1000, requests / elapsed


def syscalls(server: Server, requests: int, clients: int) -> float:
    """System calls the server's processes make per request (strace -c -f, one turn):
    unlike CPU time, the count does not move with the machine's load."""
    out = os.path.join(server.dir, "strace.txt")
    pids = [word for p in server.server_processes() for word in ("-p", str(p.pid))]
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out] + pids, stderr=subprocess.DEVNULL)
    time.sleep(1)        # attached
    turn(server, requests, clients)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    with open(out) as f:
        total = [line.split() for line in f if line.rstrip().endswith(" total")]
    return int(total[-1][3]) / requests   # % time, seconds, usecs/call, calls if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--only", action="append", choices=sorted(SERVERS))
    parser.add_argument("--syscalls", action="store_true",
                        help="also count the servers' system calls per request (strace, one turn each)")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="server-cost.")
    print(f"{args.runs} turns of {args.requests} requests, {args.clients} clients, medians; "
          "CPU = the server's processes (master + workers)")
    extra = " syscalls / req, bare | under the shim |" if args.syscalls else ""
    print("| server | CPU ms / 1000 req, bare | under the shim | ratio | req/s, bare | under the shim | ratio |" + extra)
    print("|---|---|---|---|---|---|---|" + "---|---|" * bool(args.syscalls))
    try:
        for name in args.only or list(SERVERS):
            pair = [Server(name, False, base), Server(name, True, base)]
            try:
                seen = {False: [], True: []}
                for n in range(args.runs):
                    for server in (pair if n % 2 == 0 else pair[::-1]):
                        seen[server.via_shim].append(turn(server, args.requests, args.clients))
                calls = [syscalls(server, args.requests, args.clients) for server in pair] if args.syscalls else []
            finally:
                for server in pair:
                    server.stop()
            cpu = {k: statistics.median(c for c, _ in v) * 1000 for k, v in seen.items()}
            rate = {k: statistics.median(r for _, r in v) for k, v in seen.items()}
            print(f"| {name} | {cpu[False]:.0f} | {cpu[True]:.0f} | {cpu[True] / cpu[False]:.3f} "
                  f"| {rate[False]:.0f} | {rate[True]:.0f} | {rate[True] / rate[False]:.3f} |"
                  + "".join(f" {c:.2f} |" for c in calls), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
