"""Figures of margins, q and training curves. Each function returns a ``matplotlib.figure.Figure``
built without pyplot, so nothing depends on a display or a backend: ``fig.savefig("x.png")`` works
headless, and a notebook shows the returned figure inline."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napo.analysis.margins import DEFAULT_TERMS, TERM_COLUMNS, margin_column_of, q_at

__all__ = ["load_log_history", "plot_margin_hist", "plot_q_curve", "plot_training_curves"]

_NOISE_COLORS = {"clean": "#1f77b4", "noisy": "#d62728"}


def _png(figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _show_in_notebooks(figure_type: type) -> None:
    """In IPython, displays a pyplot-free figure as PNG (inline backends register this only for pyplot's)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    if shell is None:
        return
    formatter = shell.display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(figure_type)
    except KeyError:
        formatter.for_type(figure_type, _png)


def figure_row(columns: int, width: float = 4.2, height: float = 3.4):
    """A figure of ``columns`` axes side by side, shown inline in notebooks (the analysis and eval plots' layout)."""
    from matplotlib.figure import Figure

    _show_in_notebooks(Figure)
    figure = Figure(figsize=(width * columns, height), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def plot_margin_hist(frame, kind: str = "auto", terms: Sequence[str] | None = None, bins: int = 30):
    """Histograms of one margin per term (the paper's Figure 4), split by noise label when the frame has one.

    Args:
        frame: :func:`napo.analysis.margins` output.
        kind: ``"auto"`` (each term's q margin: avg-logp for language, logp for the others; the reward margin
            when a policy was scored), or a column: ``logp_margin``, ``avg_logp_margin``, ``length_margin``,
            ``reward_margin``, ``avg_reward_margin``.
        terms: which terms (default: all in the frame).
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    terms = list(terms or dict.fromkeys(frame["term"]))
    if not terms:
        raise ValueError("the frame has no rows")
    figure, axes = figure_row(len(terms))
    for axis, term in zip(axes, terms, strict=True):
        rows = frame[frame["term"] == term]
        column = margin_column_of(rows, DEFAULT_TERMS[term]) if kind == "auto" else kind
        if column not in rows.columns:
            raise ValueError(f"the frame has no {column!r} column")
        finite = np.isfinite(rows[column].to_numpy(float))
        dropped = int((~finite).sum())
        rows = rows[finite]  # NaN / inf margins (a diverged run) are counted in the title, not binned
        values = rows[column].to_numpy(float)
        edges = np.histogram_bin_edges(values, bins=bins) if len(values) else bins
        if "noise" in rows.columns:
            for label, group in rows.groupby("noise"):
                axis.hist(group[column], bins=edges, alpha=0.6, label=f"{label} ({len(group)})",
                          color=_NOISE_COLORS.get(label))  # fmt: skip
            axis.legend()
        else:
            axis.hist(values, bins=edges, alpha=0.8, color=_NOISE_COLORS["clean"])
        axis.axvline(0.0, color="black", linewidth=0.8)
        title = f"{term}: chosen vs {TERM_COLUMNS.get(term, term)}"
        axis.set_title(title + (f" ({dropped} non-finite left out)" if dropped else ""))
        axis.set_xlabel(column.replace("_", " "))
        axis.set_ylabel("pairs")
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no tick at 1.75 pairs
    return figure


def plot_q_curve(frame=None, gammas: Sequence[float] = (0.01, 0.05, 0.1, 0.5, 1.0), q_min: float = 0.001,
                 margin_range: tuple[float, float] = (-20.0, 60.0)):  # fmt: skip
    """Eq. 12 drawn two ways: q against the batch-mean margin for several gamma; and, with a
    :func:`napo.analysis.margins` frame, q against gamma at each term's mean margin (its own kind)."""
    import numpy as np

    figure, axes = figure_row(2 if frame is not None else 1)
    grid = np.linspace(*margin_range, 400)
    for gamma in gammas:
        axes[0].plot(grid, q_at(grid, gamma, q_min), label=f"gamma {gamma:g}")
    axes[0].set_xlabel("batch-mean margin M")
    axes[0].set_ylabel("q")
    axes[0].set_title("q = clip(2(1 - sigmoid(gamma M)), q_min, 1)")
    axes[0].legend()
    if frame is not None:
        gamma_grid = np.logspace(-3, 1, 200)
        for term in dict.fromkeys(frame["term"]):
            rows = frame[frame["term"] == term]
            column = margin_column_of(rows, DEFAULT_TERMS[term])
            mean = float(rows[column].mean())
            axes[1].plot(gamma_grid, q_at(mean, gamma_grid, q_min), label=f"{term} (mean {column} {mean:.3g})")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("gamma")
        axes[1].set_ylabel("q")
        axes[1].set_title("q at this data's mean margins")
        axes[1].legend(fontsize="small")
    return figure


def load_log_history(source: Any) -> list[dict]:
    """A Trainer's log history from: a list of dicts, a Trainer, a ``trainer_state.json``, or a run directory
    (its ``trainer_state.json``, else the newest ``checkpoint-N``'s)."""
    if isinstance(source, list):
        return source
    if hasattr(source, "state") and hasattr(source.state, "log_history"):
        return list(source.state.log_history)
    path = Path(source)
    if path.is_dir():
        candidates = [path / "trainer_state.json"]
        checkpoints = [p for p in path.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
        candidates += [p / "trainer_state.json" for p in sorted(checkpoints, key=lambda p: -int(p.name[11:]))]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no trainer_state.json in {path} or its checkpoints")
        path = found
    return json.loads(path.read_text())["log_history"]


def plot_training_curves(source: Any):
    """q, the weights and the mean reward margins of each term against the step (the paper's Figure 7
    for one gamma), from a run's log history (see :func:`load_log_history`)."""
    history = [entry for entry in load_log_history(source) if any(k.startswith("napo/q_") for k in entry)]
    if not history:
        raise ValueError("the log history has no napo/* metrics (was it a NaPOTrainer run with logging?)")
    logged = {k.removeprefix("napo/q_") for k in history[0] if k.startswith("napo/q_")}
    terms = [t for t in TERM_COLUMNS if t in logged] + sorted(logged - set(TERM_COLUMNS))
    figure, axes = figure_row(3)
    steps = [entry.get("step", index + 1) for index, entry in enumerate(history)]
    for axis, (kind, label) in zip(axes, (("q", "q"), ("weight", "weight"), ("margin", "mean reward margin beta*M")),
                                   strict=True):  # fmt: skip
        for term in terms:
            axis.plot(steps, [entry.get(f"napo/{kind}_{term}", float("nan")) for entry in history], label=term)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.set_title(label)
        axis.legend()
    return figure
