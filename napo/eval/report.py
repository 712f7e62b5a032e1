"""The files ``napo eval`` writes: per-benchmark JSON and CSV, and the Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from napo.analysis.report import code_span, escape_markdown, markdown_table
from napo.eval.benchmark import Benchmark


def _decoding_text(decoding: dict) -> str:
    if not decoding:
        return "unknown"
    mode = "greedy" if not decoding.get("do_sample") else f"sampling at temperature {decoding.get('temperature')}"
    text = f"{mode}, {decoding.get('num_beams')} beam(s), max {decoding.get('max_new_tokens')} new tokens"
    return text + ("" if decoding.get("prompt_format", "template") == "template" else f", {decoding['prompt_format']}")


def _run_record(answers, metrics: dict) -> dict:
    return {
        "metrics": metrics,
        "items": answers.total,
        "answered": len(answers.frame),
        "skipped": len(answers.errors),
        "complete": answers.complete,
        "decoding": answers.decoding,
        "model": answers.manifest.get("model"),
        "answers": str(answers.directory),
    }


def write_benchmark_files(output: Path, benchmark: Benchmark, runs: dict, items: dict) -> None:
    """``<benchmark>/metrics.json``, ``metrics.csv`` and ``items-<model>.csv`` for every model run on it."""
    import pandas as pd

    mine = {tag: run for (tag, name), run in runs.items() if name == benchmark.name}
    if not mine:
        return
    folder = output / benchmark.name
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": benchmark.name,
        "title": benchmark.title,
        "notes": benchmark.notes(),
        "models": {tag: _run_record(answers, metrics) for tag, (answers, metrics) in mine.items()},
    }
    (folder / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
    rows = [
        {
            "model": tag,
            "metric": key,
            "value": value,
            "items": answers.total,
            "answered": len(answers.frame),
            "decoding": _decoding_text(answers.decoding),
            "note": " ".join(benchmark.notes()),
        }
        for tag, (answers, metrics) in mine.items()
        for key, value in metrics.items()
    ]
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    for tag in mine:
        items[(tag, benchmark.name)].to_csv(folder / f"items-{tag}.csv", index=False)


def write_report(output: Path, benchmarks: list[Benchmark], runs: dict, table: Any, metrics: Any) -> Path:
    """``report.md`` (and ``comparison.png`` when there is anything to plot); returns the report's path."""
    from napo.eval.plots import plot_comparison

    lines = [
        "# napo eval",
        "",
        "## The models side by side",
        "",
        "Headline metrics per benchmark (the paper's Table 1 layout); the arrow says which way is better.",
        "Ratios are fractions (the papers print them times 100).",
        "",
        markdown_table(table),
        "",
    ]
    if len(metrics):
        figure = plot_comparison(metrics)
        figure.savefig(output / "comparison.png", dpi=110)
        lines += ["![comparison](comparison.png)", ""]
    for benchmark in benchmarks:
        mine = {tag: run for (tag, name), run in runs.items() if name == benchmark.name}
        if not mine:
            continue
        lines += [f"## {escape_markdown(benchmark.title)}", ""]
        lines += [escape_markdown(note, line_start=True) for note in benchmark.notes()]
        lines += [""] if benchmark.notes() else []
        counts = [
            {
                "model": tag,
                "items": answers.total,
                "answered": len(answers.frame),
                "skipped": len(answers.errors),
                "decoding": _decoding_text(answers.decoding),
            }
            for tag, (answers, _) in mine.items()
        ]
        import pandas as pd

        lines += [markdown_table(pd.DataFrame(counts)), ""]
        incomplete = [tag for tag, (answers, _) in mine.items() if not answers.complete]
        if incomplete:
            lines += [
                f"Incomplete (other shards still running, or stopped): {', '.join(map(escape_markdown, incomplete))}; "
                "the metrics cover the answered items only.",
                "",
            ]
        keys = list(dict.fromkeys(k for _, m in mine.values() for k in m))
        frame = pd.DataFrame(
            {"metric": keys, **{tag: [m.get(k, float("nan")) for k in keys] for tag, (_, m) in mine.items()}}
        )
        files = ", ".join(map(code_span, ("metrics.json", "metrics.csv", "items-<model>.csv")))
        folder = code_span(benchmark.name + "/")
        lines += [markdown_table(frame, code=("metric",)), "", f"Files in {folder}: {files}.", ""]
    report = output / "report.md"
    report.write_text("\n".join(lines))
    return report
