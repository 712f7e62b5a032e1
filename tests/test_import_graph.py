"""Import circles inside napo (issue 25), found with the standard library's ast: every import statement of
a module, at its top or inside a function, is an edge (those under ``if TYPE_CHECKING:`` are not), and so is
the ``__init__`` of each package the imported module is in (Python runs it first)."""

from __future__ import annotations

import ast
from pathlib import Path

NAPO = Path(__file__).resolve().parents[1] / "napo"


def _modules(root: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    found, pending = set(), [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from package import submodule` imports the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        pending.extend(ast.iter_child_nodes(node))
    # Importing pkg.sub.mod first runs pkg/__init__ and pkg/sub/__init__: edges to those packages too, except the
    # ones the importing module lives in (they are already being imported when it runs).
    inside = module if is_package else module.rpartition(".")[0]
    for name in list(found):
        parts = name.split(".")
        for depth in range(1, len(parts)):
            package = ".".join(parts[:depth])
            if not (inside == package or inside.startswith(package + ".")):
                found.add(package)
    return {name for name in found if name in known and name != module}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = _modules(root)
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", set(modules))
        for name, path in modules.items()
    }


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while node not in component:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_circle_of_lazy_imports_and_ignores_type_checking(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import c\n")
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (package / "b.py").write_text("import pkg.a\n\ndef g():\n    pass\n")
    type_only = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.d import x\n"
    (package / "sub" / "c.py").write_text(type_only)  # an annotation's import, never run: no circle with d
    (package / "d.py").write_text("from .sub import c\nfrom pkg import a\n\nx = 1\n")
    graph = import_graph(package)
    assert graph["pkg.d"] == {"pkg.sub", "pkg.sub.c", "pkg.a"} and graph["pkg.sub"] == {"pkg.sub.c"}
    assert circles(graph) == [{"pkg.a", "pkg.b"}]


def test_the_checker_counts_the_package_init_an_import_runs_first(tmp_path):
    # other.py -> pkg.store runs pkg/__init__, which imports pkg.gen, which imports other: a circle no single import
    # statement shows (napo.models.loading -> napo.data.store -> napo.data -> napo.data.generate -> loading was one).
    package = tmp_path / "top"
    (package / "pkg").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pkg" / "__init__.py").write_text("from top.pkg.gen import g\n")
    (package / "pkg" / "gen.py").write_text("from top.other import f\n\ndef g():\n    pass\n")
    (package / "pkg" / "store.py").write_text("from top.pkg import gen\n")  # inside pkg: its __init__ is running
    (package / "other.py").write_text("from top.pkg.store import x\n\ndef f():\n    pass\n")
    graph = import_graph(package)
    assert graph["top.pkg.store"] == {"top.pkg.gen"} and graph["top.other"] == {"top.pkg", "top.pkg.store"}
    assert circles(graph) == [{"top.other", "top.pkg", "top.pkg.gen", "top.pkg.store"}]


def test_napo_has_no_import_circle():
    remaining = circles(import_graph(NAPO))
    assert not remaining, "import circles in napo/: " + "; ".join(" <-> ".join(sorted(c)) for c in remaining)


def test_data_building_imports_nothing_from_evaluation():
    graph = import_graph(NAPO)
    leaks = {name: sorted(t for t in targets if t.startswith("napo.eval")) for name, targets in graph.items()}
    assert not {name: targets for name, targets in leaks.items() if name.startswith("napo.data") and targets}


def private_imports(root: Path) -> list[str]:
    """Every `from napo.x import _name` of a name that is not itself a module (importing a private module such as
    napo._native is how napo reaches its internals; importing another module's private function is not)."""
    modules, found = _modules(root), []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == root.name:
                for alias in node.names:
                    dunder = alias.name.startswith("__") and alias.name.endswith("__")  # __version__ is public
                    if alias.name.startswith("_") and not dunder and f"{node.module}.{alias.name}" not in modules:
                        found.append(f"{name}: from {node.module} import {alias.name}")
    return found


def test_the_private_import_check_finds_one(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_internal.py").write_text("def _helper():\n    pass\n")
    (package / "a.py").write_text("from pkg import _internal\nfrom pkg._internal import _helper\n")
    assert private_imports(package) == ["pkg.a: from pkg._internal import _helper"]


def test_no_module_imports_another_modules_private_name():
    assert private_imports(NAPO) == []


def test_every_module_imports_first_in_a_fresh_napo():
    """Each module of napo imported before any other, in a child forked from an interpreter that has imported torch
    but no napo: what the ast graph predicts, checked by Python itself. A circle through a package's __init__ fails
    here with 'partially initialized module'."""
    import subprocess
    import sys

    names = sorted(name for name in _modules(NAPO) if name != "napo.__main__")
    script = (
        "import importlib, os, sys, torch\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    read, write = os.pipe()\n"
        "    if os.fork() == 0:\n"
        "        os.close(read)\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "            message = b''\n"
        "        except BaseException as error:\n"
        "            message = f'{name}: {type(error).__name__}: {error}'.encode()\n"
        "        os.write(write, message)\n"
        "        os._exit(0)\n"
        "    os.close(write)\n"
        "    with os.fdopen(read, 'rb') as pipe:\n"
        "        message = pipe.read().decode()\n"
        "    os.wait()\n"
        "    if message:\n"
        "        failed.append(message)\n"
        "print('\\n'.join(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", result.stdout
