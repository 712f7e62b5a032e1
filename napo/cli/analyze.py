"""``napo analyze``: margins, q and noise of a dataset and a run, as a Markdown report."""

from __future__ import annotations

import argparse
import sys

from napo.cli.args import add_image_argument, error, output_dir, positive_int


def add_parser(commands) -> None:
    analyze = commands.add_parser(
        "analyze", help="a Markdown report (tables + PNG figures) of margins, q and noise for a dataset and a run"
    )
    analyze.add_argument("--data", required=True, help="napo generate / napo logps output")
    analyze.add_argument(
        "--output", required=True, type=output_dir, help="where report.md, margins.csv and the figures go"
    )
    analyze.add_argument("--model", default=None, help="scores the reference columns if missing, else the policy")
    analyze.add_argument("--run", default=None, help="a napo train output directory or trainer_state.json")
    analyze.add_argument("--noise-labels", default=None, help="a column of the data, or a CSV/JSON/Parquet file")
    analyze.add_argument("--top", type=positive_int, default=10, help="rows per noise ranking")
    analyze.add_argument("--batch-size", type=positive_int, default=8)
    analyze.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    analyze.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    analyze.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_image_argument(analyze)


def run_analyze(args: argparse.Namespace) -> int:
    try:
        from napo.analysis import analyze
    except ImportError as problem:
        print(f"napo analyze: error: {problem} (pip install 'napo[analysis]')", file=sys.stderr)
        return 2
    try:
        report = analyze(
            args.data,
            args.output,
            model=args.model,
            run=args.run,
            noise_labels=args.noise_labels,
            top=args.top,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
            allow_outside_images=args.allow_outside_images,
        )
    except (ValueError, OSError, KeyError) as problem:
        return error("analyze", problem)
    print(f"napo analyze: report written to {report}")
    return 0


COMMANDS = {"analyze": run_analyze}
