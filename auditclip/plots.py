"""Pictures for people who would rather look: needs matplotlib (``pip install 'auditclip[plot]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .checkpoints import Run
from .output import atomic_path

PLOT_HINT = "pictures need matplotlib: pip install 'auditclip[plot]'"


def have_matplotlib() -> bool:
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


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def drift_heatmap(drift: pd.DataFrame, path: Path) -> Path:
    """Tensors x checkpoints, colour = relative L2 change from the reference."""
    plt = _pyplot()
    ref = drift[(drift.baseline == "reference") & (drift.tensor != "__all__")]
    order = list(dict.fromkeys(ref.checkpoint))
    grid = ref.pivot_table(index="tensor", columns="checkpoint", values="rel_l2_change", aggfunc="first")
    grid = grid.reindex(columns=order)
    values = np.ma.masked_invalid(grid.to_numpy(dtype=float))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(order) + 3), max(3, 0.3 * len(grid) + 1.5)))
    image = ax.imshow(values, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(grid)), grid.index, fontsize=7)
    steps = drift.drop_duplicates("checkpoint").set_index("checkpoint").step
    ax.set_xticks(range(len(order)), [str(steps.get(c, "")) if pd.notna(steps.get(c)) else c for c in order],
                  rotation=90, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title("relative L2 change from the reference")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def histograms(run: Run, tensors: list[str], path: Path, key: str | None = None) -> Path:
    """Value distributions of a few tensors at the first, middle and last checkpoint."""
    plt = _pyplot()
    picks = sorted({0, len(run) // 2, len(run) - 1})
    fig, axes = plt.subplots(len(tensors), 1, figsize=(7, 2.2 * len(tensors)), squeeze=False)
    for ax, name in zip(axes[:, 0], tensors):
        for i in picks:
            try:
                with run[i].open(key) as reader:
                    if name not in reader:
                        continue
                    values = reader.get(name).detach().reshape(-1).float().numpy()
            except Exception:  # an unreadable checkpoint is reported elsewhere; the picture goes on
                continue
            values = values[np.isfinite(values)]
            ax.hist(values, bins=80, histtype="step", label=f"step {run[i].step if run[i].step is not None else run[i].label}")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def sweep_plot(table: pd.DataFrame, metric: str, path: Path) -> Path:
    """The primary metric against each clip setting, one line per checkpoint."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    clipped = table[table.variant != "original"]
    labels = list(dict.fromkeys(clipped.variant))
    for checkpoint, group in clipped.groupby("checkpoint", sort=False):
        ys = group.set_index("variant").reindex(labels)[metric]
        line = ax.plot(range(len(labels)), ys.to_numpy(dtype=float), marker="o", label=str(checkpoint))[0]
        base = table[(table.checkpoint == checkpoint) & (table.variant == "original")][metric]
        if len(base):
            ax.axhline(float(base.iloc[0]), color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by clip setting (dotted: unclipped)")
    if clipped.checkpoint.nunique() <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
