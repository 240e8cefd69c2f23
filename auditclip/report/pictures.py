"""Pictures that don't mislead: needs matplotlib (``pip install 'auditclip[plot]'``).

* ``histograms.png``: per top tensor, its value density at the first, middle and last
  checkpoint on bins shared across the run (so heights compare across steps), with
  the clip bound drawn when one is given; beside it a step x value density heatmap
  (every checkpoint, colour = density on a log scale), a ridge plot in one picture.
* ``drift_heatmap.png``: tensors x checkpoints, colour = relative L2 change from the
  reference on a log scale, rows sorted by the final drift, at most
  :data:`HEATMAP_ROWS` tensors and one row summarising the rest; its height is capped.
* ``sweep.png``: the change of the primary metric against each clip setting, one line
  per checkpoint coloured by step on a sequential colormap, the tolerance band shaded
  and the recommended setting of each checkpoint marked.

Each picture has a ``*_figure`` function returning the matplotlib figure (tests read
its artists) and a writer that saves it atomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..histograms import TensorHistograms
from ..output import atomic_path

PLOT_HINT = "pictures need matplotlib: pip install 'auditclip[plot]'"
#: Most tensors drawn as their own row of drift_heatmap.png; the rest become one summary row.
HEATMAP_ROWS = 40
#: Tallest drift_heatmap.png, in inches (41 rows at most fit in it).
HEATMAP_MAX_HEIGHT = 12.0
#: Widest picture, in inches, however many checkpoints the run has.
MAX_WIDTH = 16.0


def have_matplotlib() -> bool:
    """Whether matplotlib is installed (the pictures need it; every other report does not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as a PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _plain_log(axis: Any) -> None:
    """Label a log axis in plain numbers (0.01, 200): mathtext's 10^k layout is most of a picture's time."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(minor_thresholds=(1, 0.4)))


def _step_text(step: Any, label: str) -> str:
    return str(int(step)) if step is not None and not pd.isna(step) else label


# ---------------------------------------------------------------- drift heatmap

def drift_heatmap_data(drift: pd.DataFrame, top: int = HEATMAP_ROWS) -> pd.DataFrame:
    """The grid ``drift_heatmap.png`` draws: tensors x checkpoints of ``rel_l2_change`` vs the
    reference, rows sorted by the last checkpoint's value (largest first, infinite first,
    undefined last), the first ``top`` as they are and the rest as one row holding their
    median per checkpoint (named ``other N tensors (median)``).

    >>> d = pd.DataFrame({"checkpoint": ["a", "b"] * 3, "step": [1, 2] * 3, "baseline": "reference",
    ...                   "tensor": ["x", "x", "y", "y", "z", "z"], "rel_l2_change": [0, .1, 0, .5, 0, .2]})
    >>> drift_heatmap_data(d, top=2).index.tolist()
    ['y', 'z', 'other 1 tensors (median)']
    """
    ref = drift[(drift.baseline == "reference") & (drift.tensor != "__all__")]
    order = list(dict.fromkeys(ref.checkpoint))
    grid = ref.pivot_table(index="tensor", columns="checkpoint", values="rel_l2_change", aggfunc="first",
                           dropna=False).reindex(columns=order)
    if grid.empty:
        return grid
    final = grid[order[-1]].astype(float)
    grid = grid.iloc[np.argsort(-final.fillna(-np.inf).to_numpy(), kind="stable")]
    if len(grid) > top:
        rest = grid.iloc[top:]
        summary = rest.replace([np.inf, -np.inf], np.nan).median(axis=0, skipna=True)
        grid = pd.concat([grid.iloc[:top], summary.to_frame(f"other {len(rest)} tensors (median)").T])
    return grid


def drift_heatmap_figure(drift: pd.DataFrame, top: int = HEATMAP_ROWS) -> Any:
    """The figure of ``drift_heatmap.png`` (see :func:`drift_heatmap_data`); height capped at
    :data:`HEATMAP_MAX_HEIGHT` inches, width at :data:`MAX_WIDTH`."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    grid = drift_heatmap_data(drift, top)
    order = list(grid.columns)
    values = grid.to_numpy(dtype=float)
    shown = np.ma.masked_where(~np.isfinite(values) | (values <= 0), values)
    width = min(MAX_WIDTH, max(6.0, 0.35 * len(order) + 4))
    height = min(HEATMAP_MAX_HEIGHT, max(3.0, 0.25 * len(grid) + 1.8))
    fig, ax = plt.subplots(figsize=(width, height))
    cmap = plt.get_cmap("magma").with_extremes(bad="#d9d9d9")
    positive = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size and \
        positive.max() > positive.min() else None
    image = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(grid)), [str(t) for t in grid.index], fontsize=7)
    steps = drift.drop_duplicates("checkpoint").set_index("checkpoint").step
    every = max(1, math.ceil(len(order) / 40))  # at most 40 tick labels, however long the run
    ticks = list(range(0, len(order), every))
    ax.set_xticks(ticks, [_step_text(steps.get(order[i]), order[i]) for i in ticks], rotation=90, fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("tensor (largest final drift first)")
    ax.set_title("relative L2 change from the reference (log colour; grey: 0, infinite or undefined)", fontsize=9)
    bar = fig.colorbar(image, ax=ax, label="rel_l2_change")
    if norm is not None:
        _plain_log(bar.ax.yaxis)
    return fig


def drift_heatmap(drift: pd.DataFrame, path: str | Path, top: int = HEATMAP_ROWS) -> Path:
    """Write ``drift_heatmap.png`` (see :func:`drift_heatmap_figure`)."""
    return save(drift_heatmap_figure(drift, top), path)


# ---------------------------------------------------------------- histograms

Bound = Callable[[str], "tuple[float, float] | None"]


def histogram_figure(histograms: Sequence[TensorHistograms], steps: dict[str, Any],
                     bound: Bound | None = None) -> Any:
    """Per tensor: densities at the first, middle and last checkpoint on the tensor's shared
    bins (left, as ``stairs``), and the step x value density heatmap of every checkpoint (right).

    ``steps``: checkpoint label -> step, in run order; ``bound(name)``: the clip bound
    ``(lo, hi)`` drawn as dashed lines, or None.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    rows = max(1, len(histograms))
    fig, axes = plt.subplots(rows, 2, figsize=(12, 2.6 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1.1, 1]})
    order = list(steps)
    for (left, right), h in zip(axes, histograms):
        labels = [lb for lb in order if lb in h.counts]
        if not labels:
            continue
        picks = [labels[i] for i in sorted({0, len(labels) // 2, len(labels) - 1})]
        colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(picks)))
        for label, colour in zip(picks, colours):
            left.stairs(h.density(label), h.edges, color=colour, linewidth=1.3,
                        label=f"step {_step_text(steps[label], label)}")
        left.set_yscale("log")
        _plain_log(left.yaxis)
        left.xaxis.set_major_locator(MaxNLocator(6))  # readable labels however small the values
        left.set_xlabel("value")
        left.set_ylabel("density (log)")
        left.set_title(h.name, fontsize=9)
        limits = bound(h.name) if bound is not None else None
        if limits is not None:
            for x in limits:
                left.axvline(x, color="crimson", linestyle="--", linewidth=0.9)
                right.axhline(x, color="crimson", linestyle="--", linewidth=0.9)
            text = f"±{limits[1]:g}" if limits[0] == -limits[1] else f"[{limits[0]:g}, {limits[1]:g}]"
            left.plot([], [], color="crimson", linestyle="--", label=f"clip bound {text}")
        left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        grid = np.stack([h.density(lb) for lb in labels], axis=1)  # value bins x checkpoints
        shown = np.ma.masked_where(grid <= 0, grid)
        positive = grid[grid > 0]
        norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size and \
            positive.max() > positive.min() else None
        cmap = plt.get_cmap("viridis").with_extremes(bad="white")
        image = right.pcolormesh(np.arange(len(labels) + 1) - 0.5, h.edges, shown, cmap=cmap, norm=norm,
                                 shading="flat")
        every = max(1, math.ceil(len(labels) / 12))
        ticks = list(range(0, len(labels), every))
        right.set_xticks(ticks, [_step_text(steps[labels[i]], labels[i]) for i in ticks], rotation=90, fontsize=7)
        right.set_xlabel("step")
        right.set_ylabel("value")
        right.set_title(f"{h.name}: density by step", fontsize=9)
        bar = fig.colorbar(image, ax=right, label="density")
        if norm is not None:
            _plain_log(bar.ax.yaxis)
    # fixed spacing (room for the legends right of the left panels): tight_layout would lay
    # every tick label out once more, most of the picture's time
    fig.subplots_adjust(hspace=0.55, wspace=0.7)
    return fig


def histograms(histograms: Sequence[TensorHistograms], path: str | Path, steps: dict[str, Any],
               bound: Bound | None = None) -> Path:
    """Write ``histograms.png`` (see :func:`histogram_figure`)."""
    return save(histogram_figure(histograms, steps, bound), path)


# ---------------------------------------------------------------- sweep

def gain(table: pd.DataFrame, metric: str, higher: bool, points: bool) -> pd.Series:
    """Each row's change of ``metric`` from its checkpoint's original, positive when better, in the
    unit ``--tolerance`` uses: percentage points for an accuracy, else percent of the original.

    >>> t = pd.DataFrame({"checkpoint": ["a", "a"], "variant": ["original", "max_abs=1"], "loss": [2.0, 2.1]})
    >>> gain(t, "loss", higher=False, points=False).round(6).tolist()
    [0.0, -5.0]
    """
    base = table[table.variant == "original"].set_index("checkpoint")[metric]
    original = table.checkpoint.map(base).astype(float)
    change = table[metric].astype(float) - original
    if points:
        return change * 100 + 0.0
    return (change if higher else -change) / original.abs() * 100 + 0.0  # + 0.0: no -0.0


def sweep_figure(table: pd.DataFrame, metric: str, tolerance: float | None = None,
                 higher: bool | None = None) -> Any:
    """The figure of ``sweep.png``: one line per checkpoint (colour by step, viridis), the
    tolerance band shaded, each checkpoint's ``recommended`` setting marked with a star."""
    from ..metrics import DIRECTIONS, Primary

    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    higher = DIRECTIONS.get(metric, True) if higher is None else higher
    primary = Primary(metric, higher)
    tol = primary.tolerance(tolerance)
    unit = "percentage points" if primary.points else "% of the original"
    y_all = gain(table, metric, higher, primary.points)
    clipped = table[table.variant != "original"]
    settings = list(dict.fromkeys(clipped.variant))
    checkpoints = list(dict.fromkeys(clipped.checkpoint))
    steps = table.drop_duplicates("checkpoint").set_index("checkpoint").step
    positions = [float(steps.get(c)) if pd.notna(steps.get(c)) else float(i) for i, c in enumerate(checkpoints)]
    norm = Normalize(vmin=min(positions, default=0.0), vmax=max(max(positions, default=1.0), min(positions, default=0.0) + 1e-9))
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    for checkpoint, position in zip(checkpoints, positions):
        mine = clipped[clipped.checkpoint == checkpoint]
        ys = pd.Series(y_all[mine.index].to_numpy(dtype=float), index=mine.variant).reindex(settings)
        colour = cmap(norm(position))
        ax.plot(range(len(settings)), ys.to_numpy(dtype=float), marker="o", markersize=3, color=colour,
                linewidth=1.2, label="_" + str(checkpoint))
        if "recommended" in mine:
            chosen = pd.Series(mine.recommended.to_numpy(), index=mine.variant).reindex(settings)
            for i, flag in enumerate(chosen.tolist()):
                if flag is True or flag == 1:
                    ax.plot([i], [float(ys.iloc[i])], marker="*", markersize=13, color=colour,
                            markeredgecolor="black", linestyle="none", label="_recommended")
    low, high = ax.get_ylim()
    low, high = min(low, -1.5 * tol), max(high, 0.5 * tol)
    ax.axhspan(-tol, high, color="tab:green", alpha=0.12, label=f"within tolerance ({tol:g} {unit})", zorder=0)
    ax.set_ylim(low, high)
    ax.plot([], [], marker="*", markersize=11, color="white", markeredgecolor="black", linestyle="none",
            label="recommended (per checkpoint)")
    ax.set_xticks(range(len(settings)), settings, rotation=30, fontsize=8)
    ax.set_xlabel("clip setting")
    ax.set_ylabel(f"change of {metric} vs unclipped\n({unit}; above 0 is better)")
    ax.set_title(f"{metric} by clip setting, one line per checkpoint")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="checkpoint step")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def sweep_plot(table: pd.DataFrame, metric: str, path: str | Path, tolerance: float | None = None,
               higher: bool | None = None) -> Path:
    """Write ``sweep.png`` (see :func:`sweep_figure`)."""
    return save(sweep_figure(table, metric, tolerance, higher), path)
