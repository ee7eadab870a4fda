"""The house plan, checked: imports run downhill and collectives stay in parallel/.

errors/ (the user-error type) imports nothing of plait and everything may import it;
kernels/ and data/ import nothing else of plait; parallel/ may import kernels/ and data/;
models/ may import kernels/ and parallel/; nothing imports launcher/. Outside parallel/ (and
tests), no module touches torch.distributed directly.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["errors", "kernels", "data", "parallel", "models", "launcher"]
ALLOWED = {
    "errors": set(),
    "kernels": {"errors"},
    "data": {"errors"},
    "parallel": {"errors", "kernels", "data"},
    "models": {"errors", "kernels", "parallel"},
    "launcher": {"errors", "kernels", "data", "parallel", "models"},
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


def test_every_package_folder_is_installed(tmp_path):
    """The wheel holds every folder with an __init__.py as plait.<folder> (setup.py finds
    them, so a new family folder needs no list edit), and nothing outside plait/."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("plait-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    found = {
        f"plait/{p.relative_to(REPO).as_posix()}"
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("__init__.py")
    }
    assert found <= set(names), f"not installed: {sorted(found - set(names))}"
    outside = {n.split("/")[0] for n in names} - {
        "plait",
        wheel.name.split("-")[0] + "-0.1.0.dist-info",
    }
    assert not {o for o in outside if not o.endswith(".dist-info")}, outside
