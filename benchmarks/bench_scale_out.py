"""Benchmark: training steps under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2, two CPU processes (gloo).

Per engine, three variants, each a fresh ``torch.distributed.run`` of two processes:
  napo-fused   NaPOTrainer, paper objective, napo's fused LM head (the [B, T, V] logits never formed:
               the head raises if asked for them, as in tests/test_scale_out.py)
  napo-logits  the same through the model's own logits and napo's token kernel (the fallback the
               fused head replaces; forced as tests/scale_out_worker.py forces it)
  trl-dpo      TRL's DPOTrainer (loss_type="sigmoid") under the same engine: the baseline

Per process, napo scores 2 rows x [chosen; rejected; question_only; image_only] = 8 sequences per step,
TRL 4 rows x [chosen; rejected] = 8 sequences. The model is the tiny LLaVA with a real-sized vocabulary
(32000 by default) and a 256-wide text tower (bench_train_step.py's), float32. Every variant computes the
reference log-probs with a reference model in the step, prepared by the engine as TRL prepares it (TRL does so
for vision data; ``napo train`` would cache them first instead and hold no reference model).

The engines are the ones the tests use (tests/scale_out_worker.py): its engine settings, and its lift of
accelerate 1.15's restriction that otherwise runs FSDP settings on CPU processes as plain DDP.

Measured in each process from Trainer callbacks: the step time (on_step_begin to on_step_end: forward, backward,
gradient reduction, optimizer step), the median over the steps after the warm-up ones (min-max in brackets); the
peak resident set during training (VmHWM, reset before the first step, warm-up included, so that the optimizer
state the first step allocates counts) and that peak minus the resident set before the first step ("extra").
The table shows rank 0's step times and the larger of the two ranks' memory figures. Rows are appended to
results/scale_out.csv.

Run: DS_ACCELERATOR=cpu python benchmarks/bench_scale_out.py [--steps 6] [--warmup 2] [--engines ddp zero3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_csv import append_rows, default_path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the test worker's engine settings, reused as they are

ENGINES = {"ddp": "plain", "zero2": "zero2", "zero3": "zero3", "fsdp2": "fsdp2"}  # name here: the worker's name
VARIANTS = ("napo-fused", "napo-logits", "trl-dpo")
ROWS_PER_PROCESS = {"napo-fused": 2, "napo-logits": 2, "trl-dpo": 4}  # 8 sequences per process each


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def trl_rows(records: list[dict]) -> list[dict]:
    """TRL's conversational vision format for the same questions and answers."""
    return [
        {
            "image": r["image"],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}],
        }
        for r in records
    ]


def child(engine: str, variant: str, model_dir: str, steps: int, output: Path) -> None:
    """One process of a two-process run; writes ``output/rank<r>.json``."""
    import torch
    from bench_train_step import rows
    from datasets import Dataset
    from scale_out_worker import engine_settings, forbid_logits, fsdp_on_cpu_processes, head_layout
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from napo.train import lm_head
    from napo.train.trainer import NaPOConfig, NaPOTrainer

    torch.set_num_threads(1)  # two processes on two cores
    if engine == "fsdp2":
        fsdp_on_cpu_processes()
    if variant == "napo-logits":
        lm_head._fused_head_applies = lambda model: False  # the model's own logits, then napo's token kernel

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.baseline = 0
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                with open("/proc/self/clear_refs", "w") as handle:  # VmHWM back to the current RSS
                    handle.write("5")
                self.baseline = status_bytes("VmRSS")
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    batch_rows = ROWS_PER_PROCESS[variant]
    records = rows(2 * batch_rows * steps)
    processor = AutoProcessor.from_pretrained(model_dir)
    policy = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    meter = Meter()
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_rows, learning_rate=1e-6,
                      seed=3, bf16=False, use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
                      logging_steps=steps, dataloader_pin_memory=False, **engine_settings(ENGINES[engine]))  # fmt: skip
        if variant == "trl-dpo":
            dataset = Dataset.from_list(trl_rows(records))
            trainer = DPOTrainer(model=policy, ref_model=reference, args=DPOConfig(**common), train_dataset=dataset,
                                 processing_class=processor, callbacks=[meter])  # fmt: skip
        else:
            dataset = Dataset.from_list(records)
            trainer = NaPOTrainer(model=policy, ref_model=reference, args=NaPOConfig(**common), train_dataset=dataset,
                                  processing_class=processor, callbacks=[meter])  # fmt: skip
            if variant == "napo-fused":
                forbid_logits(trainer.accelerator.unwrap_model(trainer.model))
        trainer.train()
        peak = status_bytes("VmHWM")
        result = {"rank": trainer.accelerator.process_index, "processes": trainer.accelerator.num_processes,
                  "head": head_layout(trainer), "times": meter.times, "baseline": meter.baseline, "peak": peak,
                  "sequences": batch_rows * (2 if variant == "trl-dpo" else 4)}  # fmt: skip
        (output / f"rank{result['rank']}.json").write_text(json.dumps(result))
        trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(engine: str, variant: str, model_dir: Path, steps: int, output: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--child", engine, variant, "--model-dir", str(model_dir), "--steps", str(steps),
               "--output", str(output)]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"{engine} {variant} failed:\n{done.stderr[-6000:]}")
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(2)]


def summarize(engine: str, variant: str, ranks: list[dict], warmup: int) -> dict:
    timed = ranks[0]["times"][warmup:]
    mib = 2**20
    return {
        "engine": engine,
        "variant": variant,
        "head": ranks[0]["head"],
        "sequences": ranks[0]["sequences"],
        "steps": len(timed),
        "median_ms": 1e3 * statistics.median(timed),
        "min_ms": 1e3 * min(timed),
        "max_ms": 1e3 * max(timed),
        "peak_mib": max(r["peak"] for r in ranks) / mib,
        "extra_mib": max(r["peak"] - r["baseline"] for r in ranks) / mib,
        "peak_per_rank_mib": [round(r["peak"] / mib) for r in ranks],
        "extra_per_rank_mib": [round((r["peak"] - r["baseline"]) / mib) for r in ranks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the step times")
    parser.add_argument("--csv", type=Path, default=default_path("scale_out"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.model_dir, args.steps, args.output)
        return
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no step after --warmup {args.warmup}")

    import accelerate
    import deepspeed
    import torch
    import transformers
    import trl
    from bench_train_step import build_model

    import napo

    name = f"CPU x86_64 x{os.cpu_count()}, 2 processes x 1 torch thread, gloo"
    versions = (f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}, TRL {trl.__version__}, "
                f"accelerate {accelerate.__version__}, transformers {transformers.__version__}, "
                f"napo {napo.__version__}")  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), args.vocab, args.hidden)
        for engine in args.engines:
            for variant in args.variants:
                output = Path(tmp) / f"{engine}-{variant}"
                output.mkdir()
                began = time.monotonic()
                ranks = launch(engine, variant, model_dir, args.steps, output)
                results.append(summarize(engine, variant, ranks, args.warmup))
                print(f"{engine} {variant}: {time.monotonic() - began:.0f} s, {json.dumps(results[-1])}",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"Training steps under each engine, 2 processes, tiny LLaVA with V={args.vocab}, H={args.hidden}, "
          f"float32, {args.steps - args.warmup} timed steps after {args.warmup} warm-up; {name}; "
          f"{versions}\n")  # fmt: skip
    columns = ["engine", "variant", "seqs/process", "step ms median [min-max]", "peak MiB/process",
               "extra MiB/process", "time vs trl-dpo", "extra memory vs trl-dpo"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    baseline = {r["engine"]: r for r in results if r["variant"] == "trl-dpo"}
    for r in results:
        trl_run = baseline.get(r["engine"])
        time_ratio = f"{r['median_ms'] / trl_run['median_ms']:.2f}" if trl_run else "n/a"
        memory_ratio = f"{r['extra_mib'] / trl_run['extra_mib']:.2f}" if trl_run and trl_run["extra_mib"] > 0 else "n/a"
        print(f"| {r['engine']} | {r['variant']} | {r['sequences']} | {r['median_ms']:.0f} "
              f"[{r['min_ms']:.0f}-{r['max_ms']:.0f}] | {r['peak_mib']:.0f} | {r['extra_mib']:.0f} | {time_ratio} | "
              f"{memory_ratio} |")  # fmt: skip
    append_rows(
        args.csv,
        ["benchmark", "device", "napo", "torch", "deepspeed", "trl", "accelerate", "engine", "variant", "case",
         "median_us", "min_us", "max_us", "peak_bytes", "extra_bytes"],
        [["scale_out", name, napo.__version__, torch.__version__, deepspeed.__version__, trl.__version__,
          accelerate.__version__, r["engine"], r["variant"],
          f"V={args.vocab} H={args.hidden} seqs/process={r['sequences']} timed_steps={r['steps']} head={r['head']}",
          f"{1e3 * r['median_ms']:.0f}", f"{1e3 * r['min_ms']:.0f}", f"{1e3 * r['max_ms']:.0f}",
          int(r["peak_mib"] * 2**20), int(r["extra_mib"] * 2**20)] for r in results],
    )  # fmt: skip


if __name__ == "__main__":
    main()
