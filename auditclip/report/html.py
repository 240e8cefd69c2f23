"""``report.html``: the audit in one self-contained page.

Inline CSS, the pictures embedded as ``data:image/png;base64`` URIs, no script and
no network: the file can be mailed, attached to a CI run or opened offline. Every
text that came from a file (tensor names, paths, notes) is HTML-escaped.

Sections: the run at a glance (checkpoints, steps, formats, what was skipped and
every note), the recommendation, the flags grouped by rule with the first
checkpoint each tensor went bad, the top drifting tensors, the evaluation with one
row per checkpoint, the fraction at the bound (with a bound), and the pictures.
"""

from __future__ import annotations

import base64
import math
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import shown_path
from ..output import atomic_path
from .summary import SEVERITIES, at_bound_table, first_bad, headline, per_checkpoint, severity_counts, top_tensors

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:72rem;
padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}th{background:#f4f4f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f4f4f6;padding:0 .2rem;border-radius:3px}
.verdict{padding:.6rem 1rem;border-radius:6px;margin:1rem 0;font-weight:600}
.pass{background:#e7f6ea}.fail{background:#fdeaea}.rec{background:#eef3fd}
.badge{display:inline-block;padding:0 .5rem;border-radius:9px;margin-right:.4rem;font-size:.85rem}
.error{background:#f8d0d0}.warning{background:#fbe8c0}.info{background:#dde8f8}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
ul.notes li{font-size:.85rem}
"""


def _cell(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return f"<td>{'yes' if v else 'no'}</td>"
    if isinstance(v, (int, np.integer)):
        return f'<td class="num">{int(v)}</td>'
    if isinstance(v, (float, np.floating)):
        return '<td class="num"></td>' if math.isnan(v) else f'<td class="num">{float(v):.4g}</td>'
    if v is None or v is pd.NA:
        return "<td></td>"
    return f"<td>{escape(str(v))}</td>"


def html_table(df: pd.DataFrame) -> str:
    """An HTML table of ``df`` (text escaped, numbers to 4 significant digits).

    >>> html_table(pd.DataFrame({"a": [1.5], "b": ["<x>"]}))
    '<table><tr><th>a</th><th>b</th></tr><tr><td class="num">1.5</td><td>&lt;x&gt;</td></tr></table>'
    """
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


_CAPTIONS = {
    "drift_heatmap.png": "Relative L2 change from the reference, tensors sorted by final drift (log colour).",
    "histograms.png": "Value densities on bins shared across steps (left) and density by step (right).",
    "sweep.png": "Change of the primary metric by clip setting, one line per checkpoint (colour: step).",
}


def render_html(result: Any, tolerance: float | None = None) -> str:
    """The page for an :class:`auditclip.audit.AuditResult` (its pictures read from ``result.files``)."""
    analysis = result.flags.analysis
    run = analysis.run
    skipped = set(result.errors.get("checkpoint", pd.Series(dtype=str)))
    readable = [c for c in run if c.label not in skipped]
    steps = [c.step for c in readable if c.step is not None]
    counts = severity_counts(result.flags.flags)
    failed = result.flags.failed
    parts = [f"<h1>auditclip audit of <code>{escape(shown_path(run.root))}</code></h1>"]
    verdict = ("FAILED" if failed else "passed") + f" at --fail-on {escape(result.flags.fail_on)}"
    parts.append(f'<div class="verdict {"fail" if failed else "pass"}">'
                 + " ".join(f'<span class="badge {s}">{counts[s]} {s}</span>' for s in SEVERITIES)
                 + f" {verdict}</div>")
    sentence = headline(result.evaluation, result.decided_by)
    if sentence:
        parts.append(f'<div class="verdict rec">Recommendation: {escape(sentence)}</div>')

    glance = [
        ("checkpoints read", f"{len(readable)} of {len(run)}"),
        ("steps", f"{min(steps)} .. {max(steps)}" if steps else "unknown"),
        ("tensors", str(len(analysis.tensors))),
        ("formats", ", ".join(sorted({c.format for c in readable}))),
        ("drift reference", str(analysis.reference)),
    ]
    parts.append("<h2>The run at a glance</h2>" + html_table(pd.DataFrame(glance, columns=["", "value"])))
    parts.append(f"<details{' open' if len(run) <= 20 else ''}><summary>{len(run)} checkpoint(s)</summary>"
                 + html_table(pd.DataFrame(
        [{"checkpoint": c.label, "step": c.step if c.step is not None else "", "format": c.format,
          "read": "skipped" if c.label in skipped else "yes"} for c in run])) + "</details>")
    if len(result.errors):
        parts.append("<h3>Unreadable, skipped (errors.csv)</h3>" + html_table(result.errors))
    if result.notes:
        parts.append("<h3>Notes: what was stubbed, left out or assumed</h3><ul class=\"notes\">"
                     + "".join(f"<li>{escape(str(n))}</li>" for n in result.notes) + "</ul>")

    flags = result.flags.flags
    parts.append("<h2>Flags</h2>")
    found = flags[flags.severity.isin(SEVERITIES)] if len(flags) else flags
    if len(found):
        by_rule = found.groupby(["rule", "severity"], sort=False).agg(
            findings=("tensor", "size"), tensors=("tensor", "nunique"),
            first_checkpoint=("checkpoint", "first")).reset_index()
        parts.append(html_table(by_rule))
        parts.append("<h3>First bad checkpoint of each flagged tensor</h3>"
                     + html_table(first_bad(flags).rename(columns={"rules_there": "rules at first",
                                                                   "rules": "rules in the run"})))
    else:
        parts.append("<p>No findings.</p>")
    skipped_rules = flags[flags.severity == "skipped"] if len(flags) else flags
    if len(skipped_rules):
        parts.append("<h3>Rules not applied</h3>" + html_table(skipped_rules[["rule", "message"]]))

    parts.append(f"<h2>Top drifting tensors (last checkpoint vs <code>{escape(str(analysis.reference))}</code>)</h2>")
    top = top_tensors(analysis.drift, 10)
    parts.append(html_table(top[["tensor", "status", "rel_l2_change", "cosine", "max_abs_change", "ks",
                                 "wasserstein"]]) if len(top) else "<p>No drift: the run has one checkpoint.</p>")

    bound = at_bound_table(analysis.stats)
    if len(bound):
        parts.append("<h2>At the bound</h2><p>Fraction of each layer within one ulp of its clip bound, by step.</p>"
                     + html_table(bound))
    if result.evaluation is not None:
        parts.append(f"<h2>Evaluation</h2><p>Primary metric: {escape(result.decided_by)}. One row per checkpoint; "
                     "every variant is in evaluation.csv.</p>" + html_table(per_checkpoint(result.evaluation)))

    pictures = [p for p in result.files if p.suffix == ".png" and p.exists()]
    if pictures:
        parts.append("<h2>Pictures</h2>" + "".join(_image(p, _CAPTIONS.get(p.name, p.name)) for p in pictures))
    body = "\n".join(parts)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>auditclip audit: {escape(shown_path(run.root))}</title><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


def write_html(result: Any, path: str | Path, tolerance: float | None = None) -> Path:
    """Write ``report.html`` (see :func:`render_html`) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(render_html(result, tolerance), encoding="utf-8")
    return path
