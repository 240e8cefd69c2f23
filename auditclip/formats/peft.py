"""PEFT adapter folders: which tensors are LoRA pairs, and the scaling of each pair's update.

What the folder holds (as peft 0.21's ``save_pretrained`` writes it; read from its source and files)
-----------------------------------------------------------------------------------------------------
* ``adapter_config.json``: the config, a JSON object. For LoRA: ``peft_type`` ``"LORA"``,
  ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern`` / ``alpha_pattern`` (per-module
  overrides of r / alpha, keyed by a regular expression that must match the end of the
  module's name, segment-aligned: ``re.match(rf"(.*\\.)?({key})$", name)``; the first key
  in the dict that matches wins), ``fan_in_fan_out``, ``target_modules``,
  ``modules_to_save``, ``use_dora``, ``lora_bias``, ``base_model_name_or_path``.
* ``adapter_model.safetensors`` (``{"format": "pt"}`` metadata), or ``adapter_model.bin``
  (a ``torch.save`` of the same dict) with ``safe_serialization=False``; peft reads the
  safetensors file when both exist, and so does :func:`adapter_weights_file`.
  Keys are the PEFT model's parameter names with the adapter name removed:

  - ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
    ``[out, r]`` (Linear, and Conv1D with ``fan_in_fan_out``); convolutions store
    ``[r, in, *kernel]`` and ``[out, r, 1, ...]``;
  - ``base_model.model.<module>.lora_embedding_A`` ``[r, num_embeddings]`` and
    ``.lora_embedding_B`` ``[embedding_dim, r]`` (embeddings; the update is transposed);
  - ``.lora_B.bias`` ``[out]`` with ``lora_bias=True`` (added to the base bias, scaled);
  - ``.lora_magnitude_vector`` ``[out]`` with DoRA;
  - ``modules_to_save`` copies under the module's own name
    (``base_model.model.transformer.ln_f.weight``, no ``modules_to_save.default``).

* More than one adapter: the ``default`` one in the folder, each other in a subfolder
  named after it (``second/adapter_config.json`` ...); :func:`adapter_folders` lists them.
* A ``transformers`` ``Trainer`` training a PEFT model writes the same two files (and a
  ``README.md``) into each ``checkpoint-<step>/``, beside ``optimizer.pt``,
  ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json`` and ``training_args.bin``.

The update of module m is ΔW = scaling · B @ A with scaling = alpha / r, or
alpha / sqrt(r) with ``use_rslora`` (r and alpha after ``rank_pattern`` / ``alpha_pattern``).
:func:`read_adapter_index` reads the config and the tensor headers (no tensor data),
pairs A with B per module and checks the stored shapes against the config.

What is said rather than guessed
--------------------------------
* An A without its B (or the reverse), factors that do not multiply, or a rank the
  config contradicts: the module gets a ``problem``, a note says its A/B are audited as
  raw tensors only, and no update is computed for it.
* DoRA and the other LoRA variants (``use_dora``, ``alora_invocation_tokens``,
  ``use_bdlora``, ``velora_config``, ``monteclora_config``, ``arrow_config``,
  ``kasa_config``, ``use_qalora``, ``init_lora_weights="mica"``): the module's ``variant``
  is set and a note says the update measured is scaling · B @ A only.
* PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA initialisation changes the base weights: a
  note says the update is relative to those changed weights.
* Another ``peft_type`` (AdaLoRA, LoHa, IA3...): no pairs; every tensor is a raw row,
  and a note says so. A folder whose config is not a JSON object with a ``peft_type``,
  or without a weights file: :class:`CheckpointError`.

>>> import json, tempfile, torch
>>> from safetensors.torch import save_file
>>> d = Path(tempfile.mkdtemp())
>>> _ = (d / "adapter_config.json").write_text(json.dumps(
...     {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"v": 2}}))
>>> save_file({"base_model.model.q.lora_A.weight": torch.zeros(4, 3), "base_model.model.q.lora_B.weight": torch.zeros(5, 4),
...            "base_model.model.v.lora_A.weight": torch.zeros(2, 3), "base_model.model.v.lora_B.weight": torch.zeros(5, 2)},
...           str(d / "adapter_model.safetensors"))
>>> [(m.key, m.rank, m.scaling, m.delta_shape) for m in read_adapter_index(d).modules]
[('q', 4, 2.0, (5, 3)), ('v', 2, 4.0, (5, 3))]
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..notices import note
from .detect import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .readers import open_checkpoint_file

#: The prefix of every key a PeftModel saves (the base model inside the LoRA model).
PREFIX = "base_model.model."

#: Stored key suffix -> (role, factor): what each LoRA tensor is.
SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
    (".lora_embedding_A", "lora_A"), (".lora_embedding_B", "lora_B"),
    (".lora_B.bias", "lora_bias"),
    (".lora_magnitude_vector", "dora_magnitude"), (".lora_magnitude_vector.weight", "dora_magnitude"),
)
#: Config fields that switch a LoRA variant on (peft tags them ``is_lora_variant``).
VARIANT_FIELDS = ("use_dora", "alora_invocation_tokens", "use_bdlora", "velora_config", "monteclora_config",
                  "arrow_config", "kasa_config", "use_qalora")
#: ``init_lora_weights`` values that change the base weights when the adapter is created.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its two factors, their scaling, and anything that stops ΔW.

    ``module``: the stored prefix (``base_model.model.transformer.h.0.attn.c_attn``);
    ``key``: the base model's module name (``transformer.h.0.attn.c_attn``), which
    ``rank_pattern``/``alpha_pattern`` match; ``target``: the base weight ΔW adds to.
    ``a_name``/``b_name``: the tensors as :func:`auditclip.formats.readers.open_checkpoint_file`
    names them. ``delta_shape``: ``[out, in]`` of B @ A (peft's merged update is its
    transpose for ``fan_in_fan_out`` layers and embeddings, and a convolution kernel's
    reshape for convolutions). ``problem``: why ΔW is not computed, or None.
    ``variant``: a LoRA variant whose merged update is not scaling · B @ A, or None.
    """

    module: str
    key: str
    a_name: str | None
    b_name: str | None
    rank: int
    alpha: float
    scaling: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    embedding: bool = False
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()
    bias_name: str | None = None
    magnitude_name: str | None = None
    variant: str | None = None
    problem: str | None = None
    param: str = "weight"

    @property
    def delta_name(self) -> str:
        """The name of this module's ΔW row: ``<module>.delta_weight``."""
        return f"{self.module}.delta_weight"

    @property
    def target(self) -> str:
        """The base model's parameter the update adds to (``weight``, or a ``target_parameters`` name)."""
        return f"{self.key}.{self.param}"

    @property
    def delta_shape(self) -> tuple[int, int]:
        return (self.b_shape[0] if self.b_shape else 0, math.prod(self.a_shape[1:]) if self.a_shape else 0)


@dataclass(frozen=True)
class AdapterTensor:
    """One stored tensor and its role: ``lora_A``, ``lora_B``, ``lora_bias``, ``dora_magnitude``,
    ``modules_to_save`` or ``other``; ``module``: the LoRA module it belongs to, if any."""

    name: str
    role: str
    module: str | None
    dtype: str
    shape: tuple[int, ...]


@dataclass
class AdapterIndex:
    """What :func:`read_adapter_index` found in one adapter folder (no tensor data read)."""

    folder: Path
    config_path: Path
    weights: Path
    config: dict[str, Any]
    peft_type: str
    modules: list[LoraModule] = field(default_factory=list)
    tensors: list[AdapterTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def base_model(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) else None

    def module_of(self, name: str) -> str | None:
        """The LoRA module a stored tensor belongs to, or None."""
        return next((t.module for t in self.tensors if t.name == name), None)

    def kinds(self) -> dict[str, tuple[str, str]]:
        """``(kind, kind_rule)`` of every stored tensor and of every ΔW row, as stats.csv and clip report them.

        A stored tensor is ``adapter``: a trained tensor of the adapter, which ``clip`` and the
        range rule treat as a parameter; except one the name rule calls a buffer (a
        ``modules_to_save`` copy of a BatchNorm's ``running_var``), which stays ``buffer``.
        The ``<module>.delta_weight`` row of each module whose update is computed is
        ``adapter_delta``. The rule names the adapter config that decided.

        >>> index = AdapterIndex(Path("a"), Path("a/adapter_config.json"), Path("a/adapter_model.safetensors"),
        ...                      {}, "LORA", tensors=[AdapterTensor("m.lora_A.weight", "lora_A", "m", "float32", (2, 3))],
        ...                      modules=[LoraModule("m", "m", "m.lora_A.weight", None, 2, 2.0, 1.0, problem="x")])
        >>> index.kinds()
        {'m.lora_A.weight': ('adapter', 'adapter_config.json: lora_A of LoRA module m')}
        """
        from ..kinds import tensor_kind  # the name rule, for what an adapter folder stores beside its factors

        siblings = {t.name for t in self.tensors}
        out: dict[str, tuple[str, str]] = {}
        for t in self.tensors:
            if t.module is not None:
                out[t.name] = ("adapter", f"{ADAPTER_CONFIG}: {t.role} of LoRA module {t.module}")
                continue
            kind, rule = tensor_kind(t.name, siblings=siblings)
            what = "a modules_to_save copy" if t.role == "modules_to_save" else f"a {self.peft_type} adapter tensor"
            out[t.name] = (kind, f"{rule} ({what})") if kind == "buffer" else ("adapter", f"{ADAPTER_CONFIG}: {what}")
        for m in self.modules:
            if m.problem is None:
                out[m.delta_name] = ("adapter_delta", f"{ADAPTER_CONFIG}: scaling · B @ A of LoRA module {m.module}")
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per stored tensor: ``tensor``, ``kind`` (see :meth:`kinds`), ``role``, ``module``."""
        kinds = self.kinds()
        return [{"tensor": t.name, "kind": kinds[t.name][0], "role": t.role, "module": t.module} for t in self.tensors]


def adapter_weights_file(folder: str | Path) -> Path | None:
    """The weights file of an adapter folder (safetensors first, as peft reads), or None.

    >>> adapter_weights_file("sample_checkpoints") is None
    True
    """
    folder = Path(folder)
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


def is_adapter_folder(path: str | Path) -> bool:
    """True for a folder with ``adapter_config.json`` and an adapter weights file.

    >>> is_adapter_folder("sample_checkpoints")
    False
    """
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and adapter_weights_file(path) is not None


def adapter_folders(folder: str | Path) -> list[tuple[str, Path]]:
    """(adapter name, folder) of every adapter saved in ``folder``: ``default`` for the folder
    itself, and each subfolder holding another adapter (peft saves non-default adapters there).

    >>> adapter_folders("sample_checkpoints")
    []
    """
    folder = Path(folder)
    found = [("default", folder)] if is_adapter_folder(folder) else []
    if folder.is_dir():
        found += [(sub.name, sub) for sub in sorted(folder.iterdir()) if is_adapter_folder(sub)]
    return found


def adapter_index_for(weights: str | Path) -> AdapterIndex | None:
    """The index of the adapter folder whose weights file is ``weights``, or None when it is no adapter's.

    What run discovery opens for a ``checkpoint-<step>/`` of a PEFT ``Trainer`` is the
    folder's ``adapter_model.safetensors``: this tells analysis it holds LoRA factors.
    A weights file beside which peft would read another one (``.bin`` beside
    ``.safetensors``) is not taken for that adapter's.

    >>> adapter_index_for("sample_checkpoints/high_lr/epoch_01.safetensors") is None
    True
    """
    weights = Path(weights)
    if weights.name not in ADAPTER_WEIGHTS or not (weights.parent / ADAPTER_CONFIG).is_file():
        return None
    if adapter_weights_file(weights.parent) != weights:
        return None
    return read_adapter_index(weights.parent)


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a folder; :class:`CheckpointError` when unreadable.

    >>> read_adapter_config("sample_checkpoints")
    Traceback (most recent call last):
    ...
    auditclip.errors.CheckpointError: sample_checkpoints/adapter_config.json: no such file
    """
    path = Path(folder) / ADAPTER_CONFIG
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"not a readable JSON file: {' '.join(str(exc).split())}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("peft_type"), str):
        raise CheckpointError(path, "not a PEFT adapter config: expected a JSON object with a 'peft_type'")
    return doc


def _pattern_value(patterns: Any, key: str, default: Any, what: str, path: Path) -> Any:
    """peft's per-module override: the value of the first pattern matching the end of ``key``."""
    if not patterns:
        return default
    if not isinstance(patterns, dict):
        raise CheckpointError(path, f"'{what}' is not a JSON object")
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", key):
                return value
        except re.error as exc:
            raise CheckpointError(path, f"'{what}' key {pattern!r} is not a regular expression: {exc}") from None
    return default


def rank_and_alpha(config: dict[str, Any], key: str, path: Path | str = ADAPTER_CONFIG) -> tuple[int, float]:
    """(r, lora_alpha) peft gives the module named ``key`` (``rank_pattern``/``alpha_pattern`` honoured).

    >>> rank_and_alpha({"r": 8, "lora_alpha": 16, "rank_pattern": {"c_proj": 2}, "alpha_pattern": {"mlp.c_proj": 3}},
    ...                "transformer.h.0.mlp.c_proj")
    (2, 3.0)
    >>> rank_and_alpha({"r": 8, "lora_alpha": 16, "rank_pattern": {"c_proj": 2}}, "h.0.attn.c_attn")
    (8, 16.0)
    """
    path = Path(path)
    r = _pattern_value(config.get("rank_pattern"), key, config.get("r"), "rank_pattern", path)
    alpha = _pattern_value(config.get("alpha_pattern"), key, config.get("lora_alpha"), "alpha_pattern", path)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise CheckpointError(path, f"rank of {key!r} is {r!r}, not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(path, f"lora_alpha of {key!r} is {alpha!r}, not a number")
    return r, float(alpha)


def _split(name: str) -> tuple[str | None, str]:
    for suffix, role in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], role
    return None, "other"


def _variant(config: dict[str, Any]) -> str | None:
    on = [f for f in VARIANT_FIELDS if config.get(f)]
    if config.get("init_lora_weights") == "mica":
        on.append("init_lora_weights=mica")
    return ", ".join(on) or None


def _say(index: AdapterIndex, message: str) -> None:
    index.notes.append(message)
    note(message)


def read_adapter_index(folder: str | Path) -> AdapterIndex:
    """Index a PEFT adapter folder: LoRA pairs with their scaling, and every other tensor.

    Reads ``adapter_config.json`` and the weights file's header (no tensor data). See the
    module docstring for the layout and for what is noted rather than guessed.

    >>> import json, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
    ...     "use_rslora": True}))
    >>> save_file({"base_model.model.q.lora_A.weight": torch.zeros(4, 3), "base_model.model.ln.weight": torch.ones(3),
    ...            "base_model.model.k.lora_B.weight": torch.zeros(5, 4)}, str(d / "adapter_model.safetensors"))
    >>> index = read_adapter_index(d)
    >>> [(m.key, m.scaling, m.problem) for m in index.modules]
    [('k', 4.0, 'lora_B without lora_A'), ('q', 4.0, 'lora_A without lora_B')]
    >>> [(t.name, t.role) for t in index.tensors][-1]
    ('base_model.model.q.lora_A.weight', 'lora_A')
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    config_path = folder / ADAPTER_CONFIG
    weights = adapter_weights_file(folder)
    if weights is None:
        raise CheckpointError(folder, f"{ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)} beside it",
                              kind="missing_shard")
    peft_type = config["peft_type"].upper()
    index = AdapterIndex(folder, config_path, weights, config, peft_type)
    with open_checkpoint_file(weights) as reader:
        infos = {name: reader.info(name) for name in reader.names()}
        raw = reader.name_map
    lora = peft_type == "LORA"
    parts: dict[str, dict[str, str]] = {}
    roles: dict[str, tuple[str, str | None]] = {}
    save = [m for m in (config.get("modules_to_save") or []) if isinstance(m, str)]
    for name in infos:
        module, role = _split(raw[name]) if lora else (None, "other")
        if module is not None:
            parts.setdefault(module, {})[role] = name
            roles[name] = (role, module)
            continue
        stem = raw[name].rsplit(".", 1)[0]
        kept = any(stem == m or stem.endswith("." + m) for m in save)
        roles[name] = ("modules_to_save" if kept else "other", None)
    if not lora:
        _say(index, f"{peft_type} adapters: auditclip computes the effective update only for LORA adapters; "
                    "their tensors are audited as raw tensors")
    variant = _variant(config) if lora else None
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    rslora = bool(config.get("use_rslora"))
    for module in sorted(parts):
        p = parts[module]
        key = module[len(PREFIX):] if module.startswith(PREFIX) else module
        if "lora_A" not in p and "lora_B" not in p:  # a bias or magnitude without factors
            for name in p.values():
                roles[name] = ("other", None)
            continue
        r, alpha = rank_and_alpha(config, key, config_path)
        a, b = p.get("lora_A"), p.get("lora_B")
        a_shape = infos[a].shape if a else ()
        b_shape = infos[b].shape if b else ()
        problem = None
        if a is None or b is None:
            problem = "lora_A without lora_B" if b is None else "lora_B without lora_A"
        elif not (infos[a].is_float and infos[b].is_float):
            problem = f"factors of dtype {infos[a].dtype}/{infos[b].dtype}, not floating point"
        elif len(a_shape) < 2 or len(b_shape) < 2 or b_shape[1] != a_shape[0] or any(d != 1 for d in b_shape[2:]):
            problem = f"lora_B {list(b_shape)} does not multiply lora_A {list(a_shape)}"
        elif a_shape[0] != r:
            problem = (f"the factors have rank {a_shape[0]} but {ADAPTER_CONFIG} gives r={r} for this module "
                       "(a rank_pattern this reading does not match, or experts stacked in one factor)")
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        embedding = (a or b or "").endswith(("lora_embedding_A", "lora_embedding_B"))
        param = "weight"
        for entry in config.get("target_parameters") or []:  # LoRA on a parameter: module.param
            owner, _, name = str(entry).rpartition(".")
            if owner and (key == owner or key.endswith("." + owner)):
                param = name
        index.modules.append(LoraModule(
            module=module, key=key, a_name=a, b_name=b, rank=r, alpha=alpha, scaling=scaling, use_rslora=rslora,
            fan_in_fan_out=fan_in_fan_out, embedding=embedding, a_shape=a_shape, b_shape=b_shape,
            bias_name=p.get("lora_bias"), magnitude_name=p.get("dora_magnitude"), variant=variant, problem=problem,
            param=param))
        if problem:
            _say(index, f"{weights}: {module}: {problem}; its LoRA tensors are audited as raw tensors, "
                        "without an effective update")
    index.tensors = [AdapterTensor(n, *roles[n], infos[n].dtype, infos[n].shape) for n in sorted(infos)]
    if lora and variant and index.modules:
        _say(index, f"LoRA adapters with {variant}: the update measured is scaling · B @ A only, "
                    "not the merged change of the weights")
    init = config.get("init_lora_weights")
    if lora and isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        _say(index, f"LoRA adapters with init_lora_weights={init} changed the base weights when they were made; "
                    "their update is relative to those changed weights, not to the base model")
    if lora and not index.modules:
        _say(index, f"{weights}: a LORA adapter without lora_A/lora_B tensors")
    return index
