"""`unicorn-shim check` runs this to see a Gunicorn config as Gunicorn sees it:

    PYTHON unicorn_shim_eval_gunicorn.py [GUNICORN ARGS...]

with the Python that runs Gunicorn (a virtualenv's own), as the unit's user,
in the app directory, with the environment the shim gives its masters. It
builds Gunicorn's own WSGIApplication, which parses the arguments,
GUNICORN_CMD_ARGS and the config file exactly as `gunicorn` does, and prints
one line, "unicorn-shim-eval: JSON". Application.run() is never called: no
socket is bound and the app is not imported.
"""
import io
import json
import os
import sys

MARK = "unicorn-shim-eval: "
HOOKS = ("on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init", "worker_exit",
         "on_exit", "pre_exec")


def report(data, out):
    out.write(MARK + json.dumps(data) + "\n")
    out.flush()


def main(argv):
    out = sys.stdout
    sys.stdout = sys.stderr          # what the config prints must not mix with the report
    try:
        import gunicorn
        from gunicorn.app.wsgiapp import WSGIApplication
    except ImportError as e:
        report({"cannot": "Gunicorn cannot be imported by %s: %s" % (sys.executable, e)}, out)
        return
    # Which environment variables the config file reads (os.environ[...], .get,
    # os.getenv all end in __getitem__), and whether they were set.
    reads = {}
    real_getitem = os.environ.__class__.__getitem__
    config_files = set()

    def from_config():
        frame = sys._getframe(2)
        for _ in range(3):
            if frame is None:
                return False
            if frame.f_code.co_filename in config_files:
                return True
            frame = frame.f_back
        return False

    def getitem(self, key):
        try:
            value = real_getitem(self, key)
        except KeyError:
            if self is os.environ and from_config():
                reads.setdefault(key, False)
            raise
        if self is os.environ and from_config():
            reads.setdefault(key, True)
        return value

    os.environ.__class__.__getitem__ = getitem

    syntax = []

    class Probe(WSGIApplication):
        def get_config_from_filename(self, filename):
            config_files.add(filename)
            config_files.add(os.path.abspath(filename))
            # Gunicorn's loader reports a syntax error without its place: compile first to name it.
            try:
                with open(filename, "rb") as f:
                    compile(f.read(), filename, "exec")
            except SyntaxError as e:
                syntax.append("%s:%s: %s" % (e.filename, e.lineno, e.msg))
            except (OSError, ValueError):
                pass
            return super().get_config_from_filename(filename)

    sys.argv = ["gunicorn"] + argv
    err = io.StringIO()
    real_stderr = sys.stderr
    sys.stderr = err
    error = None
    app = None
    try:
        app = Probe("%(prog)s [OPTIONS] [APP_MODULE]")
    except SystemExit:
        error = err.getvalue().strip().splitlines()[-1:] or ["the config failed to load"]
        error = error[0]
    except Exception as e:            # anything Gunicorn's own loader lets through
        error = "%s: %s" % (type(e).__name__, e)
    finally:
        sys.stderr = real_stderr
        os.environ.__class__.__getitem__ = real_getitem
    if app is None:
        report({"cannot": "Gunicorn's config loader failed: %s" % error,
                "syntax_error": syntax[0] if syntax else None}, out)
        return
    cfg = app.cfg
    settings = cfg.settings
    hooks = {}
    for name in HOOKS:
        setting = settings.get(name)
        if setting is None:
            continue
        value = setting.value
        default = getattr(value, "__code__", None) is getattr(setting.default, "__code__", None)
        code = getattr(value, "__code__", None)
        hooks[name] = {"default": default,
                       "module": getattr(value, "__module__", None),
                       "location": "%s:%s" % (code.co_filename, code.co_firstlineno) if code else None}
    report({
        "gunicorn_version": gunicorn.__version__,
        "config_file": app.cfg.config or None,
        "cwd": os.getcwd(),
        "chdir": cfg.chdir,
        "bind": list(cfg.bind or []),
        "pidfile": os.path.abspath(cfg.pidfile) if cfg.pidfile else None,
        "workers": cfg.workers,
        "preload_app": cfg.preload_app,
        "user": cfg.uid,
        "group": cfg.gid,
        "own_uid": os.geteuid(),
        "own_gid": os.getegid(),
        "daemon": cfg.daemon,
        "errorlog": cfg.errorlog,
        "accesslog": cfg.accesslog,
        "hooks": hooks,
        "readiness_hook": hooks.get("post_worker_init", {}).get("module") == "unicorn_shim_gunicorn",
        "env_reads": reads,
    }, out)


if __name__ == "__main__":
    main(sys.argv[1:])
