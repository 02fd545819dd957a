"""The package layout, read from the imports (module-level and local ones alike): no import
circle among the modules of fastinst/ and loaders/, imports running only downwards between the
packages by role (fastinst/__init__.py lists them), no module over 350 lines, and one function
that all-reduces a row maximum for a log-sum-exp.

    .venv/bin/python -m pytest -q tests/test_layout.py
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each package may import (itself included). The root fastinst/__init__.py imports nothing,
# so an edge to it (a ``from .. import x``) is only the parent of x.
ALLOWED = {
    "fastinst.core": {"fastinst.core"},
    "fastinst.config": {"fastinst.config"},
    "loaders": {"loaders", "fastinst.core", "fastinst.config"},
    "fastinst.methods": {"fastinst.methods", "fastinst.core", "fastinst.config"},
    "fastinst.train": {"fastinst.train", "fastinst.methods", "fastinst.core", "fastinst.config", "loaders"},
    "fastinst.eval": {"fastinst.eval", "fastinst.train", "fastinst.methods", "fastinst.core", "fastinst.config",
                      "loaders"},
}
MAX_LINES = 350


def modules(root=ROOT, tops=("fastinst", "loaders")):
    """{dotted module name: file path} of every module under ``tops``."""
    out = {}
    for top in tops:
        for d, _, names in os.walk(os.path.join(root, top)):
            for n in names:
                if n.endswith(".py"):
                    path = os.path.join(d, n)
                    name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports(mods):
    """{module: {module it imports}}: every import statement, wherever it sits, resolved to the
    modules of ``mods`` it names (``from a import b`` names a, and a.b where that is a module)."""
    graph = {}
    for name, path in mods.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {m for m in found if m in mods and m != name}
    return graph


def circles(graph):
    """Every strongly connected set of more than one module (Tarjan), sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def package_of(module):
    for pkg in sorted(ALLOWED, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return module  # the root package "fastinst"


def upward(graph):
    """Imports from a package to one it may not import: ["a -> b (P may not import Q)"]."""
    bad = []
    for a, targets in sorted(graph.items()):
        pa = package_of(a)
        if pa not in ALLOWED:
            continue  # the root, checked on its own below
        for b in sorted(targets):
            pb = package_of(b)
            if pb != "fastinst" and pb not in ALLOWED[pa]:
                bad.append(f"{a} -> {b} ({pa} may not import {pb})")
    return bad


def test_no_import_circle_and_imports_run_downwards():
    mods = modules()
    graph = imports(mods)
    assert {"fastinst.core.rows", "fastinst.config.tree", "fastinst.methods.registry", "fastinst.train.engine",
            "fastinst.eval.linear", "loaders.dali_backend"} <= set(mods)
    assert circles(graph) == []
    assert upward(graph) == []
    assert graph["fastinst"] == set(), "fastinst/__init__.py imports nothing (an edge to it is only a parent)"
    # every module belongs to one of the packages by role (nothing left in the flat room)
    assert [m for m in mods if package_of(m) == "fastinst" and m != "fastinst"] == []


def test_each_method_lives_in_its_own_folder():
    from fastinst.methods import registered

    for name, cls in registered().items():
        assert cls.__module__ == f"fastinst.methods.{name}.method", (name, cls.__module__)
        assert cls.Config.__module__ == cls.__module__, name


def test_no_module_is_over_350_lines():
    long = {os.path.relpath(p, ROOT): n for p in modules().values()
            if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert long == {}


def test_one_function_all_reduces_a_row_max_for_a_log_sum_exp():
    """A row max all-reduced with op "max" next to an amax in the same function is the
    Partial-FC shift of a sharded log-sum-exp: written once, in fastinst.core.rows."""
    found = []
    for name, path in modules(tops=("fastinst",)).items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            calls = [c for c in ast.walk(fn) if isinstance(c, ast.Call)]
            amax = any(isinstance(c.func, ast.Attribute) and c.func.attr == "amax" for c in calls)
            reduce_max = any(any(isinstance(a, ast.Constant) and a.value == "max" for a in c.args)
                             for c in calls if "all_reduce" in ast.unparse(c.func))
            if amax and reduce_max:
                found.append(f"{name}.{fn.name}")
    assert found == ["fastinst.core.rows.sharded_exp_sums"]


@pytest.mark.parametrize("kind", ["circle", "upward", "local upward"])
def test_the_checks_catch_a_bad_import(tmp_path, kind):
    """The checks themselves, on a small tree written here: each bad import is reported."""
    files = {"fastinst/__init__.py": "", "fastinst/core/__init__.py": "", "fastinst/core/a.py": "",
             "fastinst/core/b.py": "", "fastinst/config/__init__.py": "", "fastinst/methods/__init__.py": "",
             "fastinst/methods/m.py": "from ..core import b\n", "loaders/__init__.py": ""}
    if kind == "circle":
        files["fastinst/core/a.py"] = "from . import b\n"
        files["fastinst/core/b.py"] = "from .a import x\n"
    elif kind == "upward":
        files["fastinst/core/a.py"] = "from ..methods import m\n"
    else:
        files["fastinst/config/__init__.py"] = "def f():\n    from fastinst.methods.m import g\n"
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    graph = imports(modules(str(tmp_path)))
    bad = upward(graph)
    if kind == "circle":
        assert circles(graph) == [["fastinst.core.a", "fastinst.core.b"]] and bad == []
    else:
        source = "fastinst.core.a" if kind == "upward" else "fastinst.config"
        assert bad and all(b.startswith(f"{source} -> fastinst.methods") for b in bad), bad
        assert circles(graph) == []


def test_a_config_without_the_method_registry_says_what_to_import():
    """The config package imports no method: loading a config before fastinst.methods is
    imported fails with a message naming the fix (launch.py imports it first)."""
    import subprocess
    import sys

    code = "from fastinst.config import load_config\nload_config()\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "import fastinst.methods" in proc.stderr, proc.stderr
    ok = subprocess.run([sys.executable, "-c", "import fastinst.methods\n" + code], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
