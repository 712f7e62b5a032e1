"""``napo analyze``: a Markdown report with tables and PNG figures for a dataset and, optionally, a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from napo.analysis.margins import (
    TERM_COLUMNS,
    margins,
    noise_label_sources,
    noise_ranking,
    read_noise_labels,
    summarize,
)
from napo.analysis.plots import plot_margin_hist, plot_q_curve, plot_training_curves

__all__ = ["analyze", "markdown_table"]


def markdown_table(frame, digits: int = 4) -> str:
    """A DataFrame as a GitHub Markdown table (floats to ``digits`` significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def analyze(
    data: str | Path,
    output: str | Path,
    *,
    model: Any = None,
    run: str | Path | None = None,
    noise_labels: Any = None,
    top: int = 10,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> Path:
    """Writes ``report.md``, ``margins.csv`` and the figures under ``output``; returns the report's path.

    Without reference columns in ``data`` the ``model`` scores them first (``napo logps``, into
    ``output/reference-logps``) and the report shows the data's own margins under it; with them, a
    given ``model`` is scored as the policy (reward margins against the cached reference); with neither
    a model nor the columns, the data's own margins are not defined and this raises.
    """
    from napo.analysis.margins import _as_frame
    from napo.train.collator import reference_columns
    from napo.train.reference import DEFAULT_MAX_LENGTH, cached_settings

    output = Path(output)
    # Every input is checked before anything is written: a refused run leaves no partial report behind.
    frame = _as_frame(data)
    answers = [c for c in ("chosen", "rejected", "question_only", "image_only") if c in frame.columns]
    cached = all(n in frame.columns for c in answers for n in reference_columns(c))
    if not cached and model is None:
        raise ValueError("the data has no reference log-prob columns: pass --model to score them (napo logps)")
    training_figure = plot_training_curves(run) if run is not None else None
    if noise_labels is not None:
        for source in noise_label_sources(noise_labels, TERM_COLUMNS).values():
            read_noise_labels(source, frame)
    output.mkdir(parents=True, exist_ok=True)
    policy = model
    if not cached:
        from napo.train.reference import compute_reference_logps

        options = {"batch_size": batch_size, "device": device, "dtype": dtype, "progress": progress}
        summary = compute_reference_logps(model, data, output / "reference-logps", columns=answers, **options)
        frame, policy = _as_frame(summary.output_dir), None
    settings = cached_settings(data) if cached else None  # score a policy truncated as the reference was
    max_length = settings.get("max_length", DEFAULT_MAX_LENGTH) if settings else DEFAULT_MAX_LENGTH
    table = margins(frame, policy, noise_labels=noise_labels, batch_size=batch_size, max_length=max_length,
                    device=device, dtype=dtype, progress=progress)  # fmt: skip
    table.to_csv(output / "margins.csv", index=False)
    figures = {
        "margin_hist.png": plot_margin_hist(table),
        "length_margin_hist.png": plot_margin_hist(table, kind="length_margin"),
        "q_curve.png": plot_q_curve(table),
    }
    if training_figure is not None:
        figures["training_curves.png"] = training_figure
    for name, figure in figures.items():
        figure.savefig(output / name, dpi=110)

    source = "the policy model scored against the cached reference" if policy is not None else "the reference model"
    lines = [
        "# NaPO margin report",
        "",
        f"Data: `{data}` ({frame.shape[0]} rows). Margins under {source}"
        + (f" (`{model}`)." if model is not None else " (cached `ref_*` columns)."),
        "A margin is log p(chosen) - log p(answer): negative where the model prefers the other answer.",
        "",
        "## Summary",
        "",
        markdown_table(summarize(table)),
        "",
        "## Margins (the paper's Figure 4) and length margins (Table 7)",
        "",
        "![margins](margin_hist.png)",
        "",
        "![length margins](length_margin_hist.png)",
        "",
        "## q (Eq. 12) against the batch-mean margin and against gamma",
        "",
        "![q](q_curve.png)",
        "",
    ]
    if run is not None:
        lines += ["## Training run", "", f"Run: `{run}`.", "", "![training curves](training_curves.png)", ""]
    lines += ["## The pairs NaPO treats as most likely noisy", ""]
    for term in [t for t in ("language", "vision", "original") if t in set(table["term"])]:
        ranked = noise_ranking(table, term, top=top)
        keep = [c for c in ("rank", "idx", "noise", "logp_margin", "avg_logp_margin", "reward_margin",
                            "length_margin", "napo_weight") if c in ranked.columns]  # fmt: skip
        lines += [f"### {term} (lowest margins first)", "", markdown_table(ranked[keep]), ""]
    lines += ["Full table: `margins.csv` (one row per data row and term).", ""]
    report = output / "report.md"
    report.write_text("\n".join(lines))
    return report
