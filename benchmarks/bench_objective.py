"""Benchmark: one NaPO objective step (forward + backward), napo vs the alternatives, in one run.

Compared on the same inputs and machine:
  napo-native     NaPOObjective on napo's C kernels (CUDA kernels on a GPU)
  napo-compiled   the same under torch.compile(fullgraph=True) (inductor)
  napo-reference  the same module on napo's pure-PyTorch kernels (NAPO_BACKEND=reference, a subprocess)
  paper-style     a plain-torch objective written the way the paper's code does it: q and the
                  weights pulled to the host with .item() every step

Reports the median time per step with the interquartile range, the ratio to napo-native and, on
CUDA, the peak memory. Appends one CSV row per measurement to benchmarks/results/objective_step.csv (device,
versions) and prints a Markdown table for benchmarks/RESULTS.md.

Run: python benchmarks/bench_objective.py [--device cpu|cuda] [--batch-sizes 4 64 4096] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results_csv import append_rows, default_path

ANSWERS = ("chosen", "rejected", "language", "vision")
HERE = Path(__file__).parent


def make_inputs(batch: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    out = {}
    for answer in ANSWERS:
        length = torch.randint(8, 200, (batch,), generator=generator).float()
        for model in ("policy", "reference"):
            logps = -length * torch.rand(batch, generator=generator)
            out[f"{model}_{answer}_logps"] = logps.to(device)
            out[f"{model}_{answer}_avg_logps"] = (logps / length).to(device)
    return out


def napo_step(objective, inputs):
    out = objective(**inputs)
    out.loss.backward()
    return out.loss


def paper_style_step(inputs, beta: float = 0.1):
    """Eq. 14 as the reference code computes it: Python floats for q and the weights."""

    def margin(rejected: str, kind: str = "") -> torch.Tensor:
        return (inputs[f"policy_chosen{kind}_logps"] - inputs[f"reference_chosen{kind}_logps"]) - (
            inputs[f"policy_{rejected}{kind}_logps"] - inputs[f"reference_{rejected}{kind}_logps"]
        )

    m_o, m_l, m_v = margin("rejected"), margin("language"), margin("vision")
    q_l = min(max(2 * (1 - torch.sigmoid(0.5 * margin("language", "_avg").mean()).item()), 0.001), 1.0)
    q_v = min(max(2 * (1 - torch.sigmoid(0.01 * m_v.mean()).item()), 0.001), 1.0)
    r = [beta * m.mean().item() for m in (m_o, m_l, m_v)]
    total = sum(r)
    w = [1 / 3] * 3 if total <= 1e-8 else [min(max(x / total, 0.01), 1.0) for x in r]
    loss = (
        w[0] * -F.logsigmoid(beta * m_o)
        + w[1] * (1 - torch.sigmoid(beta * m_l) ** q_l) / q_l
        + w[2] * (1 - torch.sigmoid(beta * m_v) ** q_v) / q_v
    ).mean()
    loss.backward()
    return loss


def time_step(step, inputs, device: str, repeats: int) -> tuple[list[float], int]:
    for value in inputs.values():
        value.requires_grad_(False)
    for key, value in inputs.items():
        if key.startswith("policy"):
            value.requires_grad_(True)
    for _ in range(10):
        step(inputs)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        for value in inputs.values():
            value.grad = None
        start = time.perf_counter()
        step(inputs)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else -1
    return times, peak


def measure(variant: str, batch: int, device: str, repeats: int) -> dict:
    import napo

    inputs = make_inputs(batch, device)
    if variant == "paper-style":
        times, peak = time_step(paper_style_step, inputs, device, repeats)
    else:
        objective = napo.NaPOObjective()
        if variant == "napo-compiled":
            objective = torch.compile(objective, fullgraph=True, dynamic=False)
        times, peak = time_step(lambda x: napo_step(objective, x), inputs, device, repeats)
    q1, median, q3 = statistics.quantiles(times, n=4)
    return {"variant": variant, "batch": batch, "median_us": median * 1e6, "iqr_us": (q3 - q1) * 1e6,
            "peak_bytes": peak}  # fmt: skip


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return (
        f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 64, 4096])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--csv", type=Path, default=default_path("objective_step"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one measurement in a subprocess (used for NAPO_BACKEND=reference)
        print(json.dumps(measure(args.child, args.batch_sizes[0], args.device, args.repeats)))
        return

    import napo

    rows = []
    for batch in args.batch_sizes:
        rows.append(measure("napo-native", batch, args.device, args.repeats))
        child = subprocess.run(
            [sys.executable, __file__, "--child", "napo-reference", "--device", args.device,
             "--batch-sizes", str(batch), "--repeats", str(args.repeats)],
            env={**os.environ, "NAPO_BACKEND": "reference"}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = json.loads(child.stdout.strip().splitlines()[-1])
        row["variant"] = "napo-reference"
        rows.append(row)
        rows.append(measure("napo-compiled", batch, args.device, args.repeats))
        rows.append(measure("paper-style", batch, args.device, args.repeats))

    name = device_name(args.device)
    append_rows(
        args.csv,
        ["benchmark", "device", "napo", "torch", "variant", "batch", "median_us", "iqr_us", "peak_bytes"],
        [["objective_step", name, napo.__version__, torch.__version__, row["variant"], row["batch"],
          f"{row['median_us']:.1f}", f"{row['iqr_us']:.1f}", row["peak_bytes"]] for row in rows],
    )  # fmt: skip

    print(f"NaPO objective step (forward + backward), {name}, torch {torch.__version__}, napo {napo.__version__}\n")
    print("| batch | variant | median µs (IQR) | time / napo-native | peak memory / napo-native |")
    print("|---:|---|---:|---:|---:|")
    for row in rows:
        native = next(r for r in rows if r["batch"] == row["batch"] and r["variant"] == "napo-native")
        memory = f"{row['peak_bytes'] / native['peak_bytes']:.2f}" if native["peak_bytes"] > 0 else "n/a (CPU)"
        print(f"| {row['batch']} | {row['variant']} | {row['median_us']:.1f} ({row['iqr_us']:.1f}) | "
              f"{row['median_us'] / native['median_us']:.2f} | {memory} |")  # fmt: skip


if __name__ == "__main__":
    main()
