"""Benchmark: per-sequence log-probs (sum over answer tokens), napo vs the alternatives, in one run.

Variants, all computing TRL's quantity (causal shift, masked sum over answer tokens, float32 result):
  torch-recipe       log_softmax + gather + masked sum (TRL's get_batch_logps)
  trl-selective      TRL's selective_log_softmax + masked sum (when trl is installed)
  napo               napo.sequence_logps
  napo-inplace       napo.sequence_logps(inplace_backward=True)
and for the LM head fused in (hidden [B, T, H] @ weight[V, H].T):
  unfused-torch      matmul, then the torch recipe
  unfused-napo       matmul, then napo.sequence_logps
  napo-fused         napo.fused_linear_sequence_logps

Each (variant, case) runs in a fresh subprocess: extra peak memory is the peak resident set size
(CPU: VmHWM, reset just before) or the peak CUDA allocation during one forward + backward, minus
what the process held right before; times are medians (with IQR) of forward, backward and
forward + backward after a warm-up.
Labels: 25% prompt tokens (ignore_index), then answer tokens, then 0-64 padding tokens.
Rows are appended to benchmarks/results/logps.csv; a Markdown table is printed for RESULTS.md.

On a GPU it also prints the forward's achieved read bandwidth against the device's copy bandwidth.

Run: python benchmarks/bench_logps.py [--device cpu|cuda] [--quick]
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
from results_csv import append_rows, default_path

HERE = Path(__file__).parent
IGNORE = -100


def make_labels(batch: int, time_: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, time_), generator=generator)
    labels[:, : time_ // 4] = IGNORE  # the prompt
    for row in range(batch):
        padding = int(torch.randint(0, 65, (1,), generator=generator))
        if padding:
            labels[row, -padding:] = IGNORE
    return labels


def torch_recipe(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = labels[:, 1:].clone()
    mask = labels != IGNORE
    labels[~mask] = 0
    per_token = torch.gather(logits[:, :-1].float().log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1)


def trl_selective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from trl.trainer.utils import selective_log_softmax

    labels = labels[:, 1:].clone()
    mask = labels != IGNORE
    labels[~mask] = 0
    return (selective_log_softmax(logits[:, :-1], labels) * mask).sum(-1)


def run_variant(variant: str, case: dict, device: str) -> dict:
    import napo

    generator = torch.Generator().manual_seed(0)
    batch, time_, vocab, dtype = case["batch"], case["time"], case["vocab"], getattr(torch, case["dtype"])
    labels = make_labels(batch, time_, vocab, generator).to(device)
    if "hidden" in case:
        width = case["hidden"]
        hidden0 = torch.randn(batch, time_, width, generator=generator).to(device, dtype)
        weight0 = (torch.randn(vocab, width, generator=generator) / width**0.5).to(device, dtype)

        def inputs():
            return hidden0.detach().requires_grad_(True), weight0.detach().requires_grad_(True)

        def forward(tensors):
            hidden, weight = tensors
            if variant == "napo-fused":
                return napo.fused_linear_sequence_logps(hidden, weight, labels)[0]
            logits = hidden @ weight.t()
            return (
                torch_recipe(logits, labels) if variant == "unfused-torch" else napo.sequence_logps(logits, labels)[0]
            )
    else:
        logits0 = torch.randn(batch, time_, vocab, generator=generator).to(device, dtype)
        head_bias = torch.zeros(vocab, device=device, dtype=dtype, requires_grad=True)

        def inputs():
            # Fresh logits each run (in-place mode overwrites them), made before timing starts. They are a
            # non-leaf, as an LM head's output is: their gradient flows on (here to a bias) and is not
            # kept as a .grad, which is what lets the in-place mode save the [B, T, V] allocation.
            return (logits0 + head_bias,)

        def forward(tensors):
            (logits,) = tensors
            if variant == "torch-recipe":
                return torch_recipe(logits, labels)
            if variant == "trl-selective":
                return trl_selective(logits, labels)
            return napo.sequence_logps(logits, labels, inplace_backward=variant == "napo-inplace")[0]

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def rss_bytes(field: str) -> int:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def reset_peak_rss() -> None:
        # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one.
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    # One-time process costs (torch imports torch._dynamo on a custom op's first call) stay out of
    # the measurement: one tiny call first.
    tiny = torch.zeros(1, 2, 3, device=device, requires_grad=True)
    napo.sequence_logps(tiny, torch.zeros(1, 2, dtype=torch.long, device=device))[0].sum().backward()

    # Memory: the first full-size forward + backward of this process.
    tensors = inputs()
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes("VmRSS")
    forward(tensors).sum().backward()
    sync()
    extra = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss_bytes("VmHWM")) - base
    del tensors

    fwd, bwd, total = [], [], []
    for _ in range(case["repeats"]):
        tensors = inputs()
        sync()
        start = time.perf_counter()
        out = forward(tensors)
        sync()
        middle = time.perf_counter()
        out.sum().backward()
        sync()
        end = time.perf_counter()
        fwd.append(middle - start)
        bwd.append(end - middle)
        total.append(end - start)
        del tensors, out

    def summary(values):
        if len(values) < 2:
            return values[0] * 1e3, 0.0
        q1, median, q3 = (
            statistics.quantiles(values, n=4)
            if len(values) >= 4
            else (min(values), statistics.median(values), max(values))
        )
        return median * 1e3, (q3 - q1) * 1e3

    # What the forward must read: the logits of the counted positions (the others are never touched).
    counted = int((labels[:, 1:] != IGNORE).sum())
    bytes_read = counted * vocab * torch.tensor([], dtype=dtype).element_size()
    return {"variant": variant, **case, "fwd_ms": summary(fwd), "bwd_ms": summary(bwd), "total_ms": summary(total),
            "extra_peak_mib": extra / 2**20, "forward_bytes": bytes_read}  # fmt: skip


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * source.numel() * 4 / (start.elapsed_time(end) / 1e3)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no V=128256 case")
    parser.add_argument("--csv", type=Path, default=default_path("logps"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        variant, case = json.loads(args.child)
        print(json.dumps(run_variant(variant, case, args.device)))
        return

    import napo

    try:
        import trl  # noqa: F401

        logits_variants = ["torch-recipe", "trl-selective", "napo", "napo-inplace"]
    except ImportError:
        logits_variants = ["torch-recipe", "napo", "napo-inplace"]
    repeats = 3 if args.quick else 7
    cases = []
    for dtype in ("float32", "bfloat16"):
        cases.append(({"batch": 4, "time": 512, "vocab": 32000, "dtype": dtype, "repeats": repeats}, logits_variants))
    if not args.quick:
        for dtype in ("float32", "bfloat16"):
            big = {"batch": 4, "time": 512, "vocab": 128256, "dtype": dtype, "repeats": 3}
            cases.append((big, logits_variants))
    fused = {"batch": 4, "time": 512, "vocab": 32000, "hidden": 1024, "dtype": "float32", "repeats": 3}
    cases.append((fused, ["unfused-torch", "unfused-napo", "napo-fused"]))

    rows = []
    for case, variants in cases:
        for variant in variants:
            child = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--child", json.dumps([variant, case])],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            row = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {variant:14s} {case} total {row['total_ms'][0]:.1f} ms, extra {row['extra_peak_mib']:.0f} MiB",
                  file=sys.stderr)  # fmt: skip

    name = device_name(args.device)
    append_rows(
        args.csv,
        ["benchmark", "device", "napo", "torch", "variant", "batch", "time", "vocab", "hidden", "dtype", "fwd_ms",
         "bwd_ms", "total_ms", "total_iqr_ms", "extra_peak_mib"],
        [["logps", name, napo.__version__, torch.__version__, r["variant"], r["batch"], r["time"], r["vocab"],
          r.get("hidden", ""), r["dtype"], f"{r['fwd_ms'][0]:.1f}", f"{r['bwd_ms'][0]:.1f}",
          f"{r['total_ms'][0]:.1f}", f"{r['total_ms'][1]:.1f}", f"{r['extra_peak_mib']:.1f}"] for r in rows],
    )  # fmt: skip

    print(f"Sequence log-probs, forward + backward, {name}, torch {torch.__version__}, napo {napo.__version__}\n")
    print("| case | variant | fwd ms | bwd ms | fwd+bwd ms (IQR) | time ratio | extra peak MiB | memory ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for case, _ in cases:
        group = [
            r for r in rows if all(r.get(k) == v for k, v in case.items()) and ("hidden" in r) == ("hidden" in case)
        ]
        base = group[0]  # the torch recipe / the unfused torch path
        label = (
            f"B={case['batch']} T={case['time']} V={case['vocab']}"
            + (f" H={case['hidden']}" if "hidden" in case else "")
            + f" {case['dtype']}"
        )
        for r in group:
            time_ratio = r["total_ms"][0] / base["total_ms"][0]
            memory_ratio = r["extra_peak_mib"] / max(base["extra_peak_mib"], 1e-9)
            print(f"| {label} | {r['variant']} | {r['fwd_ms'][0]:.1f} | {r['bwd_ms'][0]:.1f} | "
                  f"{r['total_ms'][0]:.1f} ({r['total_ms'][1]:.1f}) | {time_ratio:.2f} | "
                  f"{r['extra_peak_mib']:.0f} | {memory_ratio:.2f} |")  # fmt: skip
    print_bandwidth(rows, args.device)


def print_bandwidth(rows: list[dict], device: str) -> None:
    """On a GPU: the forward's achieved read bandwidth against the device's copy bandwidth."""
    if not device.startswith("cuda"):
        return
    copy = copy_bandwidth(device)
    print(f"\nDevice copy bandwidth: {copy / 1e9:.0f} GB/s (read + write).")
    for r in rows:
        if r["variant"] == "napo" and "hidden" not in r:
            achieved = r["forward_bytes"] / (r["fwd_ms"][0] / 1e3)
            print(
                f"napo forward, V={r['vocab']} {r['dtype']}: {achieved / 1e9:.0f} GB/s = {achieved / copy:.0%} of copy"
            )


if __name__ == "__main__":
    main()
