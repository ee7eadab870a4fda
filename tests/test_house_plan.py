"""The house plan, checked: imports run downhill and collectives stay in parallel/.

kernels/ and data/ import nothing of plait; parallel/ may import kernels/ and data/;
models/ may import kernels/ and parallel/; nothing imports launcher/. Outside parallel/ (and
tests), no module touches torch.distributed directly.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["kernels", "data", "parallel", "models", "launcher"]
ALLOWED = {
    "kernels": set(),
    "data": set(),
    "parallel": {"kernels", "data"},
    "models": {"kernels", "parallel"},
    "launcher": {"kernels", "data", "parallel", "models"},
}


def _modules(pkg):
    return sorted((REPO / pkg).rglob("*.py"))


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_run_downhill(pkg):
    bad = []
    for path in _modules(pkg):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "plait" and len(parts) > 1 and parts[1] != pkg:
                if parts[1] not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", [p for p in PACKAGES if p != "parallel"])
def test_no_raw_collectives_outside_parallel(pkg):
    bad = []
    for path in _modules(pkg):
        for name in _imports(path):
            if name.startswith("torch.distributed"):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
        if "dist.all_reduce" in path.read_text() or "torch.distributed." in path.read_text():
            bad.append(f"{path.relative_to(REPO)} calls torch.distributed")
    assert not bad, "\n".join(bad)


def test_every_package_folder_is_installed():
    """pyproject maps each folder to plait.<folder>: a new sub-package must be listed there."""
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["package-dir"].values())
    found = {
        str(p.parent.relative_to(REPO))
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("__init__.py")
    }
    assert found <= listed, f"not installed: {sorted(found - listed)}"
