"""The ``auditclip`` command line: parse options, call one library function, render.

Options are declared once, in :mod:`auditclip.options`; each command names the ones
it takes. Exit codes: 0 success; 1 the job ran but some checkpoints could not be read
(they are listed and skipped); 2 bad usage or input (one ``Error:`` line).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ._version import __version__
from .errors import AuditclipError
from .options import EVALUATION, RULES, SELECTION, eval_options, pop, use
from .terminal import echo, safe

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
TABLE_COLUMNS = ("tensor", "dtype", "shape", "numel", "mean", "std", "min", "max", "abs_max", "frac_zero",
                 "n_nan", "n_inf")


class CliError(click.ClickException):
    """A library error shown as one ``Error:`` line, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        echo(f"Error: {safe(self.format_message())}", err=True)  # one line, nothing raw from a file


class _Command(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AuditclipError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            raise CliError(str(exc)) from exc


class _Group(click.Group):
    command_class = _Command


#: options every command that reads checkpoints shares
_run_options = use("key", "include", "exclude", "spectral")


def _table(df: Any, columns: tuple[str, ...] | list[str]) -> str:
    view = df.loc[:, [c for c in columns if c in df]]
    # Names come from files: every control character escaped, newlines too, one row per line.
    view = view.apply(lambda col: col if col.dtype.kind in "biufcmM"
                      else col.map(lambda v: safe(v) if isinstance(v, str) else v))
    view.columns = [safe(c) for c in view.columns]
    return view.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")


class _Progress:
    """A click progress bar on stderr, created once the number of tensors is known."""

    def __init__(self, hidden: bool, label: str = "Analysing tensors") -> None:
        self.hidden, self.bar, self.done, self.label = hidden, None, 0, label

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, hidden=self.hidden)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="auditclip")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.option("--allow-global", "allow_global", multiple=True, metavar="module.Class",
              help="Admit this class when unpickling .pt/.ckpt/.bin files (repeatable; only classes you trust).")
@use("io_workers")
def cli(debug: bool, allow_global: tuple[str, ...], io_workers: int) -> None:
    """Audit the weights of a neural network across a training run.

    \b
    Examples:
      auditclip inspect sample_checkpoints/high_lr/epoch_12.safetensors
      auditclip drift sample_checkpoints/high_lr --out report/
      auditclip --allow-global collections.OrderedDict drift sample_checkpoints/wgan_clip --out report/
    """
    _show_notes()
    from .formats.remote import set_io_workers

    set_io_workers(io_workers)
    if allow_global:
        from .formats.torch_pickle import allow_globals

        try:
            allow_globals(list(allow_global))
        except AuditclipError as exc:
            raise CliError(str(exc)) from exc


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="table for people, csv/json (every stats.csv column) for programs.")
@_run_options
def inspect(checkpoint: str, fmt: str, key: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
            spectral: bool) -> None:
    """Statistics of every tensor of one checkpoint.

    CHECKPOINT is a .safetensors/.pt/.pth/.bin/.ckpt file, a sharded *.index.json,
    or a Hugging Face checkpoint folder.

    \b
    Examples:
      auditclip inspect sample_checkpoints/high_lr/epoch_12.safetensors
      auditclip inspect sample_checkpoints/high_lr/epoch_12.safetensors --format csv
      auditclip inspect sample_checkpoints/wgan_clip/epoch_12.safetensors --include '*.weight' --spectral
    """
    from .analysis import inspect_checkpoint

    df = inspect_checkpoint(checkpoint, key=key, include=include, exclude=exclude, spectral=spectral)
    if fmt == "csv":
        from .output import formula_safe_frame

        echo(formula_safe_frame(df).to_csv(index=False), nl=False)
    elif fmt == "json":
        from .output import json_records

        echo(json_records(df))  # every float as repr writes it: full precision
    else:
        columns = list(TABLE_COLUMNS) + (["spectral_norm", "stable_rank"] if spectral else [])
        echo(_table(df, columns))


_BOUND_HELP = {"max_abs": "The run's clip bound [-C, C]: stats.csv gains frac_at_bound (parameters within one ulp of "
                          "it).", "range": "The run's clip bound [LO, HI], as --max-abs."}


def _bounds(run: Any, max_abs: float | None, range_: str | None) -> Any:
    """The bound as flag reads it (parameters, as the run's format records them), or None."""
    if max_abs is None and range_ is None:
        return None
    from .config import flag_settings
    from .flags import run_bounds

    return run_bounds(run, flag_settings(options={"max_abs": max_abs, "range": range_}, search=False))


@cli.command()
@click.argument("run", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="Directory for stats.csv and drift.csv.")
@use("sort", "reference", "top", "quiet", "workers", "device", "scheduler", "max_abs", "range", "tensorboard",
     help=_BOUND_HELP)
@_run_options
def drift(run: tuple[str, ...], out: str, sort: str, reference: str | None, top: int, quiet: bool,
          workers: int | None, device: str, scheduler: str | None, key: str | None, include: tuple[str, ...],
          exclude: tuple[str, ...], spectral: bool, max_abs: float | None = None, range_: str | None = None,
          tensorboard: str | None = None) -> None:
    """Per-tensor statistics at every checkpoint and how they move.

    RUN is a directory of checkpoints (files or checkpoint-<step>/ folders), a glob,
    or several checkpoint paths. Writes OUT/stats.csv and OUT/drift.csv and prints
    the tensors that moved most from the reference by the last checkpoint.
    Unreadable checkpoints are listed in OUT/errors.csv and skipped (exit 1).

    \b
    Examples:
      auditclip drift sample_checkpoints/high_lr --out report/
      auditclip drift 'sample_checkpoints/high_lr/epoch_0*.safetensors' --out report/ --include '*.weight' --spectral
      auditclip drift sample_checkpoints/high_lr --out report/ --reference sample_checkpoints/high_lr/epoch_06.safetensors
      auditclip drift sample_checkpoints/wgan_clip --max-abs 0.01 --out report/
      auditclip drift sample_checkpoints/high_lr --out report/ --tensorboard tb/
    """
    from .analysis import analyze
    from .output import prepare_out_dir, write_csv

    opened = _open_run(run, sort, key)
    bounds = _bounds(opened, max_abs, range_)
    collector = None
    if tensorboard is not None and scheduler is not None:
        raise CliError("--tensorboard needs the tensors in this process (its histograms are counted as each is "
                       "read); with --scheduler they are read on the Dask workers: drop one of the two")
    if tensorboard is not None:
        from .histograms import HistogramCollector
        from .report.tensorboard import check_available

        check_available()
        collector = HistogramCollector()
    out_dir = prepare_out_dir(out)
    progress = _Progress(hidden=quiet or not sys.stderr.isatty())
    try:
        result = analyze(opened, include=include, exclude=exclude, spectral=spectral, reference=reference,
                         sort=sort, key=key, progress=progress, workers=workers, bounds=bounds,
                         visit=collector.visit if collector is not None else None, device=device,
                         scheduler=scheduler)
    finally:
        progress.close()
    written = [write_csv(result.stats, out_dir / "stats.csv"), write_csv(result.drift, out_dir / "drift.csv")]
    errors_csv = out_dir / "errors.csv"
    if len(result.errors):
        written.append(write_csv(result.errors, errors_csv))
    elif errors_csv.exists():
        errors_csv.unlink()  # a stale list from an earlier run would mislead

    labels = [c.label for c in result.run if c.label not in set(result.errors.checkpoint)]
    if not labels:  # every checkpoint failed while it was read: nothing was audited
        for e in result.errors.itertuples():
            echo(f"warning: skipped {e.checkpoint}: {e.message}", err=True)
        raise CliError(f"no checkpoint of the run could be read (each is listed in {errors_csv})")
    if collector is not None:
        from .report.tensorboard import write_tensorboard

        written.append(write_tensorboard(tensorboard, result, collector.result([c.label for c in result.run])).path)
    echo(f"Audited {len(labels)} checkpoint(s), {len(result.tensors)} tensor(s): {labels[0]} .. {labels[-1]}")
    d = result.drift
    last = d[(d.baseline == "reference") & (d.checkpoint == labels[-1]) & (d.tensor != "__all__")]
    if top and len(last):
        ranked = last.sort_values("rel_l2_change", ascending=False, na_position="last").head(top)
        echo(f"\nTop {len(ranked)} by rel_l2_change, {labels[-1]} vs {ranked.baseline_checkpoint.iloc[0]}:")
        echo(_table(ranked, ["tensor", "status", "rel_l2_change", "cosine", "max_abs_change", "std_ratio",
                                   "ks", "wasserstein"]))
    echo("\nWrote " + ", ".join(str(p) for p in written))
    for e in result.errors.itertuples():
        echo(f"warning: skipped {e.checkpoint}: {e.message}", err=True)
    if len(result.errors):
        sys.exit(1)


@cli.command("tensorboard")
@click.argument("run", nargs=-1, required=True)
@click.argument("log_dir", metavar="DIR", type=click.Path(path_type=str))
@use("sort", "reference", "quiet", "workers", "max_abs", "range", help=_BOUND_HELP)
@_run_options
def tensorboard_command(run: tuple[str, ...], log_dir: str, sort: str, reference: str | None, quiet: bool,
                        workers: int | None, key: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
                        spectral: bool, max_abs: float | None = None, range_: str | None = None) -> None:
    """TensorBoard histograms and scalars of a run, after the fact.

    Reads RUN once and writes event files into DIR: per tensor a histogram at each
    checkpoint's step (bins fixed per tensor across the run) and the scalars l2_norm,
    abs_max, rel_l2_change vs the previous checkpoint and the reference (and
    frac_at_bound with a bound), at the checkpoint file's time. Open it with
    `tensorboard --logdir DIR`, or `wandb sync DIR` for W&B. Needs
    pip install 'auditclip[tensorboard]'. Exit 1 when checkpoints could not be read.

    \b
    Examples:
      auditclip tensorboard sample_checkpoints/high_lr tb/
      auditclip tensorboard sample_checkpoints/wgan_clip tb/ --max-abs 0.01 --include '*.weight'
    """
    from .report.tensorboard import export_tensorboard

    progress = _Progress(hidden=quiet or not sys.stderr.isatty())
    try:
        opened = _open_run(run, sort, key)
        export = export_tensorboard(opened, log_dir, include=include, exclude=exclude,
                                    spectral=spectral, reference=reference, sort=sort, key=key, progress=progress,
                                    workers=workers, bounds=_bounds(opened, max_abs, range_))
    finally:
        progress.close()
    echo(f"Wrote {export.histograms} histogram(s) and {export.scalars} scalar(s) at {len(export.steps)} step(s) "
         f"to {export.path}")
    errors = export.analysis.errors
    for e in errors.itertuples():
        echo(f"warning: skipped {e.checkpoint}: {e.message}", err=True)
    if len(errors):
        sys.exit(1)


class _NoteHandler(logging.Handler):
    """Print the library's notes (:mod:`auditclip.notices`) on stderr as ``note: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        echo(f"note: {record.getMessage()}", err=True)


def _show_notes() -> None:
    from . import notices

    notices.reset()  # each command says its notes again, also in one process (tests, notebooks)
    if not any(isinstance(h, _NoteHandler) for h in notices.LOGGER.handlers):
        notices.LOGGER.addHandler(_NoteHandler())
        notices.LOGGER.setLevel(logging.INFO)
        notices.LOGGER.propagate = False


def _open_run(paths: tuple[str, ...], sort: str = "step", key: str | None = None) -> Any:
    """Find the run once, and say on stderr what was left out of it and why."""
    from .checkpoints import open_run

    run = open_run(list(paths), sort=sort, key=key)
    for note in run.notes:
        echo(f"note: {note}", err=True)
    return run


def _settings_note(settings: Any) -> None:
    """Name the config file in effect (stderr, and summary.md), so a gate's settings are never a surprise."""
    from .notices import note

    if getattr(settings, "source", ""):
        note(f"settings from {settings.source}")


def _write_errors(result_errors: Any, out_dir: Any, written: list[Any]) -> None:
    from .output import write_csv

    errors_csv = out_dir / "errors.csv"
    if len(result_errors):
        written.append(write_csv(result_errors, errors_csv))
        for e in result_errors.itertuples():
            echo(f"warning: skipped {e.checkpoint}: {e.message}", err=True)
    elif errors_csv.exists():
        errors_csv.unlink()  # a stale list from an earlier run would mislead


def _flag_settings(kw: dict[str, Any], overrides: tuple[str, ...]) -> Any:
    from .config import flag_settings

    options = pop(kw, *RULES)
    options.update({k: kw.get(k) for k in ("include", "exclude", "buffers")})
    return flag_settings(kw.get("config"), options, overrides)


@cli.command()
@click.argument("run", nargs=-1, required=True)
@use("out", *RULES, "sort", "reference", "key", "include", "exclude", "quiet", "scheduler", "buffers", "override",
     "config", "device", help={"out": "Directory for flags.csv.",
           "override": "Per-pattern rule setting, e.g. '*.bias:max_abs=1' or 'norm*:off=range+outlier' (repeatable; "
                       "names may contain ':')."})
def flag(run: tuple[str, ...], out: str, **kw: Any) -> None:
    """Flag out-of-range parameters across a run; exit 1 on findings (for CI).

    \b
    Rules: range (error), nonfinite (error, always on), outlier (warning),
    jump (warning), norm_growth (warning), spike (info: possible super weight),
    dead and frozen (info). Writes OUT/flags.csv and prints a summary.

    \b
    Exit codes:
      0  nothing at or above --fail-on
      1  findings at or above --fail-on, or unreadable checkpoints (OUT/errors.csv)
      2  usage or input error

    \b
    Examples:
      auditclip flag sample_checkpoints/wgan_clip --max-abs 0.01 --out flags/
      auditclip flag sample_checkpoints/high_lr --range -1:1 --override '*.bias:off=range' --out flags/  # exit 1
      auditclip flag sample_checkpoints/high_lr --fail-on warning --include '*.weight' --out flags/  # exit 1
    """
    from .flags import flag as run_flag, summary_table
    from .output import prepare_out_dir, write_csv

    settings = _flag_settings(kw, kw["overrides"])
    _settings_note(settings)
    out_dir = prepare_out_dir(out)
    progress = _Progress(hidden=kw["quiet"] or not sys.stderr.isatty())
    try:
        result = run_flag(_open_run(run, kw["sort"], kw["key"]), settings, reference=kw["reference"], sort=kw["sort"],
                          key=kw["key"], progress=progress, device=kw["device"],
                          scheduler=kw["scheduler"])
    finally:
        progress.close()
    written = [write_csv(result.flags, out_dir / "flags.csv")]
    _write_errors(result.errors, out_dir, written)
    n_ckpt = len(result.analysis.run) - len(result.errors)
    counts = result.flags.severity.value_counts()
    echo(f"Checked {n_ckpt} checkpoint(s), {len(result.analysis.tensors)} tensor(s): "
         + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("error", "warning", "info")))
    if len(result.flags):
        echo("")
        echo(_table(summary_table(result.flags), ["rule", "severity", "tensor", "checkpoints", "count",
                                                  "worst_value", "first_checkpoint"]))
    echo("\nWrote " + ", ".join(str(p) for p in written))
    if result.failed or len(result.errors):
        sys.exit(1)


@cli.command()
@click.argument("src", nargs=-1, required=True)
@use("out", "range", "max_abs", "percentile", "sigma", "protect", "protect_top", "to", "buffers", "force", "dry_run",
     "drop_trainer_state", "adapter_mode", "sort", "key", "include", "exclude", "override", "config", "model",
     help={"out": "Directory for the clipped checkpoints.", "range": "Clip every selected tensor to [LO, HI].",
           "model": "module:factory, file.py:factory or hf (config.json) whose named_buffers() decide what a buffer is "
                    "(default: the names).",
           "max_abs": "Clip to [-C, C].", "include": "Only clip tensors whose name matches (repeatable).",
           "exclude": "Never clip tensors whose name matches (repeatable).",
           "buffers": "Clip buffers too (BatchNorm running statistics...); parameters only by default.",
           "override": "Per-pattern spec, e.g. '*.bias:max_abs=1' or 'norm*:skip=true' (repeatable; names may "
                       "contain ':')."})
def clip(src: tuple[str, ...], out: str, to: str | None, force: bool, dry_run: bool, sort: str, key: str | None,
         config: str | None, overrides: tuple[str, ...], **kw: Any) -> None:
    """Clip checkpoints after the fact into new files, in the input's format.

    SRC is one checkpoint or a run; the output mirrors the run's layout under OUT.
    Only selected floating tensors change; everything else is copied bit for bit,
    the optimizer, scheduler and RNG states of checkpoint folders included, so the
    clipped run resumes (Trainer, accelerate); --drop-trainer-state leaves them out.
    Writes OUT/clip_report.csv (not with --dry-run).

    \b
    Examples:
      auditclip clip sample_checkpoints/high_lr --max-abs 1.5 --out clipped/
      auditclip clip sample_checkpoints/high_lr/epoch_12.safetensors --percentile 99.99 --protect-top 1 --out clipped/
      auditclip clip 'sample_checkpoints/wgan_clip/*.safetensors' --sigma 6 --override '*.bias:skip=true' --out clipped/
    """
    from contextlib import ExitStack

    from .clip_files import clip_run
    from .config import clip_settings
    from .formats.remote import is_url, remote_output
    from .output import prepare_out_dir, write_csv

    options = pop(kw, "range", "max_abs", "percentile", "sigma", "protect", "protect_top", "include", "exclude",
                  "buffers")
    settings = clip_settings(config, options, overrides)
    _settings_note(settings)
    with ExitStack() as stack:  # --out s3://...: written locally, each file published once complete
        local_out = stack.enter_context(remote_output(out, force=force)) if is_url(out) else out
        result = clip_run(list(src) if len(src) > 1 else src[0], local_out, settings, to=to, key=key, sort=sort,
                          force=force, dry_run=dry_run, model=kw.pop("model"),
                          drop_trainer_state=kw.pop("drop_trainer_state"), adapter_mode=kw.pop("adapter_mode"))
        report = result.report
        written = list(result.written)
        if dry_run:
            for e in result.errors.itertuples():
                echo(f"warning: skipped {e.checkpoint}: {e.message}", err=True)
        else:
            out_dir = prepare_out_dir(local_out)
            written.append(write_csv(report, out_dir / "clip_report.csv"))
            _write_errors(result.errors, out_dir, written)
    n_ckpt = report.checkpoint.nunique() if len(report) else 0
    verb = "Would clip" if dry_run else "Clipped"
    echo(f"{verb} {int(report.n_clipped.sum()) if len(report) else 0} value(s) in "
         f"{int((report.n_clipped > 0).sum()) if len(report) else 0} tensor version(s) "
         f"across {n_ckpt} checkpoint(s); {int(report.n_protected.sum()) if len(report) else 0} protected")
    changed = report[report.n_clipped > 0] if len(report) else report
    if len(changed):
        echo(_table(changed.sort_values("frac_clipped", ascending=False).head(10),
                    ["checkpoint", "tensor", "spec", "n_clipped", "frac_clipped", "n_protected",
                     "abs_max_before", "abs_max_after"]))
    for note in result.notes:
        echo(f"note: {note}", err=True)
    if not dry_run:
        echo(f"Wrote {len(written)} file(s) under {out}")
    if len(result.errors):
        sys.exit(1)


def _need(value: str | None, option: str) -> str:
    if not value:
        raise CliError(f"Missing option '{option}'")
    return value


_CLIP_OVERRIDE = {"override": "Per-pattern spec for the clipped variants, as for clip: '*.bias:max_abs=1', "
                              "'norm*:skip=true' (repeatable; names may contain ':')."}


@cli.command()
@click.argument("run", nargs=-1, required=True)
@use("out", "clip", "sort", "key", "quiet", *SELECTION, *EVALUATION,
     help={"out": "Directory for evaluation.csv.", **_CLIP_OVERRIDE})
def evaluate(run: tuple[str, ...], out: str, clips: tuple[str, ...], **kw: Any) -> None:
    """Evaluate every checkpoint (and clipped variants) on held-out data.

    Clipping happens in memory, selecting tensors exactly as clip would with the same
    options and config file; nothing but OUT/evaluation.csv is written.

    \b
    Examples:
      auditclip evaluate sample_checkpoints/high_lr --model sample_checkpoints/digits_mlp.py:make_model \\
          --data sample_checkpoints/digits_test.safetensors --clip max_abs=1.5 --out eval/
      auditclip evaluate sample_checkpoints/wgan_clip/epoch_12.safetensors \\
          --model sample_checkpoints/digits_mlp.py:make_model --data sample_checkpoints/digits_test.safetensors \\
          --clip max_abs=0.005 --exclude '*.bias' --primary-metric loss --out eval/
    """
    from .evaluation import evaluate as run_evaluate
    from .output import prepare_out_dir, write_csv

    model, data = kw.pop("model"), _need(kw.pop("data"), "--data")  # no --model: hf where config.json is
    quiet = kw.pop("quiet")
    options = eval_options(kw)
    options.progress = progress = _Progress(quiet or not sys.stderr.isatty(), "Evaluating checkpoints x variants")
    try:
        df = run_evaluate(_open_run(run, options.sort, options.key), model, data, clips, options)
    finally:
        progress.close()
    out_dir = prepare_out_dir(out)
    written = [write_csv(df, out_dir / "evaluation.csv")]
    errors = df.attrs.get("errors")
    if errors is not None:
        _write_errors(errors, out_dir, written)
    metric = str(df.primary_metric.iloc[0])
    metric_cols = [c for c in df.columns[5:] if not c.startswith("delta_") and c not in _TAIL]
    echo(_table(df, ["checkpoint", "variant", "n_clipped", *metric_cols, f"delta_{metric}"]))
    echo(f"\nPrimary metric: {metric}")
    echo("Wrote " + ", ".join(str(p) for p in written))
    if errors is not None and len(errors):
        sys.exit(1)


_TAIL = ("kind_rule", "n_loaded", "n_model_tensors", "primary_metric", "recommended")


@cli.command()
@click.argument("run", nargs=-1, required=True)
@use("out", "sweep_max_abs", "sweep_percentile", "sweep_sigma", "tolerance", "sort", "key", "quiet", *SELECTION,
     *EVALUATION, help={"out": "Directory for sweep.csv (and sweep.png).", **_CLIP_OVERRIDE})
def sweep(run: tuple[str, ...], out: str, max_abs: str | None, percentile: str | None, sigma: str | None,
          tolerance: float | None, **kw: Any) -> None:
    """Try a family of clip settings; recommend the tightest that keeps the metric.

    \b
    Examples:
      auditclip sweep sample_checkpoints/wgan_clip/epoch_12.safetensors \\
          --model sample_checkpoints/digits_mlp.py:make_model \\
          --data sample_checkpoints/digits_test.safetensors --max-abs 0.002,0.005,0.01 --out sweep/
      auditclip sweep sample_checkpoints/high_lr/epoch_12.safetensors --model sample_checkpoints/digits_mlp.py:make_model \\
          --data sample_checkpoints/digits_test.safetensors --percentile 99,99.9,99.99 --primary-metric loss --out sweep/
    """
    from .evaluation import parse_values, sweep as run_sweep, write_sweep_summary
    from .output import prepare_out_dir, write_csv
    from .plots import PLOT_HINT, have_matplotlib, sweep_plot

    families = {k: v for k, v in (("max_abs", max_abs), ("percentile", percentile), ("sigma", sigma)) if v}
    if len(families) != 1:
        raise CliError("give exactly one of --max-abs, --percentile, --sigma with a list of settings")
    (family, text), = families.items()
    values = parse_values(text, f"--{family.replace('_', '-')}")
    model, data = kw.pop("model"), _need(kw.pop("data"), "--data")  # no --model: hf where config.json is
    quiet = kw.pop("quiet")
    options = eval_options(kw)
    options.progress = progress = _Progress(quiet or not sys.stderr.isatty(), "Evaluating checkpoints x settings")
    try:
        result = run_sweep(_open_run(run, options.sort, options.key), model, data, family, values,
                           tolerance=tolerance, options=options)
    finally:
        progress.close()
    out_dir = prepare_out_dir(out)
    written = [write_csv(result.table, out_dir / "sweep.csv")]
    if have_matplotlib():
        written.append(sweep_plot(result.table, result.metric, out_dir / "sweep.png", tolerance,
                                  "(lower is better)" not in result.decided_by))
    t = result.table
    echo(_table(t, ["checkpoint", "variant", "n_clipped", "frac_clipped", result.metric,
                    f"delta_{result.metric}", "recommended"]))
    echo(f"Decided by {result.decided_by}")
    for checkpoint, text in result.recommendations.items():
        echo(f"recommended for {checkpoint}: {text}")
    written.append(write_sweep_summary(result, out_dir / "summary.md"))
    _write_errors(result.errors, out_dir, written)
    echo("\nWrote " + ", ".join(str(p) for p in written))
    if not have_matplotlib():
        echo(f"note: {PLOT_HINT}")
    if len(result.errors):
        sys.exit(1)


@cli.command()
@click.argument("run", nargs=-1, required=True)
@use("out", "clip", "tolerance", *RULES, "sort", "reference", "key", "quiet", "tensorboard", "scheduler", *SELECTION, *EVALUATION,
     help={"out": "Directory for every report.",
           "clip": "Evaluate a clipped variant too (needs --model/--data): max_abs=C, percentile=P... (repeatable).",
           "override": "Per-pattern setting: a bound ('*.bias:max_abs=1') for the rules and the clipped variants, "
                       "'norm*:off=range+outlier' for the rules, 'norm*:skip=true' for the variants (repeatable)."})
def audit(run: tuple[str, ...], out: str, clips: tuple[str, ...], tolerance: float | None, **kw: Any) -> None:
    """The whole job: stats, drift, flags and (with a model) evaluation, in one report.

    Writes OUT/stats.csv, drift.csv, flags.csv, evaluation.csv (with --model and
    --data), summary.md, report.html (one self-contained page) and, with matplotlib,
    drift_heatmap.png, histograms.png, sweep.png; with --tensorboard DIR, event files.
    Exit codes as for flag: 1 when a finding reaches --fail-on.
    The clipped variants select tensors as clip does with the same options.

    \b
    Examples:
      auditclip audit sample_checkpoints/high_lr --model sample_checkpoints/digits_mlp.py:make_model \\
          --data sample_checkpoints/digits_test.safetensors --clip max_abs=1.5 --clip max_abs=3 --out report/
      auditclip audit sample_checkpoints/wgan_clip --max-abs 0.01 --out report/ --tensorboard tb/
    """
    from .audit import audit as run_audit
    from .config import split_overrides
    from .plots import PLOT_HINT

    flag_overrides, kw["overrides"] = split_overrides(kw["overrides"])
    settings = _flag_settings(kw, flag_overrides)
    _settings_note(settings)
    model, data = kw.pop("model"), kw.pop("data")
    options = eval_options(kw)
    progress = _Progress(hidden=kw["quiet"] or not sys.stderr.isatty())
    try:
        result = run_audit(_open_run(run, kw["sort"], kw["key"]), out, model=model, data=data, clips=clips,
                           settings=settings, eval_options=options, tolerance=tolerance, reference=kw["reference"],
                           sort=kw["sort"], key=kw["key"], progress=progress, tensorboard=kw["tensorboard"],
                           scheduler=kw["scheduler"])
    finally:
        progress.close()
    counts = result.flags.flags.severity.value_counts()
    echo(f"Audited {len(result.flags.analysis.run) - len(result.errors)} checkpoint(s): "
         + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("error", "warning", "info"))
         + f" ({'FAILED' if result.flags.failed else 'passed'} at --fail-on {result.flags.fail_on})")
    if result.evaluation is not None:
        ev = result.evaluation
        last = ev[ev.checkpoint == ev.checkpoint.iloc[-1]]
        metric_cols = [c for c in ev.columns[5:] if not c.startswith("delta_") and c not in _TAIL]
        echo(_table(last, ["checkpoint", "variant", "n_clipped", *metric_cols, "recommended"]))
        if clips:
            echo(f"Decided by {result.decided_by}")
    if result.recommendation:
        echo(f"recommended clip: {result.recommendation}")
    for e in result.errors.itertuples():
        echo(f"warning: skipped {e.checkpoint}: {e.message}", err=True)
    if PLOT_HINT in result.notes:  # every other note was said on stderr as it came
        echo(f"note: {PLOT_HINT}")
    echo(f"Wrote {', '.join(p.name for p in result.files)} to {result.out}")
    if result.tensorboard is not None:
        echo(f"Wrote TensorBoard events to {result.tensorboard}")
    if result.failed:
        sys.exit(1)


def main() -> None:
    """The console script. Ctrl-C exits 130, SIGTERM 143, SIGHUP 129: one line, no traceback,
    no partial file (every file is written under a temporary name, removed on the way out)."""
    from .interrupts import exit_code, handle_signals, message

    with handle_signals():
        try:
            try:
                code = cli.main(standalone_mode=False)
            except click.exceptions.Abort as exc:  # click turns Ctrl-C into Abort from the KeyboardInterrupt
                if isinstance(exc.__cause__, KeyboardInterrupt):
                    raise exc.__cause__ from None
                echo("Aborted!", err=True)
                sys.exit(1)
            except click.ClickException as exc:
                exc.show()
                sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            echo(message(exc), err=True)
            sys.exit(exit_code(exc))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
