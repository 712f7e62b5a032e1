"""The before/after figure of ``napo eval``: built without pyplot, like :mod:`napo.analysis.plots`, so it
saves headless and shows inline in a notebook."""

from __future__ import annotations

from collections.abc import Sequence


def plot_comparison(metrics, benchmarks: Sequence[str] | None = None, keys: dict[str, Sequence[str]] | None = None):
    """Grouped bars: one panel per benchmark, one group per metric, one bar per model (e.g. before and after
    NaPO training).

    Args:
        metrics: the long table of :func:`napo.eval.evaluate` (``EvalResult.metrics``): model, benchmark,
            metric, value.
        benchmarks: which panels (default: every benchmark in the table).
        keys: {benchmark: metrics to show}; default: each benchmark's headline metrics that some model has.
    Returns:
        A ``matplotlib.figure.Figure``.
    """
    import numpy as np

    from napo.analysis.plots import figure_row
    from napo.eval.registry import benchmark_classes

    registry = benchmark_classes()
    benchmarks = list(benchmarks or dict.fromkeys(metrics["benchmark"]))
    if not benchmarks:
        raise ValueError("no metrics to plot")
    figure, axes = figure_row(len(benchmarks), width=4.6)
    models = list(dict.fromkeys(metrics["model"]))
    width = 0.8 / max(len(models), 1)
    for axis, name in zip(axes, benchmarks, strict=True):
        chosen = metrics[metrics["benchmark"] == name]
        default = [key for key, _, _ in registry[name].headline] if name in registry else []
        wanted = list((keys or {}).get(name, default)) or list(dict.fromkeys(chosen["metric"]))
        if name not in (keys or {}):  # a headline metric no model has (e.g. shapes without its VLind kind): no slot
            present = set(chosen["metric"])
            wanted = [key for key in wanted if key in present]
        positions = np.arange(len(wanted))
        for offset, model in enumerate(models):
            values = chosen[chosen["model"] == model].set_index("metric")["value"]
            heights = [float(values.get(key, np.nan)) for key in wanted]
            axis.bar(positions + offset * width - 0.4 + width / 2, heights, width, label=model)
        finite = [v for v in chosen["value"] if np.isfinite(v)]
        if finite and min(finite) >= 0:  # rates and scores: bars start at 0, and all-zero bars still show a scale
            axis.set_ylim(0, max(max(finite) * 1.1, 1.0))
        axis.set_xticks(positions, wanted, rotation=30, ha="right")
        axis.set_title(name)
        axis.legend(fontsize="small")
    return figure
