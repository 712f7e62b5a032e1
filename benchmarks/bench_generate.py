"""Benchmark: rows/s of napo generate, batched vs one row at a time (the reference code's way).

Same tiny LLaVA (built offline), same sample rows, same settings (greedy beam search, num_beams=3);
each row gets both biased answers (question_only and image_only). Batched runs use napo's
generate_biased (left padding, length grouping); the one-at-a-time baseline is generate_biased
with batch_size=1. Medians over repeats; rows appended to benchmarks/results/generate.csv.

Run: python benchmarks/bench_generate.py [--rows 48] [--max-new-tokens 32] [--device cpu|cuda] [--dtype ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from results_csv import append_rows, default_path

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--csv", type=Path, default=default_path("generate"))
    args = parser.parse_args()

    import napo
    from napo.data import generate_biased, load_model, make_sample_data, make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="napo-bench-generate-"))
    model_dir = make_tiny_model(work / "tiny")
    data = make_sample_data(work / "sample.parquet", rows=args.rows)
    loaded = load_model(model_dir, device=args.device, dtype=args.dtype)
    results = {}
    for batch_size in args.batch_sizes:
        rates = []
        for repeat in range(args.repeats):
            summary = generate_biased(
                model_dir, data, work / f"out-{batch_size}-{repeat}", batch_size=batch_size,
                max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, loaded=loaded, progress=False,
            )  # fmt: skip
            rates.append(summary.rows_per_second)
        results[batch_size] = (statistics.median(rates), min(rates), max(rates))

    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        f"CPU {platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
    )  # fmt: skip
    append_rows(
        args.csv,
        ["benchmark", "device", "napo", "torch", "variant", "batch", "rows_per_s", "min", "max"],
        [["generate", device, napo.__version__, torch.__version__, "tiny-llava", batch_size, f"{median:.2f}",
          f"{low:.2f}", f"{high:.2f}"] for batch_size, (median, low, high) in results.items()],
    )  # fmt: skip
    base = results[args.batch_sizes[0]][0]
    print(f"napo generate on the tiny LLaVA, {args.rows} rows, max_new_tokens={args.max_new_tokens}, "
          f"num_beams={args.num_beams}, {device}, torch {torch.__version__}\n")  # fmt: skip
    print("| batch size | rows/s (min-max) | speed-up vs batch 1 |")
    print("|---:|---:|---:|")
    for batch_size, (median, low, high) in results.items():
        print(f"| {batch_size} | {median:.2f} ({low:.2f}-{high:.2f}) | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
