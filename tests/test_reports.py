"""Reports people look at: TensorBoard event files read back with TensorBoard's own reader,
report.html parsed and rendered in a real headless Chromium, the pictures' plotted data,
summary.md's size and content, inspect's JSON precision.

Every figure is compared with an independent computation on the checkpoint files
(numpy on the tensors safetensors loads, numpy.histogram on the same edges).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from auditclip.cli import cli
from auditclip.histograms import HistogramCollector, count_fine, rebin

from conftest import SAMPLES, save_safetensors

MODEL = str(SAMPLES / "digits_mlp.py") + ":make_model"
DATA = str(SAMPLES / "digits_test.safetensors")
HIGH_LR = SAMPLES / "high_lr"
WGAN = SAMPLES / "wgan_clip"


def invoke(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _tensors(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every checkpoint's tensors as numpy, read by safetensors itself (not auditclip)."""
    return {p.name: {k: v.double().numpy() for k, v in load_file(str(p)).items()}
            for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``audit`` of the sample run with a model, clips, a bound and --tensorboard (one run for the module)."""
    root = tmp_path_factory.mktemp("audit")
    have_tensorboard = importlib.util.find_spec("tensorboard") is not None  # its tests skip without it
    result = invoke("audit", HIGH_LR, "--model", MODEL, "--data", DATA, "--clip", "max_abs=1.5", "--clip",
                    "max_abs=3", "--clip", "max_abs=10", "--tolerance", "1", "--max-abs", "5",
                    "--out", root / "report", *(["--tensorboard", root / "tb"] if have_tensorboard else []))
    return {"result": result, "out": root / "report", "tb": root / "tb", "tensors": _tensors(HIGH_LR)}


# ---------------------------------------------------------------- TensorBoard

def _accumulator(folder: Path) -> Any:
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                             reason="TensorBoard's reader needs pip install 'auditclip[tensorboard]'")
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.HISTOGRAMS: 0, ea.SCALARS: 0})
    acc.Reload()
    return acc


def test_audit_tensorboard_histograms_read_back_with_tensorboard(audited: dict[str, Any]) -> None:
    pytest.importorskip("tensorboard", reason="needs pip install 'auditclip[tensorboard]'")
    assert audited["result"].exit_code == 1, audited["result"].output  # --max-abs 5: the late weights break it
    acc = _accumulator(audited["tb"])
    tensors = audited["tensors"]
    labels = list(tensors)
    steps = [45 * (i + 1) for i in range(12)]
    names = sorted(tensors[labels[0]])
    assert sorted(acc.Tags()["histograms"]) == sorted(
        f"weights/{n.rsplit('.', 1)[0]}/{n.rsplit('.', 1)[1]}" for n in names)
    for name in names:
        events = acc.Histograms(f"weights/{name.rsplit('.', 1)[0]}/{name.rsplit('.', 1)[1]}")
        assert [e.step for e in events] == steps
        limits = [tuple(e.histogram_value.bucket_limit) for e in events]
        assert len(set(limits)) == 1  # the same bins at every step
        right = np.array(limits[0])
        width = right[1] - right[0]
        assert np.allclose(np.diff(right), width)
        edges = np.concatenate([[right[0] - width], right])
        for label, event in zip(labels, events):
            values = tensors[label][name].reshape(-1)
            h = event.histogram_value
            assert sum(h.bucket) == values.size == h.num  # counts sum to numel (no NaN/Inf in the sample)
            want, _ = np.histogram(values, bins=edges)
            assert np.array_equal(np.array(h.bucket), want)
            assert (h.min, h.max) == (values.min(), values.max())
            assert h.sum_squares == pytest.approx(float(np.dot(values, values)), rel=1e-9)
            assert event.wall_time == pytest.approx(os.stat(HIGH_LR / label).st_mtime)


def test_audit_tensorboard_scalars_per_step(audited: dict[str, Any]) -> None:
    pytest.importorskip("tensorboard", reason="needs pip install 'auditclip[tensorboard]'")
    acc = _accumulator(audited["tb"])
    tensors = audited["tensors"]
    labels = list(tensors)
    scalars = set(acc.Tags()["scalars"])
    for section in ("l2_norm", "abs_max", "rel_l2_change_vs_previous", "rel_l2_change_vs_reference",
                    "frac_at_bound"):
        assert f"{section}/net.0/weight" in scalars, section
    norms = [e.value for e in acc.Scalars("l2_norm/net.0/weight")]
    assert norms == pytest.approx([np.linalg.norm(tensors[lb]["net.0.weight"]) for lb in labels], rel=1e-6)
    change = acc.Scalars("rel_l2_change_vs_previous/net.3/weight")
    assert [e.step for e in change] == [45 * (i + 1) for i in range(1, 12)]
    want = [np.linalg.norm(tensors[b]["net.3.weight"] - tensors[a]["net.3.weight"])
            / np.linalg.norm(tensors[a]["net.3.weight"]) for a, b in zip(labels, labels[1:])]
    assert [e.value for e in change] == pytest.approx(want, rel=1e-5)
    # findings per step, as flags.csv counts them
    flags = pd.read_csv(audited["out"] / "flags.csv")
    for severity in ("error", "warning"):
        got = {e.step: e.value for e in acc.Scalars(f"flags/{severity}")}
        mine = flags[flags.severity == severity].groupby("step").size()
        assert got == {s: float(mine.get(s, 0)) for s in got}, severity
    assert sum(e.value for e in acc.Scalars("flags/error")) == (flags.severity == "error").sum() > 0


def test_tensorboard_command_and_drift_option(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="needs pip install 'auditclip[tensorboard]'")
    for _ in range(2):  # a second export into the same folder replaces the first
        result = invoke("tensorboard", WGAN, tmp_path / "tb", "--max-abs", "0.01", "--include", "*.weight")
        assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    acc = _accumulator(tmp_path / "tb")
    assert sorted(acc.Tags()["histograms"]) == ["weights/net.0/weight", "weights/net.3/weight", "weights/net.6/weight"]
    tensors = _tensors(WGAN)
    at_bound = acc.Scalars("frac_at_bound/net.0/weight")
    last = tensors[list(tensors)[-1]]["net.0.weight"].astype(np.float32)
    ulp = np.spacing(np.float32(0.01))
    assert at_bound[-1].value == pytest.approx(float((np.abs(np.abs(last) - np.float32(0.01)) <= ulp).mean()), abs=1e-7)

    result = invoke("drift", HIGH_LR, "--out", tmp_path / "d", "--tensorboard", tmp_path / "tb2")
    assert result.exit_code == 0, result.output
    acc = _accumulator(tmp_path / "tb2")
    assert len(acc.Histograms("weights/net.6/bias")) == 12 and "model/l2_norm" in acc.Tags()["scalars"]


def test_tensorboard_without_the_package_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_tensorboard(name: str, *args: Any, **kw: Any) -> Any:
        if name == "tensorboard" or name.startswith("tensorboard.") or name == "torch.utils.tensorboard":
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    result = invoke("drift", HIGH_LR, "--out", tmp_path / "d", "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 2
    assert "pip install 'auditclip[tensorboard]'" in result.output
    assert not (tmp_path / "d").exists()  # refused before the long work


# ---------------------------------------------------------------- the histograms themselves

@pytest.mark.parametrize("case", ["normal", "nan_inf", "constant", "zeros", "zeros_first", "bf16", "wide", "blocks"])
def test_shared_bins_count_exactly(case: str) -> None:
    g = torch.Generator().manual_seed(3)
    versions = {
        "normal": [torch.randn(5000, generator=g) * s for s in (0.01, 1.0, 30.0)],
        "nan_inf": [torch.cat([torch.randn(999, generator=g), torch.tensor([math.nan, math.inf, -math.inf])])] * 2,
        "constant": [torch.full((100,), 0.25), torch.full((50,), -3.0)],
        "zeros": [torch.zeros(64), torch.zeros(8)],
        "zeros_first": [torch.zeros(16), torch.randn(1000, generator=g) * 0.1, -torch.zeros(4)],
        "bf16": [(torch.randn(4000, generator=g) * 0.02).to(torch.bfloat16), torch.randn(10, generator=g).bfloat16()],
        "wide": [torch.tensor([-3e38, 0.0, 1e-30, 3e38]), torch.tensor([1.0, 2.0])],
        "blocks": [torch.randn((1 << 20) + 7, generator=g), torch.randn(3000, generator=g) * 5],
    }[case]
    fines = [count_fine(t) for t in versions]
    edges, counts = rebin(fines)
    assert len(counts[0]) <= 66 and np.all(np.diff(edges) > 0)
    if case in ("normal", "zeros_first", "blocks"):
        assert len(counts[0]) >= 32  # an all-zero version does not coarsen the run's bins
    for t, c in zip(versions, counts):
        values = t.float().numpy().astype(np.float64)
        finite = values[np.isfinite(values)]
        assert c.sum() == finite.size
        want = np.array([np.count_nonzero((finite >= a) & (finite < b)) for a, b in zip(edges[:-1], edges[1:])])
        assert np.array_equal(c, want)


def test_collector_keeps_run_order_and_shared_edges() -> None:
    c = HistogramCollector()
    c.add("b", "w", torch.tensor([5.0, 6.0]))
    c.add("a", "w", torch.tensor([0.0, 1.0]))
    h = c.result(["a", "b"])["w"]
    assert list(h.counts) == ["a", "b"] and h.edges[0] <= 0.0 and h.edges[-1] > 6.0
    assert np.isclose((h.density("a") * np.diff(h.edges)).sum(), 1.0)


# ---------------------------------------------------------------- pictures

def test_pictures_share_bins_and_cap_the_heatmap(audited: dict[str, Any]) -> None:
    pytest.importorskip("matplotlib", reason="pictures need matplotlib")
    from matplotlib.patches import StepPatch

    from auditclip.analysis import analyze
    from auditclip.report.pictures import (HEATMAP_MAX_HEIGHT, drift_heatmap_data, drift_heatmap_figure,
                                           histogram_figure, sweep_figure)

    collector = HistogramCollector()
    result = analyze(HIGH_LR, visit=collector.visit)
    hists = collector.result([c.label for c in result.run])
    steps = {c.label: c.step for c in result.run}
    names = ["net.0.weight", "net.3.bias"]
    fig = histogram_figure([hists[n] for n in names], steps, bound=lambda n: (-1.5, 1.5))
    axes = fig.axes
    for i, name in enumerate(names):
        left = axes[2 * i]
        patches = [p for p in left.patches if isinstance(p, StepPatch)]
        assert len(patches) == 3  # first, middle, last checkpoint
        for p in patches:
            assert np.array_equal(p.get_data().edges, hists[name].edges)  # shared bins across steps
        assert left.get_xlabel() == "value" and left.get_ylabel().startswith("density")
        assert sorted(line.get_xdata()[0] for line in left.get_lines() if len(line.get_xdata())) == [-1.5, 1.5]
        # the densities drawn are counts / (total x width), as numpy's density=True gives
        values = audited["tensors"]["epoch_12.safetensors"][name].reshape(-1)
        want, _ = np.histogram(values, bins=hists[name].edges, density=True)
        assert np.allclose(patches[-1].get_data().values, want)
    # drift heatmap: 250 tensors become 40 rows + one summary row, sorted by the final drift, height capped
    rng = np.random.default_rng(0)
    rows = [{"checkpoint": f"c{j}", "step": j, "tensor": f"t{i:03d}", "baseline": "reference",
             "rel_l2_change": 0.0 if j == 0 else float(rng.lognormal()) * j} for i in range(250) for j in range(5)]
    drift = pd.DataFrame(rows)
    grid = drift_heatmap_data(drift)
    final = drift[drift.checkpoint == "c4"].set_index("tensor").rel_l2_change
    assert grid.index[:40].tolist() == final.sort_values(ascending=False).index[:40].tolist()
    assert grid.index[-1] == "other 210 tensors (median)"
    rest = final.sort_values(ascending=False).index[40:]
    assert grid.iloc[-1]["c4"] == pytest.approx(float(np.median(final[rest])))
    fig = drift_heatmap_figure(drift)
    assert fig.get_size_inches()[1] <= HEATMAP_MAX_HEIGHT and len(fig.axes[0].get_yticklabels()) == 41
    assert type(fig.axes[0].images[0].norm).__name__ == "LogNorm"
    # sweep: one colour per checkpoint (sequential by step), the tolerance band, recommended settings starred
    ev = pd.read_csv(audited["out"] / "evaluation.csv")
    fig = sweep_figure(ev, "accuracy", tolerance=1.0, higher=True)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("_epoch")]
    assert len(lines) == 12 and len({ln.get_color() for ln in lines}) == 12
    stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*" and ln.get_label() == "_recommended"]
    assert len(stars) == int(ev.recommended.sum()) > 0
    assert any(abs(p.get_y() + 1.0) < 1e-9 for p in ax.patches if hasattr(p, "get_y"))  # band from -tolerance
    for f in ("drift_heatmap.png", "histograms.png", "sweep.png"):
        assert (audited["out"] / f).stat().st_size > 1000


# ---------------------------------------------------------------- summary.md

def test_summary_fits_a_screen(audited: dict[str, Any]) -> None:
    out = audited["out"]
    summary = (out / "summary.md").read_text(encoding="utf-8")
    ev = pd.read_csv(out / "evaluation.csv")
    section = summary.split("## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    table = [ln for ln in section.splitlines() if ln.startswith("| ")]
    assert len(table) == 2 + ev.checkpoint.nunique()  # header, rule, one row per checkpoint
    assert len(section.strip().splitlines()) <= 24
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in table[1:]}
    for checkpoint, group in ev.groupby("checkpoint"):
        chosen = group[group.recommended]
        cells = rows[checkpoint].split(" | ")
        assert cells[3] == (chosen.variant.iloc[0] if len(chosen) else cells[3]) and (len(chosen) or "none" in cells[3])
        assert float(cells[2]) == pytest.approx(float(group[group.variant == "original"].accuracy.iloc[0]), rel=1e-3)
    # the headline: max_abs=3 at epoch_12 costs 0.83 points, within --tolerance 1, and it clips weights
    last = ev[(ev.checkpoint == "epoch_12.safetensors") & ev.recommended]
    assert last.variant.tolist() == ["max_abs=3"] and int(last.n_clipped.iloc[0]) > 0
    assert f"Clip with max_abs=3 (epoch_12.safetensors): it changes {int(last.n_clipped.iloc[0])} weight(s)" in summary
    # a first-bad line per flagged tensor, at the first checkpoint flags.csv has for it
    flags = pd.read_csv(out / "flags.csv")
    found = flags[flags.severity.isin(["error", "warning", "info"])]
    for tensor, group in found.groupby("tensor"):
        assert f"- `{tensor}`: first bad at `{group.checkpoint.iloc[0]}`" in summary
    # the bound's section: the fraction at the bound per step, as stats.csv has it
    assert "## At the bound" in summary


def test_summary_at_the_bound_section_for_a_wgan_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setattr(importlib.import_module("auditclip.audit"), "have_matplotlib", lambda: False)  # no pictures
    (tmp_path / "errors.csv").write_text("checkpoint,error,message\nold,unreadable,from an earlier run\n")
    result = invoke("audit", WGAN, "--max-abs", "0.01", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "errors.csv").exists()  # a stale list from an earlier audit would mislead
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    section = summary.split("## At the bound\n", 1)[1].split("\n## ", 1)[0]
    header = next(ln for ln in section.splitlines() if ln.startswith("| tensor"))
    assert header.split(" | ")[1] == "step 45" and header.rstrip(" |").endswith("step 540")
    stats = pd.read_csv(tmp_path / "stats.csv")
    row = next(ln for ln in section.splitlines() if ln.startswith("| net.0.weight "))
    want = stats[(stats.tensor == "net.0.weight") & (stats.step == 540)].frac_at_bound.iloc[0]
    assert float(row.rstrip(" |").split(" | ")[-1]) == pytest.approx(want, abs=5e-4)
    w = load_file(str(WGAN / "epoch_12.safetensors"))["net.0.weight"]
    assert want == pytest.approx(float(((w.abs() - 0.01).abs() <= float(np.spacing(np.float32(0.01)))).double().mean()))
    assert "No clip" not in summary and "## Evaluation" not in summary  # no model: no evaluation, no recommendation


# ---------------------------------------------------------------- report.html

class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _expected_figures(out: Path) -> tuple[str, dict[str, int]]:
    ev = pd.read_csv(out / "evaluation.csv")
    last = ev[(ev.checkpoint == ev.checkpoint.iloc[-1]) & ev.recommended]
    flags = pd.read_csv(out / "flags.csv")
    counts = {s: int((flags.severity == s).sum()) for s in ("error", "warning", "info")}
    return str(last.variant.iloc[0]), counts


def test_report_html_is_self_contained_and_holds_the_figures(audited: dict[str, Any]) -> None:
    page = (audited["out"] / "report.html").read_text(encoding="utf-8")
    parser = _Text()
    parser.feed(page)
    text = " ".join(" ".join(parser.text).split())
    recommended, counts = _expected_figures(audited["out"])
    assert f"Recommendation: Clip with {recommended}" in text
    for severity, n in counts.items():
        assert f"{n} {severity}" in text
    tags = [t for t, _ in parser.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    images = [a["src"] for t, a in parser.tags if t == "img"]
    pictures = 3 if importlib.util.find_spec("matplotlib") is not None else 0
    assert len(images) == pictures and all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in page and "https://" not in page
    for checkpoint in pd.read_csv(audited["out"] / "evaluation.csv").checkpoint.unique():
        assert checkpoint in text


def test_report_html_renders_in_headless_chromium(audited: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from browser import find_browser, load

    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium-family browser on PATH (chromium, chromium-browser, google-chrome; or "
                    "$AUDITCLIP_CHROMIUM): .ci/run tries `apt-get install -y chromium`, which needs root and the "
                    "Debian archive; the page is still checked by test_report_html_is_self_contained...")
    page = load(browser, audited["out"] / "report.html")
    assert page.errors == [], page.errors
    text = " ".join(page.text.split())
    recommended, counts = _expected_figures(audited["out"])
    assert f"Recommendation: Clip with {recommended}" in text
    for severity, n in counts.items():
        assert f"{n} {severity}" in text
    folder = Path(os.environ.get("AUDITCLIP_ARTIFACTS", audited["out"]))
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / "report_html_screenshot.png"
    shot.write_bytes(page.screenshot)
    assert page.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nreport.html screenshot (headless {Path(browser).name}): {shot}")


# ---------------------------------------------------------------- inspect --format json

def test_inspect_json_keeps_full_precision(tmp_path: Path) -> None:
    from auditclip.analysis import inspect_checkpoint

    g = torch.Generator().manual_seed(1)
    ckpt = save_safetensors(tmp_path / "m.safetensors", {"w": torch.randn(7, 5, generator=g) / 3,
                                                         "b": torch.full((3,), math.nan)})
    result = invoke("inspect", ckpt, "--format", "json")
    assert result.exit_code == 0, result.output
    records = {r["tensor"]: r for r in json.loads(result.output)}
    want = inspect_checkpoint(ckpt).set_index("tensor")
    for column in ("mean", "std", "l2_norm", "p99", "skew"):
        assert records["w"][column] == float(want.loc["w", column])  # bit for bit, not 10 digits
    assert records["b"]["mean"] is None and records["b"]["n_nan"] == 3


def test_report_html_escapes_names_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setattr(importlib.import_module("auditclip.audit"), "have_matplotlib", lambda: False)
    hostile = '<img src=x onerror="alert(1)">.weight'
    for step in (1, 2):
        save_safetensors(tmp_path / "run" / f"step_{step}.safetensors",
                         {hostile: torch.full((4, 4), float(step)), "ok.bias": torch.zeros(4)})
    result = invoke("audit", tmp_path / "run", "--max-abs", "1.5", "--out", tmp_path / "r")
    assert result.exit_code == 1, result.output  # step 2 breaks the bound
    parser = _Text()
    parser.feed((tmp_path / "r" / "report.html").read_text(encoding="utf-8"))
    assert [t for t, _ in parser.tags if t in ("img", "script")] == []
    assert hostile in " ".join(parser.text)  # shown as text, not markup
