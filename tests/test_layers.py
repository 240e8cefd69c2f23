"""The package's import graph: modules meet only through public names.

Read from each module's source with ``ast`` (nothing is imported), so a test
fails on the line that breaks the rule, whether the import is at module level
or inside a function.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "auditclip"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    source: str  # the module imported from (absolute)
    name: str | None  # the name imported from it; None for ``import auditclip.x``
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[Import]:
    """Every import of an ``auditclip`` module in one file, relative imports made absolute."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "auditclip" or source.startswith("auditclip."):
                for alias in node.names:
                    # ``from auditclip.formats import dcp`` imports a module, not a name
                    sub = f"{source}.{alias.name}"
                    if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or \
                            (PACKAGE.parent / sub.replace(".", "/")).is_dir():
                        out.append(Import(module, sub, None, node.lineno))
                    else:
                        out.append(Import(module, source, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [Import(module, a.name, None, node.lineno) for a in node.names
                    if a.name == "auditclip" or a.name.startswith("auditclip.")]
    return out


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
ALL_IMPORTS = [i for p in MODULES.values() for i in imports_of(p)]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_walk_sees_the_package() -> None:
    # a walk that found nothing would pass every rule below
    assert {"auditclip.checkpoints", "auditclip.clip_files", "auditclip.cli"} <= set(MODULES)
    assert any(i.module == "auditclip.clip_files" and i.source == "auditclip.checkpoints" for i in ALL_IMPORTS)
    assert any(i.module == "auditclip" and i.name == "__version__" for i in ALL_IMPORTS)


def test_the_walk_makes_relative_imports_absolute() -> None:
    # an independent case: a relative import two levels up, and a private name, are both seen
    sample = PACKAGE / "formats" / "dcp.py"
    found = imports_of(sample)
    assert all(i.source.startswith("auditclip.") for i in found)
    assert any(i.source == "auditclip.errors" and i.name == "CheckpointError" for i in found)


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [f"{i.module}:{i.line} imports {i.name} from {i.source}" for i in ALL_IMPORTS
           if i.name and is_private(i.name) and i.source != i.module]
    assert not bad, "give these names a public name in their home module:\n" + "\n".join(bad)


def test_discovery_and_clipping_meet_only_through_public_names() -> None:
    pair = {"auditclip.checkpoints", "auditclip.clip_files"}
    between = [i for i in ALL_IMPORTS if i.module in pair and i.source in pair - {i.module}]
    assert not [i for i in between if i.name is None or is_private(i.name)], between
    # discovery is below clipping: it never imports it
    assert not [i for i in between if i.module == "auditclip.checkpoints"], between


@pytest.mark.parametrize("module", ["auditclip.checkpoints", "auditclip.clip_files"])
def test_no_attribute_access_to_private_names_of_imported_modules(module: str) -> None:
    # ``from auditclip import readers; readers._x`` would dodge the import rule
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    aliases = set()
    for node in ast.walk(tree):
        ours = (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("auditclip"))
                or isinstance(node, ast.Import))
        if ours:
            for a in node.names:  # type: ignore[union-attr]
                if isinstance(node, ast.ImportFrom) or a.name.startswith("auditclip"):
                    aliases.add(a.asname or a.name.split(".")[0])
    bad = [f"{n.lineno}: {n.value.id}.{n.attr}" for n in ast.walk(tree)
           if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
           and is_private(n.attr)]
    assert not bad, bad


# The format layer (auditclip/formats/) is below discovery, clipping, the analysis and
# the CLI: besides itself it may use only these small utilities, which import nothing
# from above either (checked below), so nothing above can leak in through them.
FORMAT_LAYER_UTILITIES = {"auditclip.errors", "auditclip.notices", "auditclip.paths", "auditclip.output",
                          "auditclip.kinds", "auditclip._version"}
FORMAT_MODULES = sorted(m for m in MODULES if m == "auditclip.formats" or m.startswith("auditclip.formats."))


def in_format_layer(source: str) -> bool:
    return source == "auditclip.formats" or source.startswith("auditclip.formats.")


def test_the_format_layer_holds_every_reader_and_writer() -> None:
    assert {"auditclip.formats.readers", "auditclip.formats.writers", "auditclip.formats.dtypes",
            "auditclip.formats.safe_pickle", "auditclip.formats.dcp", "auditclip.formats.deepspeed",
            "auditclip.formats.peft"} <= set(FORMAT_MODULES)
    # no second copy left behind at the top level, and nobody imports the old paths
    for old in ("readers", "writers", "dtypes", "safe_pickle"):
        assert f"auditclip.{old}" not in MODULES
        assert not [i for i in ALL_IMPORTS if i.source == f"auditclip.{old}"]


@pytest.mark.parametrize("module", FORMAT_MODULES)
def test_format_modules_import_nothing_from_above(module: str) -> None:
    above = [f"{i.line}: {i.source}" for i in imports_of(MODULES[module])
             if not in_format_layer(i.source) and i.source not in FORMAT_LAYER_UTILITIES]
    assert not above, f"{module} imports from above the format layer: {above}"
    for forbidden in ("auditclip.checkpoints", "auditclip.clip_files", "auditclip.analysis", "auditclip.cli"):
        assert not [i for i in imports_of(MODULES[module]) if i.source == forbidden]


def test_the_format_layers_utilities_stay_below_it() -> None:
    for module in FORMAT_LAYER_UTILITIES & set(MODULES):
        up = [i.source for i in imports_of(MODULES[module]) if i.source not in FORMAT_LAYER_UTILITIES]
        assert not up, f"{module} imports {up}: the format layer would depend on them through it"


# What only the format layer defines: reading, writing and unpickling checkpoint files.
FORMAT_FUNCTIONS = {"open_checkpoint_file", "read_shard_index", "read_safetensors_metadata", "load_torch_file",
                    "load_torch_meta", "zip_byteorder", "write_safetensors", "save_torch", "write_patched_copy",
                    "dtype_name", "torch_dtype", "pickle_module", "read_dcp_index", "read_deepspeed_index"}


@pytest.mark.parametrize("module", ["auditclip.checkpoints", "auditclip.clip_files"])
def test_discovery_and_clipping_take_format_code_from_the_format_layer(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & FORMAT_FUNCTIONS, f"{module} defines format code itself: {defined & FORMAT_FUNCTIONS}"
    used = {i.name for i in imports_of(MODULES[module]) if i.name in FORMAT_FUNCTIONS}
    assert used, "the check below would pass on a module that reads no file"
    for i in imports_of(MODULES[module]):
        if i.name in FORMAT_FUNCTIONS:
            assert in_format_layer(i.source), f"{module}:{i.line} takes {i.name} from {i.source}"
