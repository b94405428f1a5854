"""The package's shape: the running shim (shim/runtime) imports no operator tooling
(shim/tooling), no command-line parser and no client; the client stands alone;
no module imports another that imports it back, directly or through others."""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "shim")


def _modules() -> Dict[str, str]:
    found = {}
    for root, _dirs, files in os.walk(PACKAGE):
        if "hooks" in os.path.relpath(root, PACKAGE).split(os.sep):
            continue      # in-server code, loaded by Ruby or by the server's Python
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


MODULES = _modules()


def imports_of(module: str) -> Set[str]:
    """Every shim module `module` imports, at its top or inside a function."""
    with open(MODULES[module]) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    # `from shim import x` names the package and the module: the package itself is empty
    return {n for n in found if n not in ("shim", "shim.runtime", "shim.tooling")}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_there_are_modules_to_check():
    assert "shim.runtime.supervisor" in GRAPH and "shim.tooling.check" in GRAPH
    assert "shim.runtime.procs" in GRAPH["shim.runtime.supervisor"]


def test_no_import_circles():
    circles: List[List[str]] = []

    def visit(module: str, path: List[str]) -> None:
        for imported in sorted(GRAPH[module]):
            if imported in path:
                circles.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)
    done: Set[str] = set()
    for module in sorted(GRAPH):
        visit(module, [module])
    assert not circles, circles


def test_runtime_imports_only_runtime_and_errors():
    for module, imported in GRAPH.items():
        if module.startswith("shim.runtime"):
            outside = {i for i in imported if not i.startswith("shim.runtime.") and i != "shim.errors"}
            assert not outside, f"{module} imports {outside}"


def test_client_stands_alone():
    # shim/jobdeadline.py is the client's (how systemd times a reload job), kept apart
    # for its size: it imports nothing of the shim either
    assert GRAPH["shim.client"] <= {"shim.errors", "shim.jobdeadline"}
    assert GRAPH["shim.jobdeadline"] <= {"shim.errors"}


def test_only_the_loop_waits():
    """One wait point: nothing in the running shim but its event loop calls poll(),
    select() or sleep(): every other module yields a Wait that the loop ends."""
    waiting = re.compile(r"\.(poll|select)\(|\btime\.sleep\(")
    for module, path in MODULES.items():
        if module.startswith("shim.runtime") and module != "shim.runtime.loop":
            with open(path) as f:
                hits = [line.strip() for line in f if waiting.search(line)]
            assert not hits, f"{module} waits outside the loop: {hits}"
