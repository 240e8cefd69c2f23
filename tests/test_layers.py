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


# --- file-name knowledge: the format layer answers "is this a checkpoint, and of which kind?" ------

# The tables discovery and clipping match names against: defined in auditclip/formats/ only.
FILE_NAME_TABLES = {"HF_WEIGHT_NAMES", "TRAINER_STATE_FILES", "RESUME_STATE_FILES", "LIGHTNING_LAST",
                    "ACCELERATE_EXTRA_MODEL", "ACCELERATE_FSDP_MODEL", "DCP_OPTIMIZER_FOLDER", "SHARD_SUFFIXES"}
# Words only a file-name rule has: an extension, or a name a trainer or a format gives its files.
FILE_NAME_HINT = r"safetensors|\b(?:bin|pt|pth|pkl|json|distcp)\b|optim|model_states|pytorch_model|adapter_"


def module_level_names(tree: ast.Module) -> dict[str, ast.expr]:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            out.update({t.id: node.value for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            out[node.target.id] = node.value
    return out


def file_name_tables(source: str) -> list[str]:
    """Module-level tables (tuples, sets, regexes...) whose strings look like file names; messages are not."""
    import re

    bad = []
    for name, value in module_level_names(ast.parse(source)).items():
        containers = [n for n in ast.walk(value) if isinstance(n, (ast.Tuple, ast.List, ast.Set, ast.Call))]
        if not containers:
            continue  # one string (a message, a format), however concatenated: not a table of names
        strings = [n.value for n in ast.walk(value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        if any(re.search(FILE_NAME_HINT, s, re.IGNORECASE) for s in strings):
            bad.append(name)
    return bad


def test_the_file_name_check_sees_tables_as_they_were_written() -> None:
    # the shapes the tables had in checkpoints.py / clip_files.py before they moved: each is caught
    old = '''
HF_WEIGHT_NAMES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")
TRAINER_STATE_FILES = re.compile(r"^(optimizer|scheduler)(_\\d+)?\\.(pt|bin|pth)$", re.IGNORECASE)
_ACCELERATE_EXTRA = re.compile(r"^(?:model|pytorch_model)_(\\d+)\\.(?:safetensors|bin)$")
_SHARD_SUFFIXES = (".safetensors",) + (".pt", ".bin")
_MASTER_WEIGHTS = re.compile(r"optim_states\\.pt$", re.IGNORECASE)
_NOTE = ("optimizer state copied as is ({}): " "--drop-trainer-state leaves it out")
_STEP_KEYS = ("global_step", "step")
'''
    assert file_name_tables(old) == ["HF_WEIGHT_NAMES", "TRAINER_STATE_FILES", "_ACCELERATE_EXTRA",
                                     "_SHARD_SUFFIXES", "_MASTER_WEIGHTS"]


@pytest.mark.parametrize("module", ["auditclip.checkpoints", "auditclip.clip_files"])
def test_discovery_and_clipping_define_no_file_name_tables(module: str) -> None:
    source = MODULES[module].read_text(encoding="utf-8")
    assert not file_name_tables(source), f"{module} matches file names itself: move to auditclip.formats.detect"
    assert not FILE_NAME_TABLES & set(module_level_names(ast.parse(source)))


def test_file_name_tables_are_defined_in_the_format_layer_only() -> None:
    where: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        for name in FILE_NAME_TABLES & set(module_level_names(ast.parse(path.read_text(encoding="utf-8")))):
            where.setdefault(name, []).append(module)
    assert where == {name: ["auditclip.formats.detect"] for name in FILE_NAME_TABLES}
    # and whoever uses them takes them from there
    users = [i for i in ALL_IMPORTS if i.name in FILE_NAME_TABLES]
    assert {i.module for i in users} >= {"auditclip.checkpoints", "auditclip.clip_files"}
    assert all(i.source == "auditclip.formats.detect" for i in users), users


def calls_in(tree: ast.AST) -> set[str]:
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def test_discovery_asks_detect_what_a_path_is() -> None:
    tree = ast.parse(MODULES["auditclip.checkpoints"].read_text(encoding="utf-8"))
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert any(i.source == "auditclip.formats.detect" and i.name == "detect"
               for i in imports_of(MODULES["auditclip.checkpoints"]))
    # where a path's kind is decided (listing a folder, a folder named, a path named, Checkpoint.format,
    # where its step is stored, whether its bytes may be folded as a duplicate), detect() decides it;
    # the family predicates are not asked one by one there
    for name in ("_list", "_expand_directory", "_expand", "format", "_stored_step", "_fold_duplicates"):
        calls = calls_in(functions[name])
        assert "detect" in calls, f"{name} does not ask detect()"
        assert not calls & {"dcp_folder", "is_deepspeed_tag_folder", "is_deepspeed_file"}, (name, calls)


def test_a_peft_adapter_folder_is_discovered_as_peft(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    import torch

    from auditclip.checkpoints import open_run
    from auditclip.formats.detect import detect

    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        st.save_file({"base_model.model.fc.lora_A.weight": torch.full((2, 4), float(step))}, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    run = open_run(tmp_path)
    assert [(c.label, c.format) for c in run] == [("checkpoint-1", "peft"), ("checkpoint-2", "peft")]
    (tmp_path / "plain.safetensors").write_bytes((tmp_path / "checkpoint-1" / "adapter_model.safetensors").read_bytes())
    # the same bytes without adapter_config.json beside them are plain safetensors
    assert detect(tmp_path / "plain.safetensors").format == "safetensors"


FAMILY_MODULES = ("safetensors", "torch_pickle", "dcp", "deepspeed")


def format_import_graph() -> dict[str, set[str]]:
    """Module -> the format modules it imports (function-local imports too), within the format layer."""
    graph: dict[str, set[str]] = {m: set() for m in FORMAT_MODULES}
    for i in ALL_IMPORTS:
        if i.module in graph and i.source in graph and i.source != i.module and i.source != "auditclip.formats":
            graph[i.module].add(i.source)
    return graph


def cycle_in(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (its modules in order), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) == []


def test_the_format_layer_has_no_import_cycle() -> None:
    assert cycle_in(format_import_graph()) == []


@pytest.mark.parametrize("family", FAMILY_MODULES)
def test_a_family_reads_through_the_shared_modules_not_the_reader(family: str) -> None:
    """Each family module builds on source/pinned/dtypes (and torch_pickle for .pt files), never on
    the reader layer that dispatches to it: readers imports the families, not the other way."""
    graph = format_import_graph()
    assert "auditclip.formats.readers" not in graph[f"auditclip.formats.{family}"]
    assert f"auditclip.formats.{family}" in graph["auditclip.formats.readers"]
