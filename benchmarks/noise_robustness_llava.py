"""A controlled experiment on a real (tiny) vision-language model: DPO vs NaPO under flipped pairs.

The task has a known truth: each prompt is a drawn shape and a colour question; the chosen answer
names the true colour, the rejected one another colour in the same sentence ("The circle in the
image is red."). With --task image only the image tells them apart; with --task text the question
names the colour, an easier task the tiny model learns fully. A fraction p of the training pairs
is flipped. The tiny random LLaVA (napo's offline model) is trained with NaPOTrainer, one term,
from the same initial weights, on the same pairs, for the same steps and seeds: DPO (q = 0), NaPO
with fixed q, and NaPO with adaptive q (logp margin). The score is preference accuracy on clean
held-out pairs: the share where the trained policy's reward margin (Eq. 2, against the initial
model) is positive.

Run (the two tasks in RESULTS.md; --plot names the figure):
  python benchmarks/noise_robustness_llava.py --task text --train 256 --epochs 10
  python benchmarks/noise_robustness_llava.py --task image --train 384 --epochs 10
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
NOISE_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4)
METHODS = {
    "DPO (q=0)": {"original_loss": "dpo"},
    "NaPO q=0.3": {"original_loss": "napo", "original_q": "0.3"},
    "NaPO q=0.7": {"original_loss": "napo", "original_q": "0.7"},
    "NaPO adaptive (gamma=0.05, logp)": {"original_loss": "napo", "original_q": "adaptive", "original_gamma": 0.05},
}


def make_pairs(count: int, seed: int, task: str = "image") -> list[dict]:
    """RLAIF-V-style rows: with task "image" only the image decides the preference; with task "text" the
    question names the colour ("The red circle: what colour is it?"), so the text alone decides it."""
    import io

    from napo.data.sample import COLORS, SHAPES, draw_image

    rng = random.Random(seed)
    rows = []
    for index in range(count):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        wrong = rng.choice([c for c in COLORS if c != color])
        buffer = io.BytesIO()
        draw_image(shape, color, rng).save(buffer, format="PNG")
        rows.append({
            "idx": index,
            "image": {"bytes": buffer.getvalue(), "path": None},
            "question": f"The {color} {shape}: what color is it?" if task == "text" else
                        f"What color is the {shape} in the image?",
            "chosen": f"The {shape} in the image is {color}.",
            "rejected": f"The {shape} in the image is {wrong}.",
        })  # fmt: skip
    return rows


def flip(rows: list[dict], p: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    flipped = [dict(r) for r in rows]
    for row in rng.sample(flipped, round(p * len(flipped))):
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    return flipped


def held_out_accuracy(policy, reference, processor, rows: list[dict], batch_size: int = 16) -> float:
    from napo.models.loading import decode_image
    from napo.train.collator import NaPOVisionCollator
    from napo.train.lm_head import add_napo_lm_head
    from napo.train.reference import score_examples

    collator = NaPOVisionCollator(processor=processor, columns=("chosen", "rejected"))
    correct = 0
    for model in (policy, reference):
        add_napo_lm_head(model)
        model.eval()
    for start in range(0, len(rows), batch_size):
        examples = [dict(r, image=decode_image(r["image"])) for r in rows[start : start + batch_size]]
        pi, ref = score_examples(policy, collator, examples), score_examples(reference, collator, examples)
        margin = (pi["chosen"].logps - ref["chosen"].logps) - (pi["rejected"].logps - ref["rejected"].logps)
        correct += int((margin > 0).sum())
    return correct / len(rows)


def train_once(model_dir: Path, rows: list[dict], options: dict, args, seed: int, out: Path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from napo.train.trainer import NaPOConfig, NaPOTrainer

    config = NaPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=args.lr, beta=args.beta, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        gradient_checkpointing=False, dataloader_pin_memory=False, disable_tqdm=True, seed=seed,
        precompute_ref_log_probs=True, lr_scheduler_type="constant", logging_steps=10_000, **options,
    )  # fmt: skip
    torch.manual_seed(seed)
    policy = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    trainer = NaPOTrainer(model=policy, args=config, train_dataset=Dataset.from_list(rows), processing_class=processor)
    trainer.train()
    return trainer.model, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--task", choices=["image", "text"], default="image", help="what decides the truth")
    parser.add_argument("--train", type=int, default=96, help="training pairs")
    parser.add_argument("--test", type=int, default=192, help="held-out pairs")
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--noise", type=float, nargs="*", default=list(NOISE_LEVELS))
    parser.add_argument("--plot", default=str(HERE / "noise_robustness_llava.png"), help="empty: no plot")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from napo.data import make_tiny_model

    hf_logging.set_verbosity_error()
    results: dict[str, dict[float, list[float]]] = {m: {p: [] for p in args.noise} for m in METHODS}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            model_dir = make_tiny_model(Path(tmp) / f"model-{seed}", seed=seed)
            train_rows = make_pairs(args.train, seed=1000 + seed, task=args.task)
            test_rows = make_pairs(args.test, seed=2000 + seed, task=args.task)
            reference = AutoModelForImageTextToText.from_pretrained(model_dir)
            for p in args.noise:
                noisy = flip(train_rows, p, seed=3000 + seed)
                for method, options in METHODS.items():
                    policy, processor = train_once(model_dir, noisy, options, args, seed, Path(tmp) / "run")
                    accuracy = held_out_accuracy(policy, reference, processor, test_rows)
                    results[method][p].append(accuracy)
                    print(f"seed {seed} p={p:.1f} {method:<34} held-out accuracy {accuracy:.3f} "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip

    header = "| method | " + " | ".join(f"p = {p:.1f}" for p in args.noise) + " |"
    print(f"\n{header}\n|---|" + "---:|" * len(args.noise))
    for method, by_p in results.items():
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}" for v in by_p.values()]
        print(f"| {method} | " + " | ".join(cells) + " |")
    if args.plot:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 4), layout="constrained")
        axis = figure.subplots()
        for method, by_p in results.items():
            means = [statistics.mean(v) for v in by_p.values()]
            spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in by_p.values()]
            axis.errorbar(list(by_p), means, yerr=spreads, label=method, capsize=3, marker="o")
        axis.set_xlabel("fraction of flipped training pairs p")
        axis.set_ylabel("held-out preference accuracy")
        axis.set_title(f"tiny LLaVA, colour questions decided by the {args.task}")
        axis.legend(fontsize="small")
        figure.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
