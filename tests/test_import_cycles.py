"""No import cycle anywhere in plait, function-local imports included.

A cycle hidden by a function-local import still ties two modules together: neither can be
read, tested or moved without the other (launcher/ had train -> loop -> evaluate -> train).
The test builds the graph of every module's imports of plait modules, wherever the import
statement sits (module level, inside a function, under TYPE_CHECKING), resolves relative
imports and ``from package import module`` to the module files, and reports every strongly
connected component of more than one module. A package's ``__init__`` is a module like any
other: importing ``plait.models`` runs its ``__init__``. Imports under ``if TYPE_CHECKING:``
are left out (they never run), and so is a module's import of its own ancestor packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("errors", "kernels", "data", "parallel", "models", "launcher")


def _module_files() -> dict[str, Path]:
    """plait module name -> file, for every .py under the packages (``__init__`` names its
    package)."""
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            parts = ["plait", *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The plait modules this file imports, wherever the statement sits, except under
    ``if TYPE_CHECKING:`` (never run: annotations only). A module's own ancestors are not
    edges: Python runs a package's __init__ before its submodules anyway, and a submodule
    reaching a sibling through the package is the ordinary case."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = name if _is_package(path) else name.rsplit(".", 1)[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    found: set[str] = set()

    def add(target: str) -> None:
        parts = target.split(".")  # the longest plait module the dotted name starts with
        while parts and ".".join(parts) not in modules:
            parts.pop()
        target = ".".join(parts)
        if target and target != name and not name.startswith(target + "."):
            found.add(target)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("plait."):
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("plait"):
                continue
            for a in node.names:  # ``from pkg import mod`` imports the module pkg.mod
                sub = f"{module}.{a.name}"
                add(sub if sub in modules else module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle_in_plait():
    graph = import_graph()
    assert len(graph) > 100  # every module was read
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_function_local_cycle():
    """The detector is real: the launcher cycle this test exists for (loop's validation
    importing the training command, which imports the loop), re-added as a function-local
    import, is found."""
    graph = import_graph()
    graph["plait.launcher.evaluation"] = graph["plait.launcher.evaluation"] | {
        "plait.launcher.trainer"
    }
    assert "plait.launcher.trainer" in graph["plait.launcher.evaluation"]
    found = cycles(graph)
    assert any("plait.launcher.trainer" in c and "plait.launcher.loop" in c for c in found)


def test_function_local_imports_are_edges(tmp_path):
    modules = {"plait.a": tmp_path / "a.py", "plait.b": tmp_path / "b.py"}
    (tmp_path / "a.py").write_text("def f():\n    from plait import b\n")
    (tmp_path / "b.py").write_text("import plait.a\n")
    modules["plait"] = tmp_path / "__init__.py"
    (tmp_path / "__init__.py").write_text("")
    graph = {n: _edges(n, p, modules) for n, p in modules.items()}
    assert graph["plait.a"] == {"plait.b"} and graph["plait.b"] == {"plait.a"}
    assert cycles(graph) == [["plait.a", "plait.b"]]
