"""Benchmark: one training step of NaPOTrainer against TRL's DPOTrainer, same model, same sequences per step.

Variants (each computes the reference log-probs with a reference model in the step, as TRL does for
vision data):
  trl-dpo        TRL's DPOTrainer, loss_type="sigmoid": 4 rows x [chosen; rejected] = 8 sequences
  napo-as-dpo    NaPOTrainer with one DPO term: the same 8 sequences (isolates napo's log-prob path)
  napo-3way      NaPOTrainer, paper objective: 2 rows x [chosen; rejected; question_only; image_only] = 8 sequences

The model is the tiny LLaVA's architecture with a real-sized vocabulary (32000 by default) and a
wider text tower, so that the LM head and log-probs weigh as they do in practice. The biased
answers are other rows' rejected answers, so every variant sees the same length distribution.

A step is forward + backward + AdamW update, after warm-up; times are medians (IQR) over repeats.
Each variant runs in a fresh subprocess; extra peak memory is the peak resident set size during
the timed steps (VmHWM, reset just before) minus the resident size before them (CPU), or the peak
CUDA allocation minus the allocation before them (GPU). Rows are appended to results/train_step.csv.

Run: python benchmarks/bench_train_step.py [--device cpu|cuda] [--vocab 32000] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
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
VARIANTS = ("trl-dpo", "napo-as-dpo", "napo-3way")


def build_model(directory: Path, vocab: int, hidden: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from napo.data import make_tiny_model

    tiny = make_tiny_model(directory / "tiny")
    config = AutoConfig.from_pretrained(tiny)
    config.text_config.vocab_size = vocab
    config.text_config.hidden_size = hidden
    config.text_config.intermediate_size = 2 * hidden
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    path = directory / "bench-model"
    model.save_pretrained(path)
    AutoProcessor.from_pretrained(tiny).save_pretrained(path)
    return path


def rows(count: int) -> list[dict]:
    import io

    import pandas as pd
    from PIL import Image

    from napo.data import make_sample_data

    with tempfile.TemporaryDirectory() as tmp:
        frame = pd.read_parquet(make_sample_data(Path(tmp) / "s.parquet", rows=count, seed=1))
    records = frame.to_dict("records")
    out = []
    for i, row in enumerate(records):
        out.append({
            "image": Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"),
            "question": row["question"],
            "chosen": row["chosen"],
            "rejected": row["rejected"],
            "question_only": records[(i + 1) % len(records)]["rejected"],
            "image_only": records[(i + 2) % len(records)]["rejected"],
        })  # fmt: skip
    return out


def child(variant: str, model_dir: str, device: str, repeats: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from napo.train.trainer import NaPOConfig, NaPOTrainer

    def rss_bytes(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    torch.set_num_threads(os.cpu_count() or 1)
    data = rows(8)
    three_way = variant == "napo-3way"
    batch_rows = 2 if three_way else 4
    examples = data[:batch_rows]
    if not three_way:
        examples = [{k: v for k, v in r.items() if k not in ("question_only", "image_only")} for r in examples]
    dataset = Dataset.from_list([{k: v for k, v in r.items() if k != "image"} | {"image": r["image"]} for r in data])
    if not three_way:
        dataset = dataset.remove_columns(["question_only", "image_only"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    common = dict(per_device_train_batch_size=batch_rows, bf16=False, use_cpu=device == "cpu", report_to="none",
                  gradient_checkpointing=False, save_strategy="no", dataloader_pin_memory=False)  # fmt: skip
    processor = AutoProcessor.from_pretrained(model_dir)
    policy = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    reference = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    with tempfile.TemporaryDirectory() as out:
        if variant == "trl-dpo":
            # TRL's vision collator wants TRL-format rows: a conversational prompt from the question.
            for r in examples:
                r["prompt"] = [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.pop("question")}]}
                ]
                r["chosen"] = [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}]
                r["rejected"] = [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}]
            trainer = DPOTrainer(model=policy, ref_model=reference, args=DPOConfig(out, **common),
                                 train_dataset=dataset, processing_class=processor)  # fmt: skip
        else:
            options = {} if three_way else {"original_loss": "dpo"}
            trainer = NaPOTrainer(model=policy, ref_model=reference, args=NaPOConfig(out, **common, **options),
                                  train_dataset=dataset, processing_class=processor)  # fmt: skip
        batch = trainer._prepare_inputs(trainer.data_collator(copy.deepcopy(examples)))
        sequences, tokens = int(batch["input_ids"].shape[0]), int(batch["attention_mask"].sum())
        model = trainer.model
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step() -> None:
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS
                handle.write("5")
            base = rss_bytes("VmRSS")
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        extra = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")) - base
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"variant": variant, "sequences": sequences, "tokens": tokens, "median_ms": 1e3 * statistics.median(times),
            "iqr_ms": 1e3 * (quartiles[2] - quartiles[0]), "extra_mib": extra / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--csv", type=Path, default=default_path("train_step"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.device, args.repeats)))
        return

    import torch
    from bench_logps import device_name

    import napo

    name = device_name(args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), args.vocab, args.hidden)
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--child", variant, "--model-dir", str(model_dir),
                       "--device", args.device, "--repeats", str(args.repeats)]  # fmt: skip
            env = {**os.environ, "TQDM_DISABLE": "1"}
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    dpo = results[0]
    print(f"Training step (forward + backward + AdamW), tiny LLaVA with V={args.vocab}, H={args.hidden}, {name}, "
          f"torch {torch.__version__}, napo {napo.__version__}\n")  # fmt: skip
    columns = ["variant", "sequences", "tokens", "step ms (median, IQR)", "time vs trl-dpo", "extra peak MiB",
               "memory vs trl-dpo"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        memory_ratio = r["extra_mib"] / dpo["extra_mib"] if dpo["extra_mib"] > 0 else float("nan")
        print(f"| {r['variant']} | {r['sequences']} | {r['tokens']} | {r['median_ms']:.1f} ({r['iqr_ms']:.1f}) | "
              f"{r['median_ms'] / dpo['median_ms']:.2f} | {r['extra_mib']:.0f} | {memory_ratio:.2f} |")  # fmt: skip
    append_rows(
        args.csv,
        ["benchmark", "device", "napo", "torch", "variant", "case", "median_us", "iqr_us", "peak_bytes"],
        [["train_step", name, napo.__version__, torch.__version__, r["variant"],
          f"V={args.vocab} H={args.hidden} seqs={r['sequences']} tokens={r['tokens']}", f"{1e3 * r['median_ms']:.1f}",
          f"{1e3 * r['iqr_ms']:.1f}", int(r["extra_mib"] * 2**20)] for r in results],
    )  # fmt: skip


if __name__ == "__main__":
    main()
