#!/usr/bin/python3
"""The demo: a sample Rack app under real Unicorn, supervised by unicorn-shim,
under a real (private) systemd user manager, on a local port.

It deploys a good release and a broken one under load and shows what an
operator sees, then leaves the app running until Ctrl-C (--no-wait: stop at once).
Started by scripts/demo, which checks for root (the private systemd uses a
mount namespace) and installs what is missing first. Debian's Python runs it:
/usr/bin/python3 sees python3-systemd and python3-psutil.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]


def say(text=""):
    print(text, flush=True)


def show(title, text):
    say(f"\n== {title}")
    for line in text.rstrip().splitlines():
        say(f"   {line}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--no-wait", action="store_true", help="stop right after the tour")
    args = parser.parse_args()

    from support.apps import free_port
    from support.deploy import Deployment
    from support.load import Load, get
    from support.systemd import UserManager

    port = args.port
    try:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    except OSError:
        port = free_port()
    base = tempfile.mkdtemp(prefix="unicorn-shim-demo.")
    manager = UserManager(base)
    d = Deployment(manager, base, port=port)
    sc = f"XDG_RUNTIME_DIR={manager.runtime_dir} systemctl --user"
    try:
        d.app.release()
        d.start()
        show(f"started: {sc} start app.socket app.service", f"curl http://127.0.0.1:{port}/ -> "
             + (get(port).release or "?"))
        show(f"{sc} status app", manager.systemctl("status", "app", "--no-pager", "-n", "0").stdout)

        with Load(port, clients=4) as load:
            name = d.app.release()
            t = time.monotonic()
            r = d.reload()
            show(f"deploy {name} under load: {sc} reload app  (exit {r.returncode}, "
                 f"{time.monotonic() - t:.2f} s)", f"curl -> {get(port).release}")
            bad = d.app.release(broken=True)
            t = time.monotonic()
            r = d.reload()
            show(f"deploy broken {bad}: {sc} reload app  (exit {r.returncode}, {time.monotonic() - t:.2f} s)",
                 r.stderr + f"curl -> {get(port).release}   (the old release keeps serving)")
        show("requests during both deploys", f"{load.ok_count()} ok, {len(load.failures())} failed")
        show("journalctl --user-unit app SYSLOG_IDENTIFIER=unicorn-shim (the shim's own events)",
             subprocess.run(["journalctl", "-D", manager.journal_dir, "_SYSTEMD_USER_UNIT=app.service",
                             "SYSLOG_IDENTIFIER=unicorn-shim", "-o", "short-precise"],
                            capture_output=True, text=True).stdout)
        show("journalctl ... SHIM_EVENT=reload-failed -o json (the fields of one event)", "\n".join(
            f"{k}={v}" for k, v in manager.events("reload-failed")[-1].items()
            if k.isupper() and not k.startswith("_") or k in ("_PID",)))
        show(f"{sc} show -p MainPID,ActiveState,SubState,StatusText app",
             manager.systemctl("show", "-p", "MainPID,ActiveState,SubState,StatusText", "app").stdout)
        if args.no_wait:
            return
        say(f"""
The app is serving http://127.0.0.1:{port}/ (release {d.app.count - 1} is current: {d.app.current}).
In another shell, as root:
   export XDG_RUNTIME_DIR={manager.runtime_dir}
   systemctl --user status app
   systemctl --user reload app; echo $?
   journalctl -D {manager.journal_dir} --user-unit app.service -f
   {REPO}/bin/unicorn-shim status --control {manager.runtime_dir}/app/control.sock
Ctrl-C stops the demo and everything it started.""")
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.pause()
    finally:
        d.stop()
        manager.down()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
