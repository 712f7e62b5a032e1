"""Noise robustness on the pretrained tiny LLaVA: DPO vs NaPO on RLAIF-V-Bias rows with a known share of noise.

The initial model is napo's tiny LLaVA pretrained on the sample world (:mod:`napo.data.world`), whose language
prior makes it answer "red" to colour questions about non-red shapes. Training rows are sample-set rows
(``make_sample_data``: colour and shape questions, chosen = what the image shows, rejected = the prior's answer),
completed with the pretrained model's own biased answers (``generate_biased``: ``question_only`` = language-biased,
``image_only`` = vision-biased), with two kinds of noise:

1. **Unbiased biased answers** (the paper's noise): a biased answer as good as the chosen one. Set by choosing
   how many training rows show a red shape (``--red-shares``; "natural" = the sample set's own draw, about one in
   six), since this model's language-biased answers always name red. Measured, not assumed, from the generated
   answers: a biased answer counts as "as good as chosen" when its first colour word is the chosen answer's and
   it names the same shapes in the same order (``first_color`` / ``shape_mentions``, the world's grammar). The
   same measure is reported for the vision-biased answers, whose share is the model's, not set.
2. **Flipped original pairs**: a share ``--flips`` of the rows has chosen and rejected swapped (texts and cached
   reference log-probs), the same rows in the same order at every level of a seed (the 0.2 rows are the first
   half of the 0.4 rows). The swapped chosen is the winner of the row's language and vision pairs too, as it would
   be in RLAIF-V-Bias built from a mislabelled RLAIF-V row.

Methods (same pretrained model, same rows, same steps, same seed per run): DPO on the original pairs; NaPO with a
fixed q on them; NaPO with adaptive q on them (logp margin, gamma 0.01); the paper's three-term objective (DPO
original + adaptive NaPO language and vision, dynamic weights); the same three terms all with DPO loss (q = 0).
Outcomes: the shapes benchmark (``color_accuracy``, ``blank_prior_rate``, ``CHAIRs``, ``CHAIRi``, ``recall``) and
held-out preference accuracy on clean rows of another seed: the share of rows whose reward margin against the
pretrained reference (Eq. 2, logp) is positive, chosen vs rejected, and chosen vs question_only on the rows whose
question_only answer is not as good as chosen (via :func:`napo.analysis.margins.margins`).

Two controls, not run by default, take the dynamic weights out: the two three-term objectives with every weight 1.

Run (the RESULTS.md section; the pretrained model is built once into --cache, 5 minutes on a busy machine):
  python benchmarks/noise_world.py --seeds 5
  python benchmarks/noise_world.py --seeds 5 --levels natural:0 natural:0.4 --plot "" \
      --methods "3-term NaPO, weights 1" "3-term DPO, weights 1"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import time
from pathlib import Path

from results_csv import append_rows, default_path

HERE = Path(__file__).parent
ORIGINAL_ONLY = {"language_loss": "none", "vision_loss": "none"}
ALL_DPO = {"original_loss": "dpo", "language_loss": "dpo", "vision_loss": "dpo"}
METHODS = {
    "DPO": {"original_loss": "dpo", **ORIGINAL_ONLY},
    "NaPO q=0.5": {"original_loss": "napo", "original_q": "0.5", **ORIGINAL_ONLY},
    "NaPO adaptive": {"original_loss": "napo", "original_q": "adaptive", **ORIGINAL_ONLY},
    "3-term NaPO (paper)": {"original_loss": "dpo"},  # language / vision: NaPOConfig's defaults, the paper's
    "3-term DPO": ALL_DPO,
    # Controls, not run by default: the two three-term objectives without the dynamic weights (every weight 1).
    "3-term NaPO, weights 1": {"original_loss": "dpo", "napo_weights": "none"},
    "3-term DPO, weights 1": {**ALL_DPO, "napo_weights": "none"},
}
DEFAULT_METHODS = tuple(METHODS)[:5]
LEVELS = ("natural:0", "natural:0.2", "natural:0.4", "0.5:0", "0.5:0.4")
BENCH_METRICS = ("color_accuracy", "blank_prior_rate", "CHAIRs", "CHAIRi", "recall")
ANSWERS = ["chosen", "rejected", "question_only", "image_only"]


def as_good_as_chosen(answer: str, chosen: str) -> bool:
    """The noise label of a biased answer: it names the chosen answer's colour first and the same shapes."""
    from napo.data.grammar import first_color, shape_mentions

    return first_color(answer) == first_color(chosen) and shape_mentions(answer) == shape_mentions(chosen)


def read_table(path: Path):
    from napo.data.store import parquet_dataset

    return parquet_dataset(path).to_table().sort_by("idx")


def select_rows(path: Path, rows: int, seed: int, red_share: float | None) -> Path:
    """``rows`` sample-set rows: the first ones of ``make_sample_data(seed)`` ("natural"), or, for a red share, the
    first red-drawn and first other rows of a larger draw of the same seed, in their drawn order."""
    import pyarrow.parquet as pq

    from napo.data import make_sample_data
    from napo.data.grammar import first_color

    if red_share is None:
        return make_sample_data(path, rows, seed=seed)
    pool = pq.read_table(make_sample_data(path.with_name("pool.parquet"), rows * 12, seed=seed))
    red = [i for i, chosen in enumerate(pool.column("chosen").to_pylist()) if first_color(chosen) == "red"]
    other = [i for i in range(pool.num_rows) if i not in set(red)]
    wanted = round(red_share * rows)
    if len(red) < wanted or len(other) < rows - wanted:
        raise ValueError(f"the pool of {pool.num_rows} rows has {len(red)} red ones; {wanted} asked")
    pq.write_table(pool.take(sorted(red[:wanted] + other[: rows - wanted])), path)
    return path


def biased_with_reference(model: Path, data: Path, out: Path, columns: list[str]) -> Path:
    """The rows with the model's biased answers and its reference log-probs of ``columns``."""
    from napo.data import generate_biased
    from napo.train.reference import compute_reference_logps

    generate_biased(model, data, out / "biased", batch_size=16, max_new_tokens=16, num_beams=1, device="cpu",
                    progress=False)  # fmt: skip
    compute_reference_logps(model, out / "biased", out / "logps", columns=columns, batch_size=16, device="cpu",
                            progress=False)  # fmt: skip
    return out / "logps"


def noise_shares(table) -> dict[str, float]:
    """The measured noise of the rows: biased answers as good as chosen (and identical to it), red-drawn rows."""
    from napo.data.grammar import first_color

    rows = table.to_pylist()
    return {
        "language_noise": sum(as_good_as_chosen(r["question_only"], r["chosen"]) for r in rows) / len(rows),
        "language_identical": sum(r["question_only"] == r["chosen"] for r in rows) / len(rows),
        "vision_noise": sum(as_good_as_chosen(r["image_only"], r["chosen"]) for r in rows) / len(rows),
        "red_rows": sum(first_color(r["chosen"]) == "red" for r in rows) / len(rows),
    }


def flip_rows(table, order: list[int], flip: float, out: Path) -> Path:
    """The table with chosen and rejected (texts and reference columns) swapped on the first ``flip`` of ``order``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from napo.train.collator import reference_columns

    flipped = set(order[: round(flip * table.num_rows)])
    pairs = [("chosen", "rejected"), *zip(reference_columns("chosen"), reference_columns("rejected"), strict=True)]
    for a, b in pairs:
        values = {name: table.column(name).to_pylist() for name in (a, b)}
        for name, other in ((a, b), (b, a)):
            swapped = [values[other][i] if i in flipped else values[name][i] for i in range(table.num_rows)]
            where = table.schema.get_field_index(name)
            table = table.set_column(where, table.schema.field(name), pa.array(swapped, table.schema.field(name).type))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "train.parquet")  # the schema's metadata (napo logps' settings) is kept
    return out


def held_out_accuracy(model_dir: Path, held_out: Path, clean_language: dict) -> dict[str, float]:
    """Shares of held-out rows with a positive reward margin: chosen vs rejected, and chosen vs question_only on
    the rows whose question_only answer is not as good as chosen."""
    from napo.analysis.margins import margins

    frame = margins(held_out, model_dir, batch_size=16, device="cpu")
    original = frame[frame["term"] == "original"]
    language = frame[(frame["term"] == "language") & frame["idx"].map(clean_language)]
    return {
        "heldout_chosen_vs_rejected": float((original["reward_margin"] > 0).mean()),
        "heldout_chosen_vs_question_only": float((language["reward_margin"] > 0).mean()),
    }


def training_log(run: Path) -> dict[str, float]:
    """Mean over the logged steps of each term's q and weight (the trainer's napo/q_* and napo/weight_*)."""
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    out = {}
    for kind in ("q", "weight"):
        for term in ("original", "language", "vision"):
            values = [h[f"napo/{kind}_{term}"] for h in history if f"napo/{kind}_{term}" in h]
            out[f"mean_{kind}_{term}"] = statistics.mean(values) if values else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=64, help="training rows per seed")
    parser.add_argument("--heldout", type=int, default=96, help="held-out clean rows (one set, seed 999)")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), help="RED:FLIP (RED: natural or a share)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--scenarios", type=int, default=40, help="shapes benchmark scenarios")
    parser.add_argument("--work", type=Path, default=Path("/tmp/napo-noise-world"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/napo-noise-world-cache"), help="pretrained model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 on 2 busy cores: 7x slower)")
    parser.add_argument("--csv", type=Path, default=default_path("noise_world"))
    parser.add_argument("--plot", default=str(HERE / "noise_world.png"), help="empty: no plot")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts its thread pool

    import torch
    from transformers.utils import logging as hf_logging

    import napo
    from napo.data.world import cached_pretrained_model
    from napo.eval.run import evaluate
    from napo.train.run import train

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    methods = {m: METHODS[m] for m in args.methods}
    flips: dict[str, list[float]] = {}  # red share ("natural" or a number) -> its flip levels
    for level in args.levels:
        red, _, flip = level.partition(":")
        if red != "natural":
            red = f"{float(red):g}"
        flips.setdefault(red, []).append(float(flip))
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    model = cached_pretrained_model(args.cache, seed=0)
    log(f"pretrained model: {model}")
    held = biased_with_reference(model, select_rows(args.work / "heldout" / "data.parquet", args.heldout, 999, None),
                                 args.work / "heldout", ANSWERS)  # fmt: skip
    held_rows = read_table(held).to_pylist()
    clean_language = {r["idx"]: not as_good_as_chosen(r["question_only"], r["chosen"]) for r in held_rows}
    log(f"held-out: {len(held_rows)} rows, {sum(clean_language.values())} with a clean language pair")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    device = f"CPU {platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
    base = {"date": stamp, "device": device, "napo": napo.__version__, "torch": torch.__version__,
            "rows": args.rows, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}  # fmt: skip
    runs: list[dict] = []
    pretrained = evaluate([model], "shapes", args.work / "eval-pretrained", device="cpu", progress=False,
                          batch_size=32, options={"shapes": {"scenarios": args.scenarios}}).metrics  # fmt: skip
    runs.append({**base, "method": "pretrained", **{m: float(pretrained.loc[pretrained["metric"] == m, "value"].iloc[0])
                                                    for m in BENCH_METRICS}})  # fmt: skip
    log("pretrained: " + ", ".join(f"{m} {runs[0][m]:.3f}" for m in BENCH_METRICS))

    for seed in range(args.seeds):
        for label, red_flips in flips.items():
            where = args.work / f"seed{seed}-red{label}"
            shutil.rmtree(where, ignore_errors=True)
            red_share = None if label == "natural" else float(label)
            data = select_rows(where / "data.parquet", args.rows, 100 + seed, red_share)
            table = read_table(biased_with_reference(model, data, where, ANSWERS))
            shares = noise_shares(table)
            log(f"seed {seed} red {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
            order = list(range(table.num_rows))
            random.Random(300 + seed).shuffle(order)
            for flip in red_flips:
                level = flip_rows(table, order, flip, where / f"flip{flip:g}")
                trained = {}
                for method, options in methods.items():
                    run = where / f"run-{len(trained)}"
                    began = time.perf_counter()
                    config = {"num_train_epochs": args.epochs, "per_device_train_batch_size": args.batch_size,
                              "learning_rate": args.lr, "seed": seed, "save_strategy": "no", "logging_steps": 4,
                              **options}  # fmt: skip
                    train(model, level, run, config=config, progress=False, print_table=False)
                    trained[method] = (run, time.perf_counter() - began)
                scores = evaluate([run for run, _ in trained.values()], "shapes", where / f"eval-{flip:g}",
                                  device="cpu", progress=False, batch_size=32,
                                  options={"shapes": {"scenarios": args.scenarios}}).metrics  # fmt: skip
                for method, (run, seconds) in trained.items():
                    mine = scores[scores["model"] == run.name]
                    row = {**base, "method": method, "seed": seed, "red_share": label, "flip": flip,
                           "flipped_rows": round(flip * table.num_rows), **shares, "train_s": round(seconds, 1),
                           **{m: float(mine.loc[mine["metric"] == m, "value"].iloc[0]) for m in BENCH_METRICS},
                           **held_out_accuracy(run, held, clean_language), **training_log(run)}  # fmt: skip
                    runs.append(row)
                    shown = "  ".join(f"{k} {row[k]:.3f}" for k, _ in SHOWN)
                    log(f"seed {seed} red {label} flip {flip:g} {method:<22} train {seconds:5.1f} s  {shown}")
                for run, _ in trained.values():
                    shutil.rmtree(run, ignore_errors=True)
    wall = time.perf_counter() - start
    log(f"done: {len(runs) - 1} training runs, wall {wall:.0f} s")

    header = [*dict.fromkeys(k for r in runs for k in r), "wall_s"]
    append_rows(args.csv, header, ([*(r.get(k, "") for k in header[:-1]), round(wall)] for r in runs))
    print(f"rows appended to {args.csv}")
    print_tables(runs, methods)
    if args.plot:
        plot(runs, methods, args.plot)
        print(f"plot: {args.plot}")


SHOWN = (
    ("color_accuracy", "colour accuracy ↑"),
    ("blank_prior_rate", "blank prior rate ↓"),
    ("CHAIRs", "CHAIRs ↓"),
    ("heldout_chosen_vs_rejected", "held-out chosen > rejected ↑"),
    ("heldout_chosen_vs_question_only", "held-out chosen > question_only ↑"),
)


def levels(runs: list[dict]) -> list[tuple[str, float]]:
    return list(dict.fromkeys((r["red_share"], r["flip"]) for r in runs if r["method"] != "pretrained"))


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def print_tables(runs: list[dict], methods: dict) -> None:
    pretrained = runs[0]
    for key, title in SHOWN:
        print(f"\n{title}" + (f" (pretrained: {pretrained[key]:.3f})" if key in pretrained else ""))
        print("| method | " + " | ".join(f"red {s}, flip {f:g}" for s, f in levels(runs)) + " |")
        print("|---|" + "---:|" * len(levels(runs)))
        for method in methods:
            cells = [cell([r[key] for r in runs if r["method"] == method and (r["red_share"], r["flip"]) == lv])
                     for lv in levels(runs)]  # fmt: skip
            print(f"| {method} | " + " | ".join(cells) + " |")


def plot(runs: list[dict], methods: dict, path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 7), layout="constrained")
    axes = figure.subplots(2, 3).flatten()
    shares = list(dict.fromkeys(s for s, _ in levels(runs)))
    for axis, (key, title) in zip(axes, SHOWN, strict=False):
        for number, method in enumerate(methods):
            for share, style in zip(shares, ("-", "--", ":"), strict=False):
                mine = [r for r in runs if r["method"] == method and r["red_share"] == share]
                flips = sorted({r["flip"] for r in mine})
                values = [[r[key] for r in mine if r["flip"] == f] for f in flips]
                axis.errorbar([f + 0.006 * (number - 2) for f in flips], [statistics.mean(v) for v in values],
                              yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values], capsize=2,
                              marker="o", linestyle=style, color=f"C{number}",
                              label=f"{method}" + (f" (red {share})" if len(shares) > 1 else ""))  # fmt: skip
        if key in runs[0]:
            axis.axhline(runs[0][key], color="grey", linewidth=0.8, linestyle=":", label="pretrained")
        axis.set_title(title)
        axis.set_xlabel("share of flipped original pairs")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    axes[-1].legend(handles, labels, loc="center", fontsize="small")
    figure.suptitle("pretrained tiny LLaVA (sample world): DPO vs NaPO under noise, mean ± sd over seeds")
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
