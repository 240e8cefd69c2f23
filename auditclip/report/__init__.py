"""Reports people look at, written from what a command computed (never by reading the run again).

* :mod:`auditclip.report.writer`: :class:`Report`, the output folder (CSVs, errors.csv, the file list);
* :mod:`auditclip.report.summary`: ``summary.md``, one screen per section;
* :mod:`auditclip.report.pictures`: the PNG pictures (matplotlib);
* :mod:`auditclip.report.html`: ``report.html``, one self-contained file;
* :mod:`auditclip.report.tensorboard`: TensorBoard event files (histograms and scalars per step).
"""
