"""Margin analysis for notebooks and reports: margins and the q they induce, per term, as tables and figures.

``margins`` builds the table (from cached reference columns, or scoring a model), ``summarize`` and
``noise_ranking`` condense it, ``plot_margin_hist`` / ``plot_q_curve`` / ``plot_training_curves`` draw
it (matplotlib figures, no display needed), and ``analyze`` writes all of it as a Markdown report
(``napo analyze``). Needs pandas and matplotlib (``pip install 'napo[analysis]'``).
"""

from napo.analysis.margins import TERM_COLUMNS, margins, noise_ranking, q_at, read_noise_labels, summarize
from napo.analysis.plots import load_log_history, plot_margin_hist, plot_q_curve, plot_training_curves
from napo.analysis.report import analyze, markdown_table

__all__ = [
    "TERM_COLUMNS",
    "analyze",
    "load_log_history",
    "margins",
    "markdown_table",
    "noise_ranking",
    "plot_margin_hist",
    "plot_q_curve",
    "plot_training_curves",
    "q_at",
    "read_noise_labels",
    "summarize",
]
