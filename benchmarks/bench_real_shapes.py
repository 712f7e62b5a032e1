"""Benchmark: one NaPO training step at LLaVA-1.5-7B's widths against TRL DPOTrainer's step, same model and rows.

The model is ``LlavaForConditionalGeneration`` with llava-1.5-7b's widths (text: hidden 4096, intermediate
11008, 32 heads, vocabulary 32064; vision: CLIP ViT-L/14 at 336 px, hidden 1024, intermediate 4096, 16
heads, 576 image positions; the 2-layer GELU projector) but ``--layers`` layers in each tower, random
weights. The rows are one image, a question and answers of 100-300 tokens (each sequence ~0.7-0.9k tokens).

Variants (each with a reference model whose forward is part of the step, as TRL does for vision data):
  trl-dpo      TRL's DPOTrainer (sigmoid loss): [chosen; rejected] per row
  napo-as-dpo  NaPOTrainer with the DPO term only: the same 2 sequences per row
  napo-3way    NaPOTrainer, the paper's objective: [chosen; rejected; question_only; image_only] per row

A step is forward + backward of the loss (no optimizer: its state is the same for all variants, see
docs/scaling.md). Each variant runs in a fresh subprocess; the extra peak is the peak resident set size
during the timed steps (VmHWM, reset just before) minus the resident size before them (CPU), or the peak
CUDA allocation minus the allocation before them (GPU). Run with ``--layers 1`` and ``--layers 2`` (the
default runs both): the difference is the cost of one layer of each tower, for extrapolating to 32.

Run: python benchmarks/bench_real_shapes.py [--device cpu|cuda] [--layers 1 2] [--rows 1] [--repeats 1]
CPU at these widths: ~4 GiB of weights (policy + reference, float32) plus the step; keep --rows 1.
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

HERE = Path(__file__).parent
VARIANTS = ("trl-dpo", "napo-as-dpo", "napo-3way")
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14,
              projection_dim=768)  # fmt: skip


def build(directory: Path, layers: int) -> Path:
    """A llava-1.5-7b-wide model with ``layers`` layers per tower, and a processor at 336 px (576 positions)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from napo.data.tiny import build_processor

    processor = build_processor()
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    processor.patch_size = 14
    tokenizer = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, num_hidden_layers=layers),
        text_config=LlamaConfig(**TEXT, num_hidden_layers=layers, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    path = directory / f"llava-7b-wide-{layers}"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def answer(tokenizer, tokens: int, seed: int) -> str:
    """A plain answer of exactly ``tokens`` tokens with the model's tokenizer."""
    import random

    words = ["the", "red", "circle", "is", "left", "of", "a", "blue", "square", "and", "there", "are", "two", "cats"]
    rng = random.Random(seed)
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += " " + " ".join(rng.choice(words) for _ in range(8))
    ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids).strip()


def rows(tokenizer, count: int) -> list[dict]:
    from PIL import Image

    lengths = (300, 100, 200, 250, 150)  # answers of 100-300 tokens, as RLAIF-V's
    out = []
    for i in range(count):
        pick = [lengths[(i + k) % len(lengths)] for k in range(4)]
        out.append({
            "image": Image.new("RGB", (400, 300), (20 * i % 255, 120, 200)),
            "question": "Describe the picture in detail: which shapes are there, what colors, and where?",
            "chosen": answer(tokenizer, pick[0], 4 * i),
            "rejected": answer(tokenizer, pick[1], 4 * i + 1),
            "question_only": answer(tokenizer, pick[2], 4 * i + 2),
            "image_only": answer(tokenizer, pick[3], 4 * i + 3),
        })  # fmt: skip
    return out


def child(variant: str, model_dir: str, device: str, repeats: int, count: int) -> dict:
    import copy

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
    processor = AutoProcessor.from_pretrained(model_dir)
    examples = rows(processor.tokenizer, count)
    three_way = variant == "napo-3way"
    if not three_way:
        examples = [{k: v for k, v in r.items() if k not in ("question_only", "image_only")} for r in examples]
    dataset = Dataset.from_list(examples)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    common = dict(per_device_train_batch_size=count, bf16=device == "cuda", use_cpu=device == "cpu",
                  report_to="none", gradient_checkpointing=False, save_strategy="no", max_length=2048,
                  dataloader_pin_memory=False)  # fmt: skip
    policy = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    reference = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    with tempfile.TemporaryDirectory() as out:
        if variant == "trl-dpo":
            for r in examples:  # TRL's vision collator wants a conversational prompt
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

        def step() -> None:
            trainer.compute_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)

        if device == "cuda":  # a warm-up step: kernels, allocator
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:  # no warm-up step on CPU (minutes at these widths); the weights are paged in, not counted
            with torch.no_grad():
                for module in (model, trainer.ref_model):
                    for parameter in module.parameters():
                        parameter.sum()
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
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")
    return {"variant": variant, "sequences": sequences, "tokens": tokens, "seconds": statistics.median(times),
            "extra_gib": (peak - base) / 2**30, "peak_gib": peak / 2**30}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=1, help="preference rows per step")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.device, args.repeats, args.rows)))
        return

    import torch

    import napo

    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            model_dir = build(Path(tmp), layers)
            results[layers] = {}
            for variant in args.variants:
                command = [sys.executable, __file__, "--child", variant, "--model-dir", str(model_dir), "--device",
                           args.device, "--repeats", str(args.repeats), "--rows", str(args.rows)]  # fmt: skip
                env = {**os.environ, "TQDM_DISABLE": "1"}
                done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
                if done.returncode != 0:
                    raise SystemExit(f"{variant} ({layers} layers) failed:\n{done.stderr[-4000:]}")
                results[layers][variant] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"  {layers} layer(s) {variant}: {results[layers][variant]}", file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} threads)"
    print(f"One step at llava-1.5-7b widths, {args.rows} row(s), {device}, torch {torch.__version__}, "
          f"napo {napo.__version__}\n")  # fmt: skip
    print("| layers | variant | sequences | tokens | step s | time vs trl-dpo | extra peak GiB | memory vs trl-dpo |")
    print("|---|---|---|---|---|---|---|---|")
    for layers, by_variant in results.items():
        dpo = by_variant.get("trl-dpo")
        for r in by_variant.values():
            time_ratio = r["seconds"] / dpo["seconds"] if dpo else float("nan")
            memory_ratio = r["extra_gib"] / dpo["extra_gib"] if dpo and dpo["extra_gib"] > 0 else float("nan")
            print(f"| {layers} | {r['variant']} | {r['sequences']} | {r['tokens']} | {r['seconds']:.2f} | "
                  f"{time_ratio:.2f} | {r['extra_gib']:.2f} | {memory_ratio:.2f} |")  # fmt: skip
    if len(results) >= 2:
        low, high = min(results), max(results)
        print(f"\nPer layer of each tower ({low} -> {high} layers):\n")
        print("| variant | step s per layer | extra peak GiB per layer | 32 layers: step s | 32 layers: extra GiB |")
        print("|---|---|---|---|---|")
        for variant in results[low]:
            a, b = results[low][variant], results[high][variant]
            seconds = (b["seconds"] - a["seconds"]) / (high - low)
            memory = (b["extra_gib"] - a["extra_gib"]) / (high - low)
            print(f"| {variant} | {seconds:.2f} | {memory:.3f} | {a['seconds'] + (32 - low) * seconds:.1f} | "
                  f"{a['extra_gib'] + (32 - low) * memory:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
