"""The pictures moved to :mod:`auditclip.report.pictures`; these names stay importable from here."""

from __future__ import annotations

from .report.pictures import (PLOT_HINT, drift_heatmap, drift_heatmap_figure, have_matplotlib, histogram_figure,
                              histograms, sweep_figure, sweep_plot)

__all__ = ["PLOT_HINT", "drift_heatmap", "drift_heatmap_figure", "have_matplotlib", "histogram_figure", "histograms",
           "sweep_figure", "sweep_plot"]
