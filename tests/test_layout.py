"""The package's layout holds: imports run one way, no import cycle between files, no private
member used from outside the module that defines it.

Every `import` in featuredb/ counts, lazy ones inside functions included; imports under
`if TYPE_CHECKING:` do not (they never run). The directions (docs/architecture.md):

    errors  <-  everything
    runtime ->  errors                      (model loading, hooks, coder formats, embeddings)
    store   ->  errors                      (LanceDB tables)
    indexer ->  runtime, store
    describe -> runtime, store
    query   ->  runtime, store
    server  ->  query, store
    cli, demo -> anything
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featuredb"

ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "runtime": {"errors"},
    "store": {"errors"},
    "indexer": {"errors", "runtime", "store"},
    "describe": {"errors", "runtime", "store"},
    "query": {"errors", "runtime", "store"},
    "server": {"errors", "query", "store"},
}
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public despite the underscore
ANYTHING = {"cli", "demo"}  # the entry points (and any __main__)


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The featuredb modules `name` imports (a submodule when `from pkg import submodule`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "featuredb"


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = all_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def wrong_direction(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        source = layer_of(module)
        if source in ANYTHING or module == "featuredb" or module.endswith(".__main__"):
            continue  # entry points and the root package's lazy re-exports
        for target in targets:
            layer = layer_of(target)
            if layer == source or layer == "featuredb" and target == "featuredb":
                continue  # within a layer; the root package (__version__) is below everything
            if layer not in ALLOWED.get(source, set()):
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _defined_private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, attributes it assigns, module names."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_uses(root: Path = PACKAGE) -> list[str]:
    """`obj._name` or `from m import _name` where `_name` is one of featuredb's private names that
    this module does not define itself (library internals are not our business here)."""
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in all_modules(root).items()}
    defined = {name: _defined_private_names(tree) for name, tree in trees.items()}
    ours = set().union(*defined.values())
    uses = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                    continue
                if node.attr in ours - NAMEDTUPLE_API and node.attr not in defined[name]:
                    uses.append(f"{name}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featuredb"):
                uses.extend(f"{name}:{node.lineno} import {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__"))
    return sorted(uses)


# --- the package as it is ------------------------------------------------------------------------


def test_imports_run_one_way():
    assert wrong_direction(import_graph()) == []


def test_no_import_cycle_between_files():
    assert cycles(import_graph()) == []


def test_no_private_member_is_used_from_outside_its_module():
    assert private_uses() == []


def test_cli_imports_nothing_heavy_at_start():
    """`featuredb --help` must not pay for torch, transformers, lancedb or polars."""
    import subprocess
    import sys

    code = ("import sys, featuredb.cli; heavy = [m for m in ('torch', 'transformers', 'lancedb', 'polars', "
            "'pyarrow', 'numpy') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_the_store_imports_lancedb_without_its_rest_client_and_the_client_still_loads():
    import subprocess
    import sys

    code = ("import sys, featuredb.store; "
            "print(any(m.startswith('lance_namespace_urllib3_client.api') for m in sys.modules)); "
            "from lance_namespace_urllib3_client import ApiClient; print(ApiClient.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "ApiClient"]


# --- the checks themselves can fail ----------------------------------------------------------------


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "featuredb" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "featuredb"


@pytest.fixture()
def fake_package(tmp_path):
    return _write_package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "store/__init__.py": "",
        "store/table.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from featuredb.query import view\n",
        "store/bad.py": "def f():\n    from featuredb.query.view import show  # lazy, still counts\n",
        "query/__init__.py": "",
        "query/view.py": "from featuredb.store import table\nfrom . import loop\ndef show(): pass\n",
        "query/loop.py": "from featuredb.query.view import show\nclass A:\n    _cache = 1\n",
        "query/peek.py": "from featuredb.query.loop import A\nA()._cache\nfrom featuredb.query.loop import _hidden\n",
    })


def test_the_checks_catch_a_wrong_direction_a_cycle_and_a_private_use(fake_package):
    graph = {}
    modules = all_modules(fake_package)
    for name, path in modules.items():
        graph[name] = imports_of(name, path, modules)
    assert "featuredb.query.view" not in graph["featuredb.store.table"]  # TYPE_CHECKING only
    assert wrong_direction(graph) == ["featuredb.store.bad -> featuredb.query.view"]
    assert cycles(graph) == [["featuredb.query.loop", "featuredb.query.view"]]
    assert private_uses(fake_package) == ["featuredb.query.peek:2 ._cache", "featuredb.query.peek:3 import _hidden"]
