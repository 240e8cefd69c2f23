"""``summary.md``, and the tables it shares with ``report.html``: each section fits a screen.

The full tables stay in the CSVs (``evaluation.csv``, ``flags.csv``, ``stats.csv``);
the summary shows one row per checkpoint for the evaluation, one line per flagged
tensor (where it first went bad), and with a bound the fraction of each layer at it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import shown_path
from ..output import atomic_path

#: Most lines of a per-tensor list (first bad checkpoints, layers at the bound) before "... N more".
MAX_LINES = 25
#: Most checkpoints shown as columns of the at-the-bound table (first and last always among them).
MAX_COLUMNS = 8
SEVERITIES = ("error", "warning", "info")


def md_table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """A GitHub-flavoured markdown table (no extra dependency).

    >>> print(md_table(pd.DataFrame({"a": [1.0], "b": ["x"]})))
    | a | b |
    | --- | --- |
    | 1 | x |
    """
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(v) else floatfmt.format(v)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "| " + " | ".join("---" for _ in df.columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def top_tensors(drift: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` tensors that moved most from the reference by the last checkpoint (drift rows)."""
    ref = drift[(drift.baseline == "reference") & (drift.tensor != "__all__")]
    if ref.empty:
        return ref
    last = ref[ref.checkpoint == ref.checkpoint.iloc[-1]]
    return last.sort_values("rel_l2_change", ascending=False, na_position="last").head(n)


def severity_counts(flags: pd.DataFrame) -> dict[str, int]:
    """Findings per severity (``skipped`` rows are no findings).

    >>> severity_counts(pd.DataFrame({"severity": ["warning", "warning", "skipped"]}))
    {'error': 0, 'warning': 2, 'info': 0}
    """
    counts = flags.severity.value_counts() if len(flags) else pd.Series(dtype=int)
    return {s: int(counts.get(s, 0)) for s in SEVERITIES}


def first_bad(flags: pd.DataFrame) -> pd.DataFrame:
    """One row per flagged tensor: the first checkpoint (and step) where any rule fired, the
    rules that fired there, every rule that fired on it in the run, and its worst severity.

    >>> f = pd.DataFrame({"checkpoint": ["b", "a", "b"], "step": [2, 1, 2], "tensor": ["w", "w", "v"],
    ...                   "rule": ["jump", "outlier", "range"], "severity": ["warning", "warning", "error"]})
    >>> first_bad(f)[["tensor", "checkpoint", "rules_there", "rules"]].values.tolist()
    [['v', 'b', 'range (error)', 'range'], ['w', 'a', 'outlier (warning)', 'outlier, jump']]
    """
    columns = ["tensor", "checkpoint", "step", "rules_there", "rules", "severity"]
    found = flags[flags.severity.isin(SEVERITIES) & (flags.tensor != "__all__")] if len(flags) else flags
    if not len(found):
        return pd.DataFrame(columns=columns)
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    rows = []
    for tensor, group in found.groupby("tensor", sort=False):
        group = group.sort_values("step", kind="stable", na_position="last")  # flags.csv is in run order already
        first = group.iloc[0]
        there = group[group.checkpoint == first.checkpoint]
        rows.append({"tensor": tensor, "checkpoint": first.checkpoint, "step": first.step,
                     "rules_there": ", ".join(f"{r} ({s})" for r, s in dict.fromkeys(zip(there.rule, there.severity))),
                     "rules": ", ".join(dict.fromkeys(group.rule)),
                     "severity": min(group.severity, key=rank.__getitem__)})
    out = pd.DataFrame(rows, columns=columns)
    out["_r"] = out.severity.map(rank)
    return out.sort_values(["_r", "tensor"], kind="stable").drop(columns="_r").reset_index(drop=True)


def per_checkpoint(evaluation: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint: the original's primary metric, the recommended clip (the tightest
    within tolerance that changes weights) with its cost, or ``none`` and why.

    >>> ev = pd.DataFrame({"checkpoint": ["a"] * 3, "step": [1] * 3, "variant": ["original", "max_abs=1", "max_abs=9"],
    ...                    "n_clipped": [0, 5, 0], "frac_clipped": [0, .1, 0], "accuracy": [.9, .89, .9],
    ...                    "delta_accuracy": [0, -.01, 0], "primary_metric": "accuracy",
    ...                    "recommended": [False, False, False]})
    >>> per_checkpoint(ev).iloc[0]["best clip within tolerance"]
    'none (every clip that changes weights costs too much)'
    """
    metric = str(evaluation.primary_metric.iloc[0])
    rows = []
    for checkpoint, group in evaluation.groupby("checkpoint", sort=False):
        original = group[group.variant == "original"]
        clipped = group[group.variant != "original"]
        chosen = group[group.recommended.astype(bool)] if "recommended" in group else group.iloc[:0]
        row = {"checkpoint": checkpoint, "step": group.step.iloc[0],
               metric: float(original[metric].iloc[0]) if len(original) else math.nan}
        if len(chosen):
            c = chosen.iloc[0]
            row.update({"best clip within tolerance": c.variant, "n_clipped": int(c.n_clipped),
                        "frac_clipped": float(c.frac_clipped), f"delta_{metric}": float(c[f"delta_{metric}"])})
        else:
            changes = clipped.n_clipped.astype(float).gt(0).any() if len(clipped) else False
            why = ("every clip that changes weights costs too much" if changes
                   else "no tested clip changes a weight")
            row.update({"best clip within tolerance": f"none ({why})" if len(clipped) else "none (no clip tested)",
                        "n_clipped": math.nan, "frac_clipped": math.nan, f"delta_{metric}": math.nan})
        rows.append(row)
    return pd.DataFrame(rows)


def headline(evaluation: pd.DataFrame | None, decided_by: str = "") -> str:
    """The recommendation in one sentence, for the last checkpoint: never a clip that changes
    nothing (that is "no clip needed"), never a clip beyond the tolerance.

    >>> ev = pd.DataFrame({"checkpoint": ["a", "a"], "step": [1, 1], "variant": ["original", "max_abs=9"],
    ...                    "n_clipped": [0, 0], "frac_clipped": [0.0, 0.0], "accuracy": [.9, .9],
    ...                    "delta_accuracy": [0.0, 0.0], "primary_metric": "accuracy", "recommended": [False, False]})
    >>> headline(ev)
    'No clip needed for a: no tested clip changes a weight of it (max_abs=9 leaves it as it is).'
    """
    if evaluation is None or not (evaluation.variant != "original").any():
        return ""
    metric = str(evaluation.primary_metric.iloc[0])
    last_label = evaluation.checkpoint.iloc[-1]
    last = evaluation[evaluation.checkpoint == last_label]
    clipped = last[last.variant != "original"]
    chosen = last[last.recommended.astype(bool)]
    by = f" Decided by {decided_by}." if decided_by else ""
    if len(chosen):
        c = chosen.iloc[0]
        delta = float(c[f"delta_{metric}"])
        change = (f"{delta * 100:+.2f} percentage points" if metric in ("accuracy", "top5_accuracy")
                  else f"{delta:+.4g}")
        return (f"Clip with {c.variant} ({last_label}): it changes {int(c.n_clipped)} weight(s) "
                f"({float(c.frac_clipped):.3%}) and {metric} moves by {change}, within the tolerance.{by}")
    if not clipped.n_clipped.astype(float).gt(0).any():
        return (f"No clip needed for {last_label}: no tested clip changes a weight of it "
                f"({', '.join(clipped.variant)} leaves it as it is).")
    return (f"No tested clip is safe for {last_label}: each one that changes weights costs more {metric} than "
            f"the tolerance allows; keep the weights unclipped or try looser settings.{by}")


def at_bound_table(stats: pd.DataFrame, max_rows: int = MAX_LINES, max_columns: int = MAX_COLUMNS) -> pd.DataFrame:
    """With a bound: the fraction of each layer at it (``frac_at_bound``), tensors x steps.

    At most ``max_columns`` checkpoints (evenly spaced, first and last kept) and
    ``max_rows`` tensors (largest final fraction first); the whole table is in stats.csv.
    Empty without a bound.
    """
    if "frac_at_bound" not in stats:
        return pd.DataFrame()
    rows = stats[stats.frac_at_bound.notna()]
    if rows.empty:
        return pd.DataFrame()
    labels = list(dict.fromkeys(rows.checkpoint))
    if len(labels) > max_columns:
        picks = sorted({int(round(i)) for i in np.linspace(0, len(labels) - 1, max_columns)})
        labels = [labels[i] for i in picks]
    steps = rows.drop_duplicates("checkpoint").set_index("checkpoint").step
    grid = rows[rows.checkpoint.isin(labels)].pivot_table(index="tensor", columns="checkpoint",
                                                         values="frac_at_bound", aggfunc="first")
    grid = grid.reindex(columns=labels)
    whole = grid.loc[["__all__"]] if "__all__" in grid.index else grid.iloc[:0]
    grid = grid.drop(index="__all__", errors="ignore")
    grid = grid.sort_values(labels[-1], ascending=False, na_position="last").head(max_rows)
    grid = pd.concat([grid, whole.rename(index={"__all__": "all bounded tensors"})])
    grid.columns = [f"step {int(steps[c])}" if pd.notna(steps.get(c)) else str(c) for c in grid.columns]
    return grid.reset_index(names="tensor")


def _first_bad_lines(flags: pd.DataFrame) -> list[str]:
    bad = first_bad(flags)
    lines = []
    for r in bad.head(MAX_LINES).itertuples(index=False):
        step = f" (step {int(r.step)})" if pd.notna(r.step) else ""
        at_first = [x.split(" (")[0] for x in r.rules_there.split(", ")]
        others = [x for x in r.rules.split(", ") if x not in at_first]
        later = f"; later also {', '.join(others)}" if others else ""
        if f"({r.severity})" not in r.rules_there:
            later += f" (worst: {r.severity})"
        lines.append(f"- `{r.tensor}`: first bad at `{r.checkpoint}`{step}: {r.rules_there}{later}")
    if len(bad) > MAX_LINES:
        lines.append(f"- ... and {len(bad) - MAX_LINES} more tensor(s): see flags.csv")
    return lines


def write_summary(result: Any, tolerance: float | None, top: int, out: Path) -> Path:
    """Write ``out/summary.md`` for an :class:`auditclip.audit.AuditResult`."""
    analysis = result.flags.analysis
    run = analysis.run
    readable = [c for c in run if c.label not in set(result.errors.get("checkpoint", pd.Series(dtype=str)))]
    steps = [c.step for c in readable if c.step is not None]
    lines = [
        "# auditclip audit", "",
        f"- run: `{shown_path(run.root)}`, {len(readable)} checkpoint(s) read"
        + (f", steps {min(steps)}..{max(steps)}" if steps else "")
        + f", {len(analysis.tensors)} tensor(s)",
        f"- formats: {', '.join(sorted({c.format for c in readable}))}",
        f"- drift reference: `{analysis.reference}`",
    ]
    if len(result.errors):
        lines.append(f"- unreadable, skipped: {', '.join(f'`{c}`' for c in result.errors.checkpoint)} (see errors.csv)")
    sentence = headline(result.evaluation, result.decided_by)
    if result.recommendation or sentence:
        metric = str(result.evaluation.primary_metric.iloc[0])
        lines += ["", "## Recommendation", "", sentence or f"Tightest clip that keeps {metric}: {result.recommendation}."]
        if getattr(result, "recommendation_cost", ""):
            lines += ["", f"Cost: {result.recommendation_cost}."]
    lines += ["", f"## Top drifting tensors (by the last checkpoint, vs `{analysis.reference}`)", ""]
    top_df = top_tensors(analysis.drift, top)
    lines.append(md_table(top_df[["tensor", "status", "rel_l2_change", "cosine", "max_abs_change", "ks", "wasserstein"]])
                 if len(top_df) else "No drift: the run has one checkpoint.")
    flags = result.flags.flags
    counts = severity_counts(flags)
    by_rule = flags[flags.severity.isin(SEVERITIES)].groupby("rule", sort=False).size() if len(flags) else {}
    lines += ["", "## Flags", "",
              ", ".join(f"{counts[s]} {s}" for s in SEVERITIES)
              + f" (fail on: {result.flags.fail_on}; {'FAILED' if result.flags.failed else 'passed'})"
              + (f"; by rule: {', '.join(f'{r} {n}' for r, n in by_rule.items())}" if len(by_rule) else "")]
    bad = _first_bad_lines(flags)
    if bad:
        lines += ["", "First bad checkpoint of each flagged tensor (every finding: flags.csv):", "", *bad]
    skipped = flags[flags.severity == "skipped"] if len(flags) else flags
    if len(skipped):
        lines += ["", "Rules not applied: " + "; ".join(f"{r.rule} ({r.message})" for r in skipped.itertuples())]
    bound_table = at_bound_table(analysis.stats)
    if len(bound_table):
        lines += ["", "## At the bound", "",
                  "Fraction of each layer within one ulp of its clip bound, by step (as a WGAN critic's "
                  "clipped weights pile up there; every checkpoint: `frac_at_bound` in stats.csv):", "",
                  md_table(bound_table, "{:.3f}")]
    if result.evaluation is not None:
        ev = result.evaluation
        lines += ["", "## Evaluation", "", f"Primary metric (decides the recommendation): {result.decided_by}", "",
                  "One row per checkpoint: the original's metric and the tightest clip within tolerance "
                  "(every variant: evaluation.csv).", "", md_table(per_checkpoint(ev))]
    lines += ["", "## Files", ""] + [f"- `{p.name}`" for p in result.files] + ["- `summary.md`"]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    path = out / "summary.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
