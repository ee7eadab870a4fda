"""The modeling code an export ships, assembled from the registered families.

An export's directory holds plain-PyTorch modeling code for transformers'
``trust_remote_code`` that imports nothing from plait:
    configuration_plait.py   PlaitConfig (models/common/hf_modeling/)
    modeling_plait.py        the model, its blocks and its cache (models/common/hf_modeling/)
    plait_layers.py          what every letter shares, and letter A (models/common/hf_modeling/)
    mixer_<family>.py        each family's HF mixers: its own ``hf_mixer.py``, copied
    plait_mixers.py          written here: imports the mixer of every letter of the pattern
                             and maps letters to classes (``MIXERS``)
A family brings its HF code the way it brings everything else, in its own folder: its
``Family.hf_code`` file, and each letter's class name (``LetterExport.hf_class``). Nothing
here names a family; a family registered from outside plait (a run config's
``model.families``) exports the same way.

``load_code`` imports an assembled directory as a package in this process (tests,
benchmarks), as transformers would from an export.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from pathlib import Path

from . import family

COMMON = Path(__file__).with_name("hf_modeling")
COMMON_FILES = ("configuration_plait.py", "modeling_plait.py", "plait_layers.py")


def shipped_name(fam: family.Family) -> str:
    """The module name a family's HF code gets in an export."""
    if fam.hf_code is not None and Path(fam.hf_code).parent == COMMON:
        return Path(fam.hf_code).stem  # shipped anyway (letter A lives in plait_layers)
    return f"mixer_{fam.name}"


def code_files(pattern: str) -> dict[str, str]:
    """{file name: text} of every file an export of a model with this pattern ships."""
    files = {name: (COMMON / name).read_text() for name in COMMON_FILES}
    imports: dict[str, list[str]] = {}
    table = []
    for symbol in dict.fromkeys(pattern):
        fam, letter = family.family_of(symbol), family.letter(symbol)
        module = shipped_name(fam)
        if f"{module}.py" not in files:
            files[f"{module}.py"] = Path(fam.hf_code).read_text()
        imports.setdefault(module, []).append(letter.hf_export.hf_class)
        table.append(f"    {symbol!r}: {letter.hf_export.hf_class},")
    lines = [
        '"""The token mixer of each pattern letter of this export, from the families\' modules',
        '(written by plait\'s export: models/common/hf_code.py)."""',
        "",
        "from __future__ import annotations",
        "",
    ]
    for module, names in sorted(imports.items()):
        lines.append(f"from .{module} import {', '.join(sorted(set(names)))}")
    lines += ["", "MIXERS = {", *table, "}", ""]
    files["plait_mixers.py"] = "\n".join(lines)
    return files


def write_code(directory: Path, pattern: str) -> list[str]:
    """Write the modeling code for ``pattern`` into ``directory``; returns the file names."""
    files = code_files(pattern)
    for name, text in files.items():
        (Path(directory) / name).write_text(text)
    return sorted(files)


def load_code(directory: Path) -> types.ModuleType:
    """Import an assembled code directory as a package (a name of its own, from its path)
    and return its ``modeling_plait`` module."""
    directory = Path(directory).resolve()
    name = "plait_hf_" + hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    if f"{name}.modeling_plait" in sys.modules:
        return sys.modules[f"{name}.modeling_plait"]
    init = directory / "__init__.py"
    if not init.exists():
        init.write_text("")
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(directory)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.modeling_plait")
