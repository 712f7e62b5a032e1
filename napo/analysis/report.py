"""``napo analyze``: a Markdown report with tables and PNG figures for a dataset and, optionally, a run."""

from __future__ import annotations

import math
import numbers
import re
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

__all__ = ["analyze", "code_span", "escape_markdown", "markdown_table"]

# Line breaks end a table row or a paragraph; the other control characters have no business in a report.
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# What CommonMark and GitHub read as markup inside a line, and nothing else: code spans, emphasis and
# strikethrough, links and images (an escaped "[" opens neither), raw HTML and autolinks ("<" before a tag
# or a scheme), entities, GitHub's math, an underscore at the edge of a word (inside one it is literal)
# and a backslash that would escape what follows it. "dpo-run" and "greedy, 1 beam(s)" stay as they are.
_INLINE_MARKUP = re.compile(
    r"[`*~\[$]|<(?=[A-Za-z/!?])|&(?=#?[0-9A-Za-z]+;)|(?<![^\W_])_|_(?![^\W_])|\\(?=[!-/:-@\[-`{-~])"
)
# What opens a block at the start of a line: a heading, quote, list item, table row or setext underline.
_BLOCK_START = re.compile(r"[#>+=|-]|\d{1,9}(?=[.)])")


def escape_markdown(value: Any, *, line_start: bool = False) -> str:
    """``value`` as literal text on one line of Markdown: line breaks become spaces and only what would
    be read as markup there is backslash-escaped, so data can open no link, image, HTML tag or emphasis.
    ``line_start``: the text begins a line of its own (a paragraph), where a block marker is markup too.
    A table cell also needs its ``|`` escaped (``markdown_table`` does it)."""
    text = _INLINE_MARKUP.sub(lambda match: "\\" + match.group(), _BREAKS.sub(" ", str(value)))
    if line_start:
        text = text.lstrip()  # leading spaces do not show in a paragraph, and four of them start a code block
        block = _BLOCK_START.match(text)
        if block:
            text = f"{text[: block.end()]}\\{text[block.end() :]}" if block.group()[0].isdigit() else f"\\{text}"
    return text


def code_span(value: Any, *, table_cell: bool = False) -> str:
    """``value`` (a file name, a setting) as an inline code span on one line: nothing inside one is
    interpreted but a run of backticks as long as its fence (so the fence is made longer than any run in
    the text) and, in a GitHub table, ``|`` (escaped there)."""
    text = _BREAKS.sub(" ", str(value))
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    # A space pads each side where the text begins or ends with a backtick, or with a space on both sides
    # (a code span drops one from each side then): only there.
    padded = text.startswith("`") or text.endswith("`") or (text[:1] == text[-1:] == " " and text.strip())
    text = f" {text} " if padded else text
    return fence + (text.replace("|", "\\|") if table_cell else text) + fence


def markdown_table(frame, digits: int = 4, code: tuple[str, ...] = ()) -> str:
    """A DataFrame as a GitHub Markdown table (floats to ``digits`` significant digits). Every other cell
    and every header is escaped (idx values and labels come from the user's data); the cells of the
    ``code`` columns are code spans."""

    def cell(value: Any, column: str = "") -> str:
        if column in code:
            return code_span(value, table_cell=True)
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
            value = float(value)
            return "nan" if math.isnan(value) else f"{value:.{digits}g}"
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return str(int(value))
        return escape_markdown(value).replace("|", "\\|")

    header = "| " + " | ".join(map(cell, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(map(cell, row, frame.columns)) + " |" for row in frame.itertuples(index=False)]
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
    allow_outside_images: bool = False,
) -> Path:
    """Writes ``report.md``, ``margins.csv`` and the figures under ``output``; returns the report's path.

    Without reference columns in ``data`` the ``model`` scores them first (``napo logps``, into
    ``output/reference-logps``) and the report shows the data's own margins under it; with them, a
    given ``model`` is scored as the policy (reward margins against the cached reference); with neither
    a model nor the columns, the data's own margins are not defined and this raises.
    """
    from napo.analysis.margins import as_frame
    from napo.data.inputs import check_int, check_output_dir
    from napo.train.collator import reference_columns
    from napo.train.reference import DEFAULT_MAX_LENGTH, cached_settings

    check_int("top", top, 1)
    check_int("batch_size", batch_size, 1)
    check_output_dir(output)
    output = Path(output)
    # Every input is checked before anything is written: a refused run leaves no partial report behind.
    frame = as_frame(data)
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

        options = {"batch_size": batch_size, "device": device, "dtype": dtype, "progress": progress,
                   "allow_outside_images": allow_outside_images}  # fmt: skip
        summary = compute_reference_logps(model, data, output / "reference-logps", columns=answers, **options)
        frame, policy = as_frame(summary.output_dir), None
    settings = cached_settings(data) if cached else None  # score a policy truncated as the reference was
    max_length = settings.get("max_length", DEFAULT_MAX_LENGTH) if settings else DEFAULT_MAX_LENGTH
    prompt_format = settings.get("prompt_format", "template") if settings else "template"
    table = margins(frame, policy, noise_labels=noise_labels, batch_size=batch_size, max_length=max_length,
                    device=device, dtype=dtype, progress=progress, allow_outside_images=allow_outside_images,
                    prompt_format=prompt_format)  # fmt: skip
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
        f"Data: {code_span(data)} ({frame.shape[0]} rows). Margins under {source}"
        + (f" ({code_span(model)})." if model is not None else " (cached `ref_*` columns)."),
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
        lines += ["## Training run", "", f"Run: {code_span(run)}.", "", "![training curves](training_curves.png)", ""]
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
