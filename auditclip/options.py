"""Every command-line option, declared once; each command names the ones it takes.

A command lists option names (``@use("sort", "key", "include")``) instead of
re-declaring ``--key`` or ``--include`` with its own wording, so an option means
the same thing, with the same type, default and help, wherever it appears. The
helpers at the end map parsed values onto the library's settings objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True)
class Option:
    """One option: its flags (and parameter name) and click's settings for it."""

    decls: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def apply(self, f: Callable[..., Any], help: str | None = None) -> Callable[..., Any]:
        settings = self.settings if help is None else {**self.settings, "help": help}
        return click.option(*self.decls, **settings)(f)


def _o(*decls: str, **settings: Any) -> Option:
    return Option(decls, settings)


_BOUND_OVERRIDE = "'*.bias:max_abs=1'"
OPTIONS: dict[str, Option] = {
    # where the weights are, and which tensors
    "out": _o("--out", required=True, type=click.Path(path_type=str), help="Directory for the reports."),
    "sort": _o("--sort", type=click.Choice(["step", "name", "mtime"]), default="step", show_default=True,
               help="Checkpoint order: step stored in files or parsed from names, natural name order, or file time."),
    "reference": _o("--reference", type=click.Path(path_type=str),
                    help="Checkpoint the 'reference' baseline compares with (default: the first of the run)."),
    "key": _o("--key", metavar="ENTRY",
              help="Container entry holding the state dict in .pt/.ckpt files (e.g. ema, ema_state_dict, "
                   "current_model_state); in a DCP folder a top-level entry; in a DeepSpeed run module or "
                   "master (the fp32 copy)."),
    "include": _o("--include", multiple=True, metavar="GLOB", help="Only tensors whose name matches (repeatable)."),
    "exclude": _o("--exclude", multiple=True, metavar="GLOB", help="Skip tensors whose name matches (repeatable)."),
    "buffers": _o("--buffers", is_flag=True, default=None,
                  help="Act on buffers too (BatchNorm running statistics...): clip them and apply --range/--max-abs "
                       "to them. Parameters only by default; with --model the model's named_buffers() say which "
                       "tensors are buffers, else their names."),
    "override": _o("--override", "overrides", multiple=True, metavar="GLOB:KEY=VALUE",
                   help=f"Per-pattern setting, e.g. {_BOUND_OVERRIDE}, 'norm*:off=range+outlier' (flag rules) or "
                        "'norm*:skip=true' (clipping) (repeatable; names may contain ':')."),
    "config": _o("--config", "config", type=click.Path(path_type=str),
                 help="TOML file with the settings (default: [tool.auditclip] of the nearest pyproject.toml)."),
    "quiet": _o("-q", "--quiet", is_flag=True, help="No progress bar."),
    "spectral": _o("--spectral", is_flag=True,
                   help="Also compute spectral_norm and stable_rank for tensors of 2+ dimensions."),
    "workers": _o("--workers", type=click.IntRange(1), metavar="N",
                  help="Threads walking tensors in parallel (default: the number of cores); results do not change."),
    "tensorboard": _o("--tensorboard", "tensorboard", type=click.Path(path_type=str), metavar="DIR",
                      help="Also write TensorBoard event files into DIR: a histogram per tensor at each checkpoint's "
                           "step and scalars (needs pip install 'auditclip[tensorboard]'; wandb sync DIR for W&B)."),
    "io_workers": _o("--io-workers", type=click.IntRange(1), default=8, show_default=True, metavar="N",
                     help="Ranged reads in flight at once for runs named by URL (s3://, gs://, az://, hf://, "
                          "https://)."),
    "scheduler": _o("--scheduler", metavar="ADDRESS",
                    help="Walk the tensors as tasks of a Dask cluster: tcp://HOST:PORT (a running dask scheduler) or "
                         "local[:N] (N worker processes here); results do not change. Needs "
                         "pip install 'auditclip[dask]'."),
    "top": _o("--top", default=10, show_default=True, type=click.IntRange(0), help="Tensors shown in the summary table."),
    # flag rules
    "range": _o("--range", "range_", metavar="LO:HI", help="Values must lie in [LO, HI] (rule range, error)."),
    "max_abs": _o("--max-abs", type=float, metavar="C", help="Values must lie in [-C, C] (rule range, error)."),
    "zscore": _o("--zscore", type=float, metavar="K", help="Robust z-score limit of rule outlier (default 10)."),
    "jump": _o("--jump", type=float, metavar="K", help="Step change limit, x the median step change (default 5)."),
    "norm_growth": _o("--norm-growth", type=float, metavar="F",
                      help="L2 norm growth limit over the reference (off by default)."),
    "spike": _o("--spike", type=float, metavar="K",
                help="Super-weight limit, x the 99.99th percentile of |w| (default 50)."),
    "fail_on": _o("--fail-on", type=click.Choice(["error", "warning", "info", "never"]),
                  help="Lowest severity that makes the exit code 1 (default error)."),
    # clipping files
    "percentile": _o("--percentile", type=float, metavar="P", help="Per tensor, clip to its [100-P, P] percentiles."),
    "sigma": _o("--sigma", type=float, metavar="K", help="Per tensor, clip to mean +- K std."),
    "protect": _o("--protect", multiple=True, metavar="'NAME[i, j]'", help="Keep this element unclipped (repeatable)."),
    "protect_top": _o("--protect-top", type=click.IntRange(0), metavar="K",
                      help="Keep the K largest |w| of each tensor unclipped."),
    "to": _o("--to", type=click.Choice(["safetensors"]), help="Convert .pt/.ckpt/.bin to safetensors."),
    "force": _o("--force", is_flag=True, help="Overwrite existing outputs."),
    "dry_run": _o("--dry-run", is_flag=True, help="Report what would change; write nothing."),
    "drop_trainer_state": _o("--drop-trainer-state", is_flag=True,
                             help="Leave out the optimizer, scheduler, RNG and sampler states of checkpoint folders "
                                  "(copied as is by default, so the clipped run resumes; they describe the unclipped "
                                  "weights)."),
    "adapter_mode": _o("--adapter-mode", type=click.Choice(["factors", "delta"]), default="factors",
                       show_default=True,
                       help="PEFT LoRA adapter folders: clip the stored A/B factors as any weight (factors), or each "
                            "module's update scaling*B@A, refactored to rank r by truncated SVD (delta)."),
    # evaluation
    "clip": _o("--clip", "clips", multiple=True, metavar="SPEC",
               help="Also evaluate a clipped variant: max_abs=C, range=LO:HI, percentile=P, sigma=K (repeatable); "
                    "the tensor selection is clip's (--include/--exclude/--override/--config/--buffers)."),
    "sweep_max_abs": _o("--max-abs", "max_abs", metavar="LIST", help="Settings to try, e.g. 0.005,0.01,0.02,0.05."),
    "sweep_percentile": _o("--percentile", metavar="LIST", help="Settings to try, e.g. 99,99.9,99.99."),
    "sweep_sigma": _o("--sigma", metavar="LIST", help="Settings to try, e.g. 3,4,6."),
    "tolerance": _o("--tolerance", type=float, metavar="T",
                    help="Allowed loss of the primary metric: percentage points of an accuracy (default 0.5), "
                         "else percent of the original value (default 1)."),
    "primary_metric": _o("--primary-metric", metavar="NAME",
                         help="Metric the tolerance applies to (default: accuracy for classification, loss "
                              "otherwise, language models included); a custom metric as NAME:higher or NAME:lower."),
    "model": _o("--model", "model", metavar="REF",
                help="module:factory, path/to/file.py:factory (returns a torch.nn.Module), a .pt2 export, or hf: "
                     "the Hugging Face model of the checkpoints' config.json (the default when they have one; "
                     "a PEFT adapter folder is evaluated as base + adapter)."),
    "data": _o("--data", "data", metavar="REF",
               help="Held-out data: .safetensors/.pt/.npz with x/y (or input_ids/labels/attention_mask for a "
                    "language model), a CSV/Parquet table, a JSONL file of texts (with --tokenizer), or "
                    "module:factory."),
    "tokenizer": _o("--tokenizer", metavar="PATH",
                    help="Folder of a saved tokenizer (save_pretrained) that tokenises a JSONL --data; local only."),
    "shift_labels": _o("--shift-labels", type=click.Choice(["auto", "yes", "no"]), default="auto",
                       show_default=True,
                       help="Language models: score the logits at t against the label at t+1; auto: when the model "
                            "is a causal LM and the labels are its input ids."),
    "hf_task": _o("--hf-task", type=click.Choice(["causal-lm", "masked-lm", "seq2seq-lm", "sequence-classification",
                                                  "token-classification", "question-answering",
                                                  "image-classification", "base"]),
                  help="--model hf: the AutoModelFor<Task> to build (default: from config.json's architectures)."),
    "base": _o("--base", metavar="PATH",
               help="--model hf on PEFT adapter folders: the base model's folder, when adapter_config.json's "
                    "base_model_name_or_path is not a local folder (nothing is downloaded)."),
    "clip_merged": _o("--clip-merged", is_flag=True,
                      help="--model hf on PEFT adapter folders: clipped variants clip the merged weights (base + "
                           "scaling*B@A), scored by the base model, instead of the adapter's own tensors."),
    "trust_remote_code": _o("--trust-remote-code", is_flag=True,
                            help="--model hf: allow a checkpoint whose config names its own Python code (auto_map); "
                                 "this RUNS that code. Off by default."),
    "inputs_key": _o("--inputs-key", default="x", show_default=True, help="Key of the inputs in a data file."),
    "targets_key": _o("--targets-key", default="y", show_default=True, help="Key of the targets in a data file."),
    "target": _o("--target", metavar="COLUMN", help="Target column of a CSV/Parquet table."),
    "task": _o("--task", type=click.Choice(["auto", "classification", "regression", "lm"]), default="auto",
               show_default=True, help="auto: integer targets are classes, float targets regression, [batch, tokens, "
                                       "vocab] outputs against [batch, tokens] labels a language model (lm)."),
    "metrics": _o("--metric", "metrics", multiple=True, metavar="REF",
                  help="Extra metric module:fn, fn(outputs, targets) -> dict[str, float] (repeatable)."),
    "batch_size": _o("--batch-size", type=click.IntRange(1), default=256, show_default=True),
    "limit": _o("--limit", type=click.IntRange(1), metavar="N",
                help="Evaluate on the first N samples (sequences for a language model) only."),
    "device": _o("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
                 help="Where tensors are processed: the evaluation's forward passes (auto: cuda, else mps, else "
                      "cpu), and the statistics of drift/flag/audit (auto: cpu; cuda: on the GPU, each tensor "
                      "moved there once; same numbers within the documented bounds)."),
    "strict": _o("--strict/--no-strict", default=True, show_default=True,
                 help="Missing or unexpected state-dict keys are an error."),
    "strip_prefix": _o("--strip-prefix", metavar="P", help="Remove P from the checkpoint's tensor names before loading."),
    "add_prefix": _o("--add-prefix", metavar="P", help="Prepend P to the checkpoint's tensor names before loading."),
}

#: groups of options several commands take together
RULES = ("range", "max_abs", "zscore", "jump", "norm_growth", "spike", "fail_on")
SELECTION = ("include", "exclude", "override", "config", "buffers")
EVALUATION = ("model", "data", "inputs_key", "targets_key", "target", "task", "metrics", "primary_metric",
              "batch_size", "limit", "device", "strict", "strip_prefix", "add_prefix", "tokenizer", "shift_labels",
              "hf_task", "base", "trust_remote_code", "clip_merged", "adapter_mode")
_EVAL_FIELDS = tuple(n for n in EVALUATION if n not in ("model", "data"))


def use(*names: str, help: dict[str, str] | None = None) -> Decorator:
    """Add the named options to a command, in this order in ``--help``.

    ``help`` rewords an option for one command where the shared words would mislead.

    >>> @click.command()
    ... @use("key", "include")
    ... def f(key, include): ...
    >>> [p.name for p in f.params]
    ['key', 'include']
    """
    texts = help or {}
    unknown = set(names) - set(OPTIONS) | set(texts) - set(names)
    if unknown:
        raise KeyError(f"unknown option name(s): {sorted(unknown)}")

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):  # click lists the last decorator applied first
            f = OPTIONS[name].apply(f, texts.get(name))
        return f

    return decorate


def pop(kw: dict[str, Any], *names: str) -> dict[str, Any]:
    """Take the named parsed values out of a command's keyword arguments.

    >>> kw = {"range_": "-1:1", "zscore": None, "out": "o"}
    >>> pop(kw, "range", "zscore"), kw
    ({'range': '-1:1', 'zscore': None}, {'out': 'o'})
    """
    return {name: kw.pop(_param(name)) for name in names}


def _param(name: str) -> str:
    """The Python parameter name click gives an option."""
    decls = OPTIONS[name].decls
    named = [d for d in decls if not d.startswith("-")]
    return named[0] if named else decls[-1].lstrip("-").split("/")[0].replace("-", "_")


def eval_options(kw: dict[str, Any], *, search_config: bool = True) -> Any:
    """:class:`auditclip.evaluation.EvalOptions` from the evaluation and selection options in ``kw``
    (the evaluation ones taken out of it); ``--model``/``--data`` are left for the caller.

    >>> kw = {**dict.fromkeys(_EVAL_FIELDS), "exclude": ("fc.*",), "sort": "name"}
    >>> o = eval_options(kw)
    >>> o.exclude, o.sort, o.search_config, "task" in kw
    (('fc.*',), 'name', True, False)
    """
    from .evaluation import EvalOptions

    values = pop(kw, *_EVAL_FIELDS)
    selection = {k: kw.get(_param(k)) for k in ("include", "exclude", "config", "buffers")}
    return EvalOptions(**values, **selection, overrides=tuple(kw.get("overrides", ())), search_config=search_config,
                       key=kw.get("key"), sort=kw.get("sort", "step"))
