"""Re-evaluate original and clipped checkpoints on held-out data; sweep clipping ranges.

Clipping for evaluation happens in memory (:func:`auditclip.clipping.clip_state_dict`);
nothing is written. One checkpoint's weights are in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .analysis import RunLike
from .checkpoints import open_run
from .clipping import clip_state_dict
from .config import ClipSettings, ClipSpec, clip_variant
from .data import HeldOut, load_data
from .errors import CheckpointError, InputError
from .metrics import TASKS, CustomMetric, MetricTotals, Primary, infer_task, load_custom_metric, model_outputs, \
    resolve_primary
from .lm import decide_shift
from .modelref import ModelLoader, call_model, one_line, raised
from .kinds import tensor_kind
from .notices import note
from .output import atomic_path

SWEEP_FAMILIES = ("max_abs", "percentile", "sigma")
#: evaluation.csv's columns after the metrics and their deltas
EVAL_TAIL_COLUMNS = ("kind_rule", "n_loaded", "n_model_tensors", "primary_metric")


@dataclass
class EvalOptions:
    """How to evaluate: ``task``, ``metrics`` (custom ``module:fn``), batching, device, loading."""

    task: str = "auto"
    metrics: Sequence[str | CustomMetric] = ()
    batch_size: int = 256
    limit: int | None = None
    device: str = "auto"
    strict: bool = True
    strip_prefix: str | None = None
    add_prefix: str | None = None
    inputs_key: str = "x"
    targets_key: str = "y"
    target: str | None = None
    key: str | None = None
    sort: str = "step"
    extra: dict[str, Any] = field(default_factory=dict)
    #: the metric ``--tolerance`` applies to (None: accuracy, or loss for regression);
    #: a custom metric as ``NAME:higher`` / ``NAME:lower``
    primary_metric: str | None = None
    #: tensor selection of the clipped variants, exactly as for ``clip``: globs, overrides
    #: (``GLOB:KEY=VALUE``), a config file, buffers too
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    config: str | None = None
    buffers: bool | None = None
    #: without ``config``, read ``[tool.auditclip]`` of the nearest pyproject.toml (as the CLI does)
    search_config: bool = False
    #: language models: compare logits at t with labels at t + 1 (``auto``: a causal LM whose labels are its inputs)
    shift_labels: str = "auto"
    #: the folder of a saved tokenizer, for ``--data texts.jsonl``
    tokenizer: str | None = None
    #: ``--model hf``: the task (auto class) instead of config.architectures'; the base model of an adapter;
    #: whether the checkpoint's own code may run
    hf_task: str | None = None
    base: str | None = None
    trust_remote_code: bool = False
    #: PEFT adapter runs: clip the merged weights (base + scaling · B @ A) instead of the adapter's tensors
    clip_merged: bool = False
    #: PEFT adapter runs, as ``clip --adapter-mode``: clip the stored factors (``factors``) or each update ΔW
    #: refactored to rank r (``delta``)
    adapter_mode: str = "factors"
    #: called with (evaluations done, evaluations in all: checkpoints x (original + variants)), e.g. a progress bar
    progress: Callable[[int, int], None] | None = None


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; asking for a device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: no MPS device is available here; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name!r}: use auto, cpu, cuda or mps")
    return torch.device(name)


class Evaluator:
    """Runs a model over held-out data and returns the metrics."""

    def __init__(self, model_ref: str, data: str | HeldOut, options: EvalOptions) -> None:
        if options.task not in TASKS:
            raise InputError(f"--task {options.task!r}: use one of {', '.join(TASKS)}")
        self.options = options
        self.device = pick_device(options.device)
        self.loader = make_loader(model_ref, options, self.device)
        self.data = data if isinstance(data, HeldOut) else load_data(
            data, inputs_key=options.inputs_key, targets_key=options.targets_key, target=options.target,
            batch_size=options.batch_size, limit=options.limit, tokenizer=options.tokenizer)
        self._said: set[Any] = set()
        #: keep the batches on the device after the first pass (off the CPU: moving them is the cost)
        self.cache = self.device.type != "cpu"
        self._cache: list[tuple[Any, torch.Tensor]] | None = None
        self.custom: tuple[CustomMetric, ...] = tuple(
            load_custom_metric(m) if isinstance(m, str) else m for m in options.metrics)
        self.task: str | None = None if options.task == "auto" else options.task

    #: held-out data kept on the device between evaluations (``--device cuda``), up to this many bytes
    CACHE_BYTES = 1 << 30

    def _batches(self) -> Iterator[tuple[Any, torch.Tensor]]:
        """The held-out batches with their inputs on the device. Off the CPU, the first pass keeps
        them there (up to :attr:`CACHE_BYTES`), so N checkpoints x V variants move the data once."""
        if self._cache is not None:
            yield from self._cache
            return
        keep: list[tuple[Any, torch.Tensor]] | None = [] if self.cache else None
        size = 0
        for inputs, targets in self.data.batches():
            inputs = _to(inputs, self.device)
            if keep is not None:
                tensors = inputs.values() if isinstance(inputs, dict) else [inputs]
                size += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
                if size <= self.CACHE_BYTES:
                    keep.append((inputs, targets))
                else:
                    keep = None
            yield inputs, targets
        self._cache = keep

    def run(self, state: dict[str, torch.Tensor], checkpoint: str, path: str | None = None) -> dict[str, float]:
        model = self.loader.load(state, checkpoint, path)
        totals: MetricTotals | None = None
        with torch.inference_mode():
            for inputs, targets in self._batches():
                try:
                    out = call_model(model, inputs, self._said)
                except KeyboardInterrupt:
                    raise
                except SystemExit as exc:
                    raise InputError(f"--model {self.loader.ref}: running on --data {self.data.source}, "
                                     f"the model {raised(exc)}") from exc
                except Exception as exc:
                    shape = list(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
                    raise InputError(f"--data {self.data.source}: the model cannot take inputs of shape {shape}: "
                                     f"{one_line(exc)}") from exc
                outputs = model_outputs(out)
                if self.task is None:
                    self.task = infer_task(targets, outputs)
                if self.task != "lm" or self.custom:  # token sums run on the device: [B, T, V] logits stay
                    outputs = outputs.float().cpu()
                totals = totals or MetricTotals(self.task, self.custom)
                if self.task == "lm":
                    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                    shift = decide_shift(self.options.shift_labels, getattr(self.loader, "causal", False) or
                                         _is_causal(model), inputs, targets, self._said)
                    totals.update(outputs, targets, mask, shift)
                else:
                    totals.update(outputs, targets)
        if totals is None:
            raise InputError(f"--data {self.data.source}: no samples")
        return totals.result()


def make_loader(model_ref: str, options: EvalOptions, device: torch.device) -> ModelLoader:
    """The loader of ``--model``: ``hf`` (the checkpoint's config.json, :mod:`auditclip.hf_models`),
    a factory or a ``.pt2`` program.

    >>> type(make_loader("hf", EvalOptions(), torch.device("cpu"))).__name__
    'HFModelLoader'
    """
    if model_ref == "hf":
        from .hf_models import HFModelLoader

        return HFModelLoader(strict=options.strict, strip_prefix=options.strip_prefix, add_prefix=options.add_prefix,
                             device=device, task=options.hf_task, base=options.base,
                             trust_remote_code=options.trust_remote_code)
    for name, value in (("--hf-task", options.hf_task), ("--base", options.base),
                        ("--trust-remote-code", options.trust_remote_code), ("--clip-merged", options.clip_merged)):
        if value:
            raise InputError(f"{name} goes with --model hf (the model built from the checkpoint's config.json)")
    return ModelLoader(model_ref, strict=options.strict, strip_prefix=options.strip_prefix,
                       add_prefix=options.add_prefix, device=device)


def default_model(run: Any, model: str | None) -> str:
    """``--model`` as given, else ``hf`` when the run's checkpoints are Hugging Face folders
    (``config.json`` or ``adapter_config.json`` beside the weights).

    >>> default_model(open_run("sample_checkpoints/high_lr"), None)
    Traceback (most recent call last):
    ...
    auditclip.errors.InputError: Missing option '--model': ...
    """
    if model:
        return model
    from .hf_models import is_hf_run

    if is_hf_run([c.weights for c in run]):
        return "hf"
    raise InputError("Missing option '--model': give module:factory, file.py:factory or a .pt2 file "
                     "(--model hf, the default, needs a config.json beside the checkpoints)")


def _merged(evaluator: Evaluator, state: dict[str, torch.Tensor], label: str,
            path: str) -> tuple[dict[str, torch.Tensor], str]:
    """``--clip-merged``: the base weights with the checkpoint's adapter merged in, and the base folder."""
    merged = evaluator.loader.merged(state, path)  # type: ignore[attr-defined]
    if merged is None:
        raise InputError(f"--clip-merged: {label} is no PEFT adapter folder; --clip-merged clips base + adapter "
                         "merged, for adapter runs")
    return merged


def _is_causal(model: torch.nn.Module) -> bool:
    """A model of a factory is a causal LM when transformers says so (its class name, else its config)."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    from .hf_models import task_of

    return task_of(getattr(getattr(model, "config", None), "architectures", None)) == "causal-lm"


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs


def _read_state(ckpt: Any, key: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checkpoint's tensors (a tied one once) and its tied names -> the name kept."""
    with ckpt.open(key) as reader:
        return {name: reader.get(name) for name in reader.names()}, reader.tied


def _with_tied(state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state`` plus each tied name (``lm_head.weight``) on its kept tensor: the model's state dict
    names both, while counting and clipping see the tensor once."""
    return {**state, **{alias: state[kept] for alias, kept in tied.items() if kept in state}} if tied else state


def clip_variants(clips: Sequence[str | ClipSpec | ClipSettings],
                  options: EvalOptions | None = None) -> list[tuple[str, ClipSettings]]:
    """Each clip variant's name and the settings ``clip`` would use for it (one resolution:
    :func:`auditclip.config.clip_variant`), so a scored variant is the file ``clip`` writes.

    >>> [name for name, _ in clip_variants(["max_abs=0.5", "max_abs=1"])]
    ['max_abs=0.5', 'max_abs=1']
    """
    o = options or EvalOptions()
    selection = {"include": o.include, "exclude": o.exclude, "buffers": o.buffers}
    out = []
    for c in clips:
        settings = c if isinstance(c, ClipSettings) else clip_variant(
            c, o.config, selection, o.overrides, search=o.search_config)
        name = str(settings.spec) if settings.spec else "custom"
        if settings.spec and any(name == seen for seen, _ in out):  # the same variant twice: scored and written twice
            note(f"clip variant {name} given more than once; evaluated once")
            continue
        out.append((name, settings))
    sources = {s.source for _, s in out if s.source}
    if sources:
        note(f"settings from {', '.join(sorted(sources))}")
    return out


def adapter_kinds_of(ckpt: Any) -> dict[str, tuple[str, str]] | None:
    """``(kind, kind_rule)`` by name where the checkpoint is a PEFT adapter folder (its config
    says which tensors are LoRA factors, kinds ``adapter``), else None; ``CheckpointError``
    where its adapter config cannot be read. As ``clip`` takes them, so a clipped variant's
    report says what ``clip``'s does.

    >>> from auditclip.checkpoints import open_run
    >>> adapter_kinds_of(open_run("sample_checkpoints/high_lr")[0]) is None
    True
    """
    from .formats.peft import adapter_index_for

    index = adapter_index_for(ckpt.weights)
    return index.kinds() if index is not None else None


def clip_variant_states(
    state: dict[str, torch.Tensor], variants: Sequence[tuple[str, ClipSettings]],
    kinds: tuple[Any, Any] | None = None, adapter: dict[str, tuple[str, str]] | None = None,
) -> Iterator[tuple[str, dict[str, torch.Tensor], list[dict[str, Any]]]]:
    """Each clip variant of one checkpoint's state dict, one at a time: (its name, the clipped
    state dict, its report rows). ``kinds``: the model's (parameter names, buffer names);
    ``adapter``: :func:`adapter_kinds_of` (the adapter config decides the names it holds).

    >>> [(n, sd["fc.weight"].tolist(), r[0]["kind"]) for n, sd, r in
    ...  clip_variant_states({"fc.weight": torch.tensor([2.0])}, clip_variants(["max_abs=1"]))]
    [('max_abs=1', [1.0], 'parameter')]
    """
    for name, settings in variants:
        clipped, report = clip_state_dict(state, settings, kinds, adapter=adapter)
        yield name, clipped, report


def delta_variant_states(
    ckpt: Any, variants: Sequence[tuple[str, ClipSettings]],
) -> Iterator[tuple[str, dict[str, torch.Tensor], list[dict[str, Any]]]]:
    """``--adapter-mode delta``: each clip variant of a PEFT adapter checkpoint as ``clip`` writes it
    (each LoRA update ΔW clipped and refactored to rank r, :func:`auditclip.adapters.clip_adapter_checkpoint`,
    into a temporary folder and read back): (its name, the adapter's state dict, its report rows)."""
    import tempfile

    from .adapters import clip_adapter_checkpoint
    from .formats.readers import open_checkpoint_file

    weights = Path(ckpt.weights)
    for name, settings in variants:
        with tempfile.TemporaryDirectory() as tmp:
            report = clip_adapter_checkpoint(weights.parent, Path(tmp) / weights.name, settings, label=ckpt.label)
            with open_checkpoint_file(Path(tmp) / weights.name) as reader:
                state = {n: reader.get(n).clone() for n in reader.names()}
        yield name, state, report.to_dict("records")


def _delta_numel(ckpt: Any, state: dict[str, torch.Tensor]) -> int:
    """What ``--adapter-mode delta`` can clip: every LoRA update's elements, and the other floating tensors."""
    from .formats.peft import adapter_index_for

    index = adapter_index_for(ckpt.weights)
    modules = [m for m in index.modules if m.problem is None] if index is not None else []
    factors = {n for m in modules for n in (m.a_name, m.b_name)}
    return (sum(m.delta_shape[0] * m.delta_shape[1] for m in modules)
            + sum(t.numel() for n, t in state.items() if t.is_floating_point() and n not in factors))


def _kind_rule(report: list[dict[str, Any]]) -> str:
    """Which rule told parameters from buffers for a variant: ``model``, ``name`` or both."""
    rules = sorted({str(r["kind_rule"]).split(":", 1)[0] for r in report})
    return "+".join(rules)


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def _say_buffers(report: list[dict[str, Any]]) -> None:
    """Say which buffers the variants leave alone, and where the model and the name rule disagree
    (``clip`` has no model: it decides by names, so its file would differ there)."""
    left = [r["tensor"] for r in report if r["kind"] == "buffer" and str(r["spec"]).startswith("none (buffer")]
    if left:
        by = "+".join(sorted({str(r["kind_rule"]).split(":", 1)[0] for r in report if r["tensor"] in set(left)}))
        note(f"clip variants: {len(left)} buffer(s) left unclipped ({by} rule; --buffers clips them): {_names(left)}")
    differ = [r["tensor"] for r in report if str(r["kind_rule"]).startswith("model")
              and (r["kind"] == "buffer") != (tensor_kind(r["tensor"])[0] == "buffer")]
    if differ:
        note(f"the model's named_buffers() and the name rule disagree on {_names(differ)}; the clipped variants "
             "follow the model; clip follows the names unless given the same --model, so pass it --model "
             "to write the same file")


def evaluate_rows(
    run: RunLike, model: str, data: str | HeldOut, variants: list[tuple[str, ClipSettings]], options: EvalOptions,
) -> tuple[pd.DataFrame, pd.DataFrame, Primary, str]:
    """evaluation.csv rows, unreadable checkpoints, the primary metric and the task, for
    :func:`evaluate`, :func:`sweep` and :func:`auditclip.audit.audit` (``variants`` from
    :func:`clip_variants`); see :func:`evaluate` for an example."""
    run = open_run(run, sort=options.sort, key=options.key)
    evaluator = Evaluator(default_model(run, model), data, options)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    primary: Primary | None = None
    total, done = len(run) * (1 + len(variants)), 0

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        if options.progress is not None:
            options.progress(done, total)

    for ckpt in run:
        try:
            state, tied = _read_state(ckpt, options.key or run.key)
            adapter = adapter_kinds_of(ckpt)  # a PEFT adapter folder's config names its LoRA factors
        except CheckpointError as exc:
            errors.append(exc.row(ckpt.label))
            tick(1 + len(variants))
            continue
        n_float = sum(t.numel() for t in state.values() if t.is_floating_point())
        base = evaluator.run(_with_tied(state, tied), ckpt.label, str(ckpt.path))
        tick()
        if primary is None:  # known once the first scores are: fail after one pass, not after the run
            primary = resolve_primary(options.primary_metric, evaluator.task or "classification", list(base))
        loaded, model_tensors = evaluator.loader.last_loaded
        counts = {"n_loaded": loaded, "n_model_tensors": model_tensors, "primary_metric": primary.name}
        rows.append({"checkpoint": ckpt.label, "step": ckpt.step, "variant": "original", "n_clipped": 0,
                     "frac_clipped": 0.0, **base, **{f"delta_{k}": 0.0 for k in base}, "kind_rule": "", **counts})
        path = str(ckpt.path)
        if options.clip_merged and variants:  # clip base + adapter merged, scored by the plain base model
            state, path = _merged(evaluator, state, ckpt.label, path)
            tied, adapter = {}, None
            n_float = sum(t.numel() for t in state.values() if t.is_floating_point())
        # the model tells its buffers from its parameters (a custom register_buffer has no telltale name)
        kinds = evaluator.loader.kinds_at(list(state), path) if options.clip_merged else \
            evaluator.loader.kinds(list(state))
        if options.adapter_mode == "delta" and adapter is not None and not options.clip_merged:
            n_float = _delta_numel(ckpt, state)  # n_clipped counts elements of the updates ΔW
            states = delta_variant_states(ckpt, variants)
        else:
            states = clip_variant_states(state, variants, kinds, adapter)
        for name, clipped, report in states:
            _say_buffers(report)
            n_clipped = sum(r["n_clipped"] for r in report)
            metrics = evaluator.run(_with_tied(clipped, tied), ckpt.label, path)
            tick()
            rows.append({"checkpoint": ckpt.label, "step": ckpt.step, "variant": name, "n_clipped": n_clipped,
                         "frac_clipped": n_clipped / n_float if n_float else 0.0, **metrics,
                         **{f"delta_{k}": metrics[k] - base[k] for k in base}, "kind_rule": _kind_rule(report),
                         **counts})
    if not rows or primary is None:
        raise InputError("no checkpoint could be evaluated: " + "; ".join(e["message"] for e in errors))
    df = pd.DataFrame(rows)
    fixed = ("checkpoint", "step", "variant", "n_clipped", "frac_clipped", *EVAL_TAIL_COLUMNS)
    metric_cols = [c for c in df.columns if c not in fixed and not c.startswith("delta_")]
    df = df[["checkpoint", "step", "variant", "n_clipped", "frac_clipped", *metric_cols,
             *(f"delta_{c}" for c in metric_cols), *EVAL_TAIL_COLUMNS]]
    df["step"] = df["step"].astype("Int64")
    return df, pd.DataFrame(errors, columns=["checkpoint", "error", "message"]), primary, evaluator.task or "classification"


def evaluate(
    run: RunLike, model: str, data: str | HeldOut, clips: Sequence[str | ClipSpec | ClipSettings] = (),
    options: EvalOptions | None = None, **option_values: Any,
) -> pd.DataFrame:
    """Metrics of every checkpoint, and of each clipped variant (``evaluation.csv``).

    ``clips``: specs such as ``"max_abs=0.01"``; the variant column names them.

    >>> df = evaluate("sample_checkpoints/wgan_clip", "sample_checkpoints/digits_mlp.py:make_model",
    ...               "sample_checkpoints/digits_test.safetensors", clips=["max_abs=0.005"])  # doctest: +SKIP
    >>> df.columns[:6].tolist()  # doctest: +SKIP
    ['checkpoint', 'step', 'variant', 'n_clipped', 'frac_clipped', 'loss']
    """
    options = options or EvalOptions(**option_values)
    df, errors, _, _ = evaluate_rows(run, model, data, clip_variants(clips, options), options)
    df.attrs["errors"] = errors  # unreadable checkpoints, skipped (checkpoint, error, message)
    return df


def recommend(df: pd.DataFrame, primary: Primary, tolerance: float | None, tightest_first: list[str]) -> pd.Series:
    """Mark, per checkpoint, the tightest variant that changes weights and keeps the primary metric.

    A variant that clips nothing is never recommended: it stays within any tolerance
    because it is the original.

    ``tolerance``: percentage points of an accuracy (default 0.5), else percent of the
    original value (default 1.0); see :class:`auditclip.metrics.Primary`.
    ``tightest_first`` orders the variants.
    """
    check_tolerance(tolerance)
    metric = primary.name
    marks = pd.Series(False, index=df.index)
    for _, group in df.groupby("checkpoint", sort=False):
        base = group[group.variant == "original"][metric]
        if base.empty:
            continue
        base_value = float(base.iloc[0])
        for variant in tightest_first:
            row = group[group.variant == variant]
            if row.empty:
                continue
            if "n_clipped" in row and int(row["n_clipped"].iloc[0]) == 0:
                continue  # changes nothing: within tolerance by construction, not a result
            if primary.keeps(base_value, float(row[metric].iloc[0]), tolerance):
                marks[row.index[0]] = True
                break
    return marks


def cost_text(variant: str, frac_clipped: float, base: float, value: float, primary: Primary,
              tolerance: float | None) -> str:
    """What a clip costs, in words: the weights it changes and the primary metric's move.

    >>> cost_text("max_abs=1", 0.004, 2.0, 2.012, Primary("loss", False), None)
    'max_abs=1 clips 0.4% of weights, loss +0.6% (within 1%)'
    >>> cost_text("max_abs=1", 0.5, 0.9, 0.897, Primary("accuracy", True), None)
    'max_abs=1 clips 50% of weights, accuracy -0.3 points (within 0.5 points)'
    """
    tol = primary.tolerance(tolerance)
    if primary.points:
        move = f"{(value - base) * 100:+.3g} points (within {tol:g} points)"
    else:
        if base:
            rel = (value - base) / abs(base) * 100
        else:  # a move away from 0 is infinitely many percent of it
            rel = 0.0 if value == base else math.copysign(math.inf, value - base)
        move = f"{rel:+.3g}% (within {tol:g}%)"
    return f"{variant} clips {frac_clipped * 100:.3g}% of weights, {primary.name} {move}"


def recommendations(df: pd.DataFrame, primary: Primary, tolerance: float | None) -> dict[str, str]:
    """Per checkpoint, the recommended variant (``recommended`` column) and its cost
    (:func:`cost_text`), or why there is none.

    >>> df = pd.DataFrame({"checkpoint": ["c", "c"], "variant": ["original", "max_abs=1"], "frac_clipped": [0, 0.01],
    ...                    "loss": [2.0, 2.01], "recommended": [False, True]})
    >>> recommendations(df, Primary("loss", False), None)
    {'c': 'max_abs=1 clips 1% of weights, loss +0.5% (within 1%)'}
    """
    out: dict[str, str] = {}
    for checkpoint, group in df.groupby("checkpoint", sort=False):
        chosen = group[group.recommended]
        base = group[group.variant == "original"]
        if len(chosen) and len(base):
            row = chosen.iloc[0]
            out[str(checkpoint)] = cost_text(str(row.variant), float(row.frac_clipped),
                                             float(base[primary.name].iloc[0]), float(row[primary.name]), primary,
                                             tolerance)
        else:
            out[str(checkpoint)] = "none (no tested setting both changes weights and stays within tolerance)"
    return out


def write_sweep_summary(result: SweepResult, path: str | Path) -> Path:
    """Write ``summary.md`` of a sweep (atomically): the primary metric and tolerance that
    decided, and per checkpoint the recommendation with its cost.

    >>> import tempfile
    >>> r = SweepResult(pd.DataFrame(), "lm", "loss", pd.DataFrame(), "loss (lower is better), tolerance 1 %",
    ...                 {"c": "max_abs=1 clips 1% of weights, loss +0.5% (within 1%)"})
    >>> print(write_sweep_summary(r, Path(tempfile.mkdtemp()) / "summary.md").read_text().splitlines()[-1])
    - `c`: max_abs=1 clips 1% of weights, loss +0.5% (within 1%)
    """
    lines = ["# auditclip sweep", "",
             f"- primary metric (`--primary-metric`): `{result.metric}`",
             f"- decided by: {result.decided_by} (`--tolerance`)", "",
             "## Recommendation", ""]
    lines += [f"- `{c}`: {text}" for c, text in result.recommendations.items()]
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_tolerance(tolerance: float | None) -> None:
    """``--tolerance`` must be a finite number >= 0 (None: the task's default)."""
    if tolerance is None:
        return
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise InputError(f"--tolerance {tolerance!r}: expected a number")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise InputError(f"--tolerance {tolerance!r}: must be a finite number >= 0 "
                         "(percentage points of accuracy, or percent of loss)")


@dataclass
class SweepResult:
    """``sweep`` rows (``sweep.csv``), the task, the primary metric and unreadable checkpoints."""

    table: pd.DataFrame
    task: str
    metric: str
    errors: pd.DataFrame
    #: the metric the tolerance applied to, its direction and the tolerance, in words
    decided_by: str = ""
    #: per checkpoint: the recommended setting and its cost (:func:`cost_text`), or "none (...)"
    recommendations: dict[str, str] = field(default_factory=dict)


def sweep(
    run: RunLike, model: str, data: str | HeldOut, family: str, values: Sequence[float], *,
    tolerance: float | None = None, options: EvalOptions | None = None, **option_values: Any,
) -> SweepResult:
    """Evaluate one family of clip settings and recommend the tightest that keeps the metric.

    ``family``: ``max_abs``, ``percentile`` or ``sigma``; smaller values are tighter
    in each. Rows: the original and each setting, per checkpoint, with ``recommended``.

    >>> r = sweep("sample_checkpoints/wgan_clip/epoch_12.safetensors", "sample_checkpoints/digits_mlp.py:make_model",
    ...           "sample_checkpoints/digits_test.safetensors", "max_abs", [0.002, 0.005, 0.01])  # doctest: +SKIP
    >>> r.table[r.table.recommended].variant.tolist()  # doctest: +SKIP
    ['max_abs=0.005']
    """
    if family not in SWEEP_FAMILIES:
        raise InputError(f"unknown sweep family {family!r}; use one of {', '.join(SWEEP_FAMILIES)}")
    if not values:
        raise InputError(f"--{family.replace('_', '-')}: give at least one value")
    check_tolerance(tolerance)
    specs = [ClipSpec.make(family, v) for v in sorted(set(values))]
    options = options or EvalOptions(**option_values)
    variants = clip_variants(specs, options)
    df, errors, primary, task = evaluate_rows(run, model, data, variants, options)
    df.insert(3, "setting", [math.nan if v == "original" else float(v.split("=")[1]) for v in df.variant])
    df["recommended"] = recommend(df, primary, tolerance, [name for name, _ in variants])
    return SweepResult(df, task, primary.name, errors, primary.describe(tolerance),
                       recommendations(df, primary, tolerance))


def parse_values(text: str, what: str) -> list[float]:
    """``"0.005,0.01,0.02"`` -> floats; a clear error otherwise.

    >>> parse_values("0.005, 0.01", "--max-abs")
    [0.005, 0.01]
    """
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} {text!r}: expected comma-separated numbers, e.g. 0.005,0.01,0.02") from None
    if not values:
        raise InputError(f"{what}: give at least one value")
    return values


