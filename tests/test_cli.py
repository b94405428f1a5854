"""Issue 2, point 6: bad input gets one clear line, a distinct exit status, and
nothing is left running. The shim runs for real (no systemd needed here)."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import subprocess
import tempfile
import uuid

import pytest

from support.apps import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(REPO, "bin", "unicorn-shim")


def run_shim(*args, env_extra=None, pass_fds=(), preexec_fn=None, user=None):
    marker = uuid.uuid4().hex     # in the server command line: lets us look for leftovers
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.update(env_extra or {})
    argv = [SHIM, *[a.replace("MARKER", marker) for a in args]]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, pass_fds=pass_fds,
                       preexec_fn=preexec_fn, timeout=30)
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert left == "", f"left running: {left}"
    return r


def one_line(r):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_no_server_command():
    r = run_shim("run", "--listen", "127.0.0.1:0")
    assert r.returncode == 2
    assert "no server command after `--`" in one_line(r)


def test_server_binary_missing():
    r = run_shim("run", "--listen", f"127.0.0.1:{free_port()}", "--", "/nonexistent/unicorn", "MARKER")
    assert r.returncode == 5
    assert "/nonexistent/unicorn" in one_line(r) and "does not exist" in one_line(r)


@pytest.mark.parametrize("address", ["nonsense:abc", "127.0.0.1:99999", "[::1:80", "unix:relative/path",
                                     "300.1.1.1:80"])
def test_listen_unparseable(address):
    r = run_shim("run", "--listen", address, "--", "unicorn", "MARKER")
    assert r.returncode == 3
    assert address in one_line(r)


def test_listen_unbindable():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_shim("run", "--listen", f"127.0.0.1:{port}", "--", "unicorn", "MARKER")
    assert r.returncode == 3
    assert "Address already in use" in one_line(r)


def test_listen_unix_refuses_symlink_and_regular_file(tmp_path):
    (tmp_path / "file").write_text("data")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    for name, what in (("file", "is not a socket"), ("link", "is a symlink")):
        r = run_shim("run", "--listen", f"unix:{tmp_path / name}", "--", "unicorn", "MARKER")
        assert r.returncode == 3 and what in one_line(r)
    assert (tmp_path / "file").read_text() == "data"


def test_listen_unix_replaces_stale_socket_and_sets_mode(tmp_path):
    path = str(tmp_path / "app.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                    # the file stays, nobody listens: stale
    from shim.runtime import sockets
    held = sockets.bind(sockets.parse_address(f"unix:{path}"), 0o660)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o660"
        assert held.name == path
    finally:
        sockets.release(held and [held])
    assert not os.path.exists(path)


def test_listen_pid_not_ours():
    r = run_shim("run", "--", "unicorn", "MARKER", env_extra={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    assert r.returncode == 4
    assert "LISTEN_PID='1' is not this process" in one_line(r)


def _at_fd3(obj_fd):
    def move():
        os.dup2(obj_fd, 3)
    return move


@pytest.mark.parametrize("kind", ["pipe", "unlistened-socket", "not-open", "hostile-count"])
def test_inherited_fd_not_a_listening_socket(kind):
    env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "app.socket"}
    keep = []
    if kind == "pipe":
        r_fd, w_fd = os.pipe()
        keep = [r_fd, w_fd]
        pre = _at_fd3(r_fd)
    elif kind == "unlistened-socket":
        s = socket.socket()
        keep = [s]
        pre = _at_fd3(s.fileno())
    elif kind == "not-open":
        pre = lambda: os.closerange(3, 4)   # noqa: E731
    else:
        env["LISTEN_FDS"] = "99999999999"
        pre = None

    def preexec():
        if pre:
            pre()
        os.environ["LISTEN_PID"] = str(os.getpid())

    # LISTEN_PID must be the shim's own pid: the shebang exec keeps the pid of the fork.
    env_pid_wrapper = ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh"]
    marker = uuid.uuid4().hex
    r = subprocess.run([*env_pid_wrapper, SHIM, "run", "--", "unicorn", marker], capture_output=True,
                       text=True, timeout=30, pass_fds=(3,) if pre and kind != "not-open" else (),
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}, **env},
                       preexec_fn=pre)
    assert r.returncode == 4, r.stderr
    line = one_line(r)
    expected = {"pipe": "is not a socket", "unlistened-socket": "not a listening stream socket",
                "not-open": "is not open", "hostile-count": "is not a count"}[kind]
    assert expected in line
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b""
    for k in keep:
        k.close() if hasattr(k, "close") else os.close(k)


def test_pid_file_directory_not_writable():
    d = tempfile.mkdtemp()
    os.chmod(d, 0o755)        # owned by root: not writable for nobody
    r = run_shim("run", "--listen", f"127.0.0.1:{free_port()}", "--pid-file", os.path.join(d, "u.pid"),
                 "--", "unicorn", "MARKER", user="65534")
    os.rmdir(d)
    assert r.returncode == 6
    assert "is not writable" in one_line(r)
    r = run_shim("run", "--listen", f"127.0.0.1:{free_port()}", "--pid-file", "/nonexistent/dir/u.pid",
                 "--", "unicorn", "MARKER")
    assert r.returncode == 6 and "does not exist" in one_line(r)


def test_daemonize_flag_refused():
    r = run_shim("run", "--listen", f"127.0.0.1:{free_port()}", "--", "unicorn", "-D", "MARKER")
    assert r.returncode == 2 and "-D" in one_line(r)


def test_reload_without_a_shim(tmp_path):
    r = run_shim("reload", "--control", str(tmp_path / "none.sock"))
    assert r.returncode == 9 and "no shim is running" in one_line(r)
    r = subprocess.run([SHIM, "reload"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"})
    assert r.returncode == 9 and "RuntimeDirectory=" in one_line(r)


def test_answer_read_even_when_the_shim_closes_before_reading(tmp_path):
    """A refused peer gets its answer at once and the shim closes without reading
    the request: the client's write then fails with EPIPE, yet the answer is there.
    (Seen in CI: `reload` said "Broken pipe" instead of "permission denied".)"""
    import threading
    from shim.client import request
    path = str(tmp_path / "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def refuse_without_reading():
        conn, _ = listener.accept()
        conn.sendall(b'{"ok": false, "error": "permission denied"}\n')
        conn.close()

    server = threading.Thread(target=refuse_without_reading)
    server.start()
    # Large enough that the write cannot all fit in the socket buffer before the close.
    answer = request(path, {"command": "reload", "pad": "x" * 4_000_000}, timeout=10)
    server.join()
    listener.close()
    assert answer == {"ok": False, "error": "permission denied"}


# -- the reload/status client: light, and the same command line as before ------

HEAVY = ("asyncio", "psutil", "systemd", "argparse", "shim.runtime.supervisor", "shim.runtime.control", "sdnotify")
LOADED = """
import sys
sys.path.insert(0, {repo!r})
from shim.cli import main
status = main(sys.argv[1:])
print(" ".join(sorted(sys.modules)))
"""


@pytest.mark.parametrize("argv", [["reload", "--control", "/nonexistent/control.sock"],
                                  ["reload", "--timeout", "5", "no-such-app-here"],
                                  ["status", "--json", "--control", "/nonexistent/control.sock"],
                                  ["status", "no-such-app-here"],
                                  ["status", "--unit", "no-such.service"]])
def test_client_loads_no_heavy_module(argv):
    """ExecReload= runs this for every deploy of every app: no asyncio, psutil,
    systemd-python or argparse in the process (they cost most of its CPU)."""
    r = subprocess.run([sys.executable, "-c", LOADED.format(repo=REPO), *argv], capture_output=True, text=True,
                       timeout=30, env={k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"})
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "shim.client" in loaded
    assert not [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY], r.stdout


# Loaded by every idle shim for its whole life, and not needed: a shim is one of
# many on a host (each of these costs 0.3-2.5 MiB of private memory per shim).
NOT_IN_A_SHIM = ("asyncio", "dataclasses", "inspect", "typing", "tempfile", "shutil", "ipaddress", "psutil",
                 "subprocess", "urllib", "logging", "ssl")


def test_a_running_shim_loads_no_module_it_does_not_need(tmp_path):
    """The whole `run` path, start to exit: a master that exits at once fails the start."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS")},
           "RUNTIME_DIRECTORY": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", LOADED.format(repo=REPO), "run", "--listen", f"unix:{tmp_path}/app.sock",
                        "--ready-timeout", "5", "--server", "unicorn", "--", "/bin/true"], capture_output=True, text=True, timeout=60,
                       env=env)
    loaded = set(r.stdout.split())
    assert "shim.runtime.supervisor" in loaded and "shim.runtime.loop" in loaded, (r.stdout, r.stderr)
    assert "start failed" in r.stderr, r.stderr
    assert not [m for m in loaded if m.split(".")[0] in NOT_IN_A_SHIM], r.stdout


@pytest.mark.parametrize("argv", [
    ["reload"], ["reload", "shop"], ["reload", "--timeout", "2.5", "shop"], ["reload", "--timeout=3", "--control", "/x"],
    ["reload", "--unit", "app.service", "--user"], ["reload", "--unit=app"], ["status"], ["status", "--json"],
    ["status", "shop", "--json"], ["status", "--control=/x"], ["status", "--user", "--unit", "app"],
    ["reload", "--user"],
])
def test_fast_parse_means_what_argparse_means(argv):
    from shim.options import build_parser
    from shim.client import parse
    fast, full = parse(argv), build_parser().parse_args(argv)
    assert fast is not None
    for name in ("subcommand", "app", "control", "unit", "user", "timeout"):
        assert getattr(fast, name) == getattr(full, name, None), name
    assert fast.json == getattr(full, "json", False)


@pytest.mark.parametrize("argv", [
    ["reload", "--help"], ["status", "-h"], ["reload", "--timeout", "0"], ["reload", "--timeout", "nan"],
    ["reload", "--tim", "3"], ["reload", "shop", "--control", "/x"], ["reload", "--unit", "a", "shop"],
    ["reload", "a", "b"], ["reload", "--json"], ["status", "--timeout", "3"], ["reload", "--control"],
    ["reload", "--control", "/x", "--control", "/y"], ["run", "--", "unicorn"], ["--version"], [],
])
def test_anything_else_goes_to_argparse(argv):
    """Help, errors, abbreviations, repeats: argparse parses them as it always did."""
    from shim.client import parse
    assert parse(argv) is None


def test_reload_app_that_does_not_exist():
    r = subprocess.run([SHIM, "reload", "no-such-app-" + uuid.uuid4().hex[:6]], capture_output=True, text=True)
    assert r.returncode == 9 and "no such app" in one_line(r) and "--unit NAME" in one_line(r)
    r = subprocess.run([SHIM, "status", "../etc"], capture_output=True, text=True)
    assert r.returncode == 2 and "is not an app name" in one_line(r)
    r = subprocess.run([SHIM, "reload", "--user"], capture_output=True, text=True)
    assert r.returncode == 2 and "--user goes with --unit" in one_line(r)


def test_permission_denied_says_who_may():
    runtime = tempfile.mkdtemp()       # root's, 0700: nobody cannot reach the socket in it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(runtime, "control.sock"))
    listener.listen(1)
    r = run_shim("reload", "--control", os.path.join(runtime, "control.sock"), user="65534")
    listener.close()
    shutil.rmtree(runtime)
    line = one_line(r)
    assert r.returncode == 9 and "Permission denied" in line
    assert "its user root" in line and "sudo -u root" in line and "sudoers example" in line


def test_control_option_read_from_execstart():
    from shim.client import control_option
    show = ("{ path=/usr/bin/unicorn-shim ; argv[]=/usr/bin/unicorn-shim run --pid-file /run/a.pid "
            "--control /srv/a/control.sock -- unicorn -c config/unicorn.rb --control x ; ignore_errors=no ; "
            "start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }")
    assert control_option(show) == "/srv/a/control.sock"
    assert control_option(show.replace("--control /srv/a/control.sock", "--control=/c.sock")) == "/c.sock"
    assert control_option(show.replace("--control /srv/a/control.sock ", "")) is None
    assert control_option("") is None


@pytest.mark.parametrize("groups, mode, admitted", [("--clear-groups", 0o660, False),
                                                    ("--groups=0", 0o660, True),
                                                    ("--groups=0", 0o600, False)])
def test_control_socket_admits_its_group_only_when_the_mode_says_so(groups, mode, admitted):
    """A real peer (uid 65534, with or without the shim's group among its supplementary
    groups): the kernel's SO_PEERCRED/SO_PEERGROUPS decide."""
    from shim.runtime import control
    public = tempfile.mkdtemp()
    os.chmod(public, 0o755)
    path = os.path.join(public, "c.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(1)
    listener.settimeout(20)
    peer = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", groups, sys.executable, "-c",
                             f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({path!r}); s.recv(1)"])
    try:
        conn, _ = listener.accept()
        uid, gids = control.peer_credentials(conn)
        conn.close()
    finally:
        listener.close()
        peer.wait(10)
        shutil.rmtree(public)
    assert uid == 65534 and (0 in gids) == (groups == "--groups=0")
    assert control.admitted(uid, gids, mode) is admitted
    assert control.admitted(0, frozenset([0]), 0o600)
