"""The paper's noise with a lever: NaPO's ablations on a preference set written by another writer than the model.

In ``benchmarks/noise_world.py`` the sample set's chosen answers are in the pretrained tiny LLaVA's own register, so a
language-biased answer that is right anyway is the chosen string itself (zero margin, zero gradient): the paper's
noise had no lever. Here the chosen and rejected answers come from another writer (``make_sample_data(...,
writer="other")``: "Red.", "It's red.", "The square in the top left corner is red.", ...) while the model keeps its own
register ("The square in the image is red."), as RLAIF-V's answers come from other models than the one trained. A
right-anyway biased answer then differs from the chosen one in words and agrees in content, and the language pair
pushes it down: the harm NaPO's noise-aware loss and dynamic weights are meant to limit.

The world (``WorldRecipe(absent_share=...)``) and the preference rows (``absent_share``) also hold colour questions
about a shape the picture lacks (blank, or another shape drawn), answered "there is none", so that the shapes
benchmark's blank-picture prior is something training can move.

Per seed and level: rows drawn from a pool of the other writer's rows so that a set share of the language-biased
answers is right anyway (the model's ``question_only`` answer depends on the question alone, so it is generated once
per question and predicts which rows are right anyway; "natural": the draw's own share), the model's biased answers
generated and their reference log-probs cached, then a share of the original pairs flipped (chosen and rejected
swapped). The shares are measured from the generated answers against the rows' drawn truth (colour, shape, or none),
never assumed; so is the share of biased answers whose text equals the chosen text. Methods (the paper's Table 2 and
q / weight ablations, same rows, steps and seed): DPO on the original pairs; DPO on the three pairs with weights 1;
the three pairs with the NaPO loss at q fixed 0 (DPO), 0.5, 1 on the biased terms and dynamic weights; adaptive q
with weights 1; the full method (adaptive q, dynamic weights: the paper's Eq. 12 and 13, napo's defaults). Outcomes:
the shapes benchmark (colour, blank, describe), held-out preference accuracy, and the mean change of log-prob
(trained policy minus pretrained reference) of the training rows' language-biased answers, right-anyway vs wrong.

A benchmark, not a test: nothing asserts which method wins. ``--quick`` (CI's smoke test, tests/test_world.py) runs
the pipeline on a pretrained model of a few steps, one seed, two methods and a handful of rows.

Run (the RESULTS.md section; the pretrained model is built once into --cache):
  nice python benchmarks/noise_world_writer.py > noise_world_writer.log
  python benchmarks/noise_world_writer.py --quick --work /tmp/q --csv "" --plot "" --weights-plot ""
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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from noise_world import ANSWERS, biased_with_reference, flip_rows, read_table
from results_csv import append_rows, default_path

HERE = Path(__file__).parent
ORIGINAL_ONLY = {"original_loss": "dpo", "language_loss": "none", "vision_loss": "none"}
ALL_DPO = {"original_loss": "dpo", "language_loss": "dpo", "vision_loss": "dpo"}


def fixed_q(q: str) -> dict[str, str]:
    return {"original_loss": "dpo", "language_q": q, "vision_q": q}


METHODS = {
    "DPO, original pairs": ORIGINAL_ONLY,
    "DPO, 3 pairs, weights 1": {**ALL_DPO, "napo_weights": "none"},
    "NaPO q=0, dynamic w": fixed_q("0"),
    "NaPO q=0.5, dynamic w": fixed_q("0.5"),
    "NaPO q=1, dynamic w": fixed_q("1"),
    "NaPO adaptive q, weights 1": {"original_loss": "dpo", "napo_weights": "none"},
    "full method (paper)": {"original_loss": "dpo"},  # language / vision: NaPOConfig's defaults, the paper's
}
FULL = "full method (paper)"
NEAREST = ("NaPO adaptive q, weights 1", "NaPO q=0, dynamic w")  # the full method less one of its two parts
LEVELS = ("0:0", "0.2:0", "0.4:0", "natural:0", "natural:0.3")
FLIP_METHODS = ("DPO, original pairs", "DPO, 3 pairs, weights 1", *NEAREST, FULL)
"""The methods run at a level with flipped pairs (all of them at the others): what fits the 25-minute budget."""
BENCH_METRICS = ("color_accuracy", "blank_prior_rate", "CHAIRs", "CHAIRi", "recall")
KINDS = ("color", "blank", "describe")


def right_anyway(answer: str, truth: dict) -> bool:
    """Whether a biased answer agrees in content with the row's drawn truth: for a colour question the drawn colour
    named first and no other shape named; for a shape question the drawn shape (and, if a colour is named, the drawn
    one); for a question about a shape the picture lacks, a "no" and no colour."""
    from napo.data.grammar import first_color, shape_mentions

    words = answer.lower().replace(".", " ").split()
    if truth["kind"] == "absent":
        return "no" in words and first_color(answer) is None
    shapes = set(shape_mentions(answer))
    if truth["kind"] == "color":
        return first_color(answer) == truth["color"] and shapes <= {truth["shape"]}
    return shapes == {truth["shape"]} and first_color(answer) in (None, truth["color"])


def blind_answers(model: Path, questions: list[str]) -> dict[str, str]:
    """The model's language-biased answer (the question, no image; greedy, 16 new tokens, as ``generate_biased``
    writes it here) to each distinct question: it depends on the question alone, so it predicts every row's."""
    from napo.data.generate import GenerationSettings, generate_answers
    from napo.data.prompts import user_prompt
    from napo.models.loading import load_model

    questions = sorted(set(questions))
    loaded, processor = load_model(model, device="cpu")
    prompts = [user_prompt(processor, "template", question=q, num_images=0) for q in questions]
    answers = generate_answers(loaded, processor, prompts, None, GenerationSettings(max_new_tokens=16, num_beams=1))
    return dict(zip(questions, answers, strict=True))


def select_rows(
    path: Path, rows: int, seed: int, share: float | None, absent: float, blind: dict[str, str] | None = None
) -> tuple[Path, dict]:
    """``rows`` of the other writer's rows, and idx -> truth. ``share`` None: the first rows of the draw; else the
    first ``share * rows`` rows whose language-biased answer (``blind``: question -> the model's answer) is right
    anyway and the first other rows of a 16x larger draw, in drawn order (the share is measured again afterwards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from napo.data.sample import COLUMNS, sample_rows

    pool = sample_rows(rows if share is None else rows * 16, seed=seed, writer="other", absent_share=absent,
                       with_truth=True)  # fmt: skip
    if share is not None:
        right = [r for r in pool if right_anyway(blind[r["question"]], r["truth"])]
        other = [r for r in pool if not right_anyway(blind[r["question"]], r["truth"])]
        wanted = round(share * rows)
        if len(right) < wanted or len(other) < rows - wanted:
            raise ValueError(f"the pool of {len(pool)} rows has {len(right)} right-anyway ones; {wanted} asked")
        keep = {r["idx"] for r in right[:wanted] + other[: rows - wanted]}
        pool = [r for r in pool if r["idx"] in keep]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in COLUMNS} for r in pool]), path)
    return path, {r["idx"]: r["truth"] for r in pool}


def noise_shares(table, truths: dict) -> dict[str, float]:
    """Measured from the rows: biased answers right anyway, biased answers equal to the chosen text, kinds of rows."""
    rows = table.to_pylist()
    n = len(rows)

    def share(test) -> float:
        return sum(bool(test(r)) for r in rows) / n

    return {
        "language_right_anyway": share(lambda r: right_anyway(r["question_only"], truths[r["idx"]])),
        "language_equal_text": share(lambda r: r["question_only"].strip() == r["chosen"].strip()),
        "vision_right_anyway": share(lambda r: right_anyway(r["image_only"], truths[r["idx"]])),
        "vision_equal_text": share(lambda r: r["image_only"].strip() == r["chosen"].strip()),
        "absent_rows": share(lambda r: truths[r["idx"]]["kind"] == "absent"),
    }


def logp_changes(model_dir: Path, data: Path, truths: dict) -> dict[str, float]:
    """Mean change of log-prob (trained policy minus the cached pretrained reference, whole answer) of the rows'
    language-biased answers, right-anyway ones and wrong ones, and of the chosen answers."""
    from napo.analysis.margins import margins

    frame = margins(data, model_dir, batch_size=16, device="cpu")
    frame = frame[frame["term"] == "language"].set_index("idx")
    reference = read_table(data).to_pandas().set_index("idx")
    change = frame["answer_logps"] - reference.loc[frame.index, "ref_question_only_logps"]
    chosen = frame["chosen_logps"] - reference.loc[frame.index, "ref_chosen_logps"]
    right = [right_anyway(reference.loc[i, "question_only"], truths[i]) for i in frame.index]
    mean = lambda values: float(values.mean()) if len(values) else float("nan")  # noqa: E731
    return {
        "dlogp_language_right": mean(change[right]),
        "dlogp_language_wrong": mean(change[[not r for r in right]]),
        "dlogp_chosen": mean(chosen),
    }


def held_out_accuracy(model_dir: Path, held_out: Path, wrong_language: dict) -> dict[str, float]:
    """Shares of held-out rows with a positive reward margin against the reference: chosen vs rejected, and chosen vs
    question_only on the rows whose question_only answer is wrong."""
    from napo.analysis.margins import margins

    frame = margins(held_out, model_dir, batch_size=16, device="cpu")
    original = frame[frame["term"] == "original"]
    language = frame[(frame["term"] == "language") & frame["idx"].map(wrong_language)]
    return {
        "heldout_chosen_vs_rejected": float((original["reward_margin"] > 0).mean()),
        "heldout_chosen_vs_question_only": float((language["reward_margin"] > 0).mean()),
    }


def per_step(run: Path) -> list[dict]:
    """The trainer's logged q and weight of each term per step (``logging_steps=1``)."""
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    keys = [f"napo/{kind}_{term}" for kind in ("q", "weight") for term in ("original", "language", "vision")]
    return [{"step": h["step"], **{k: h[k] for k in keys if k in h}} for h in history if "napo/weight_original" in h]


def blank_says_none(items) -> float:
    """Share of the blank-picture answers that say there is no shape (a "no" without a colour)."""
    from napo.data.grammar import first_color

    blank = items[items["kind"] == "blank"]["answer"].fillna("")
    says = [("no" in a.lower().replace(".", " ").split()) and first_color(a) is None for a in blank]
    return sum(says) / len(says) if says else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny pretraining, 1 seed, 2 methods")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. seeds-1 (split a run over jobs)")
    parser.add_argument(
        "--report",
        nargs="+",
        type=Path,
        default=None,
        help="no training: the tables, CSV and plots of these --work folders' runs (seed-split jobs)",
    )
    parser.add_argument("--rows", type=int, default=32, help="training rows per seed and level")
    parser.add_argument("--heldout", type=int, default=64, help="held-out clean rows (one set, seed 999)")
    parser.add_argument("--absent-share", type=float, default=0.15, help="rows about a shape the picture lacks")
    parser.add_argument("--world-absent-share", type=float, default=0.05, help="the world's such turns (pretraining)")
    parser.add_argument("--world-lazy-share", type=float, default=0.45, help="the world's colour answers naming red")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), help="RIGHT:FLIP (RIGHT: natural or a share)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--scenarios", type=int, default=40, help="shapes benchmark scenarios")
    parser.add_argument("--work", type=Path, default=Path("/tmp/napo-noise-world-writer"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/napo-noise-world-cache"), help="pretrained model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--csv", default=str(default_path("noise_world_writer")), help="empty: no CSV")
    parser.add_argument("--plot", default=str(HERE / "noise_world_writer.png"), help="empty: no plot")
    parser.add_argument("--weights-plot", default=str(HERE / "noise_world_writer_weights.png"), help="empty: none")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rows, args.heldout, args.scenarios, args.epochs = 1, 8, 8, 2, 1
        args.levels, args.methods = ["0.4:0.25"], ["DPO, original pairs", FULL]
    if args.report:
        finish(args, *read_runs(args.report))
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts its thread pool

    import torch
    from transformers.utils import logging as hf_logging

    import napo
    from napo.data.world import WorldRecipe, cached_pretrained_model
    from napo.eval.run import evaluate
    from napo.train.run import train

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    methods = {m: METHODS[m] for m in args.methods}
    flips: dict[str, list[float]] = {}  # right-anyway share ("natural" or a number) -> its flip levels
    for level in args.levels:
        share, _, flip = level.partition(":")
        flips.setdefault(share if share == "natural" else f"{float(share):g}", []).append(float(flip or 0))
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    recipe = WorldRecipe(absent_share=args.world_absent_share, lazy_share=args.world_lazy_share)
    if args.quick:  # the pipeline, not the result: a model pretrained for a few steps
        recipe = WorldRecipe(absent_share=args.world_absent_share, lazy_share=args.world_lazy_share, turns=64,
                             vision_steps=2, vision_batch_size=8, steps=2, batch_size=8)  # fmt: skip
    model = cached_pretrained_model(args.cache, seed=0, recipe=recipe, progress=not args.quick)
    from napo.data.sample import SHAPES

    blind = blind_answers(model, ["What shape is drawn in this picture?"] + [f"What color is the {s} in the image?"
                                                                             for s in SHAPES])  # fmt: skip
    log(f"pretrained model: {model}; its language-biased answers: {blind}")
    held_data, held_truth = select_rows(args.work / "heldout" / "data.parquet", args.heldout, 999, None,
                                        args.absent_share)  # fmt: skip
    held = biased_with_reference(model, held_data, args.work / "heldout", ANSWERS)
    held_rows = read_table(held).to_pylist()
    wrong_language = {r["idx"]: not right_anyway(r["question_only"], held_truth[r["idx"]]) for r in held_rows}
    log(f"held-out: {len(held_rows)} rows, {sum(wrong_language.values())} with a wrong question_only answer")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    device = f"CPU {platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
    base = {"date": stamp, "device": device, "napo": napo.__version__, "torch": torch.__version__,
            "rows": args.rows, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "absent_share": args.absent_share, "world_absent_share": args.world_absent_share,
            "world_lazy_share": args.world_lazy_share}  # fmt: skip
    options = {"shapes": {"scenarios": args.scenarios, "kinds": KINDS}}
    scored = evaluate([model], "shapes", args.work / "eval-pretrained", device="cpu", progress=False, batch_size=32,
                      options=options)  # fmt: skip
    pretrained = {**base, "method": "pretrained", **metric_values(scored, model.name)}
    pretrained["blank_says_none"] = blank_says_none(scored.items[(model.name, "shapes")])
    runs: list[dict] = [pretrained]
    (args.work / "runs.jsonl").write_text(json.dumps(pretrained) + "\n")  # every level appends: a killed job keeps them
    (args.work / "steps.jsonl").write_text("")
    log("pretrained: " + ", ".join(f"{m} {pretrained[m]:.3f}" for m in (*BENCH_METRICS, "blank_says_none")))
    steps_log: list[dict] = []

    for seed in range(args.first_seed, args.seeds):
        for label, level_flips in flips.items():
            where = args.work / f"seed{seed}-right{label}"
            shutil.rmtree(where, ignore_errors=True)
            share = None if label == "natural" else float(label)
            data, truths = select_rows(where / "data.parquet", args.rows, 100 + seed, share, args.absent_share, blind)
            table = read_table(biased_with_reference(model, data, where, ANSWERS))
            shares = noise_shares(table, truths)
            log(f"seed {seed} right-anyway {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
            order = list(range(table.num_rows))
            random.Random(300 + seed).shuffle(order)
            for flip in level_flips:
                level = flip_rows(table, order, flip, where / f"flip{flip:g}")
                trained = {}
                for method, settings in methods.items():
                    if flip and method not in FLIP_METHODS and not args.quick:
                        continue
                    run = where / f"run-{len(trained)}"
                    began = time.perf_counter()
                    config = {"num_train_epochs": args.epochs, "per_device_train_batch_size": args.batch_size,
                              "learning_rate": args.lr, "seed": seed, "save_strategy": "no", "logging_steps": 1,
                              **settings}  # fmt: skip
                    train(model, level, run, config=config, progress=False, print_table=False)
                    trained[method] = (run, time.perf_counter() - began)
                scores = evaluate([run for run, _ in trained.values()], "shapes", where / f"eval-{flip:g}",
                                  device="cpu", progress=False, batch_size=32, options=options)  # fmt: skip
                for method, (run, seconds) in trained.items():
                    row = {**base, "method": method, "seed": seed, "right_share": label, "flip": flip,
                           "flipped_rows": round(flip * table.num_rows), **shares, "train_s": round(seconds, 1),
                           **metric_values(scores, run.name),
                           "blank_says_none": blank_says_none(scores.items[(run.name, "shapes")]),
                           **held_out_accuracy(run, held, wrong_language),
                           **logp_changes(run, level / "train.parquet", truths)}  # fmt: skip
                    runs.append(row)
                    if method == FULL:
                        steps_log += [{"seed": seed, "right_share": label, "flip": flip, **s} for s in per_step(run)]
                    shown = "  ".join(f"{k} {row[k]:.3f}" for k, _ in SHOWN)
                    log(f"seed {seed} right {label} flip {flip:g} {method:<27} train {seconds:5.1f} s  {shown}")
                for run, _ in trained.values():
                    shutil.rmtree(run, ignore_errors=True)
                with (args.work / "runs.jsonl").open("a") as handle:
                    handle.writelines(json.dumps(r) + "\n" for r in runs[-len(trained) :])
                with (args.work / "steps.jsonl").open("a") as handle:
                    handle.writelines(json.dumps(r) + "\n" for r in steps_log if r["seed"] == seed and
                                      (r["right_share"], r["flip"]) == (label, flip))  # fmt: skip
    wall = time.perf_counter() - start
    log(f"done: {len(runs) - 1} training runs, wall {wall:.0f} s")
    for r in runs:
        r["wall_s"] = round(wall)
    finish(args, runs, steps_log)


def read_runs(folders: list[Path]) -> tuple[list[dict], list[dict]]:
    """The runs and per-step logs that seed-split jobs wrote to their --work folders (one pretrained row kept)."""
    runs, steps = [], []
    for folder in folders:
        rows = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines() if line]
        runs += [r for r in rows if r["method"] != "pretrained" or not runs]
        steps += [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines() if line]
    return runs, steps


def finish(args, runs: list[dict], steps_log: list[dict]) -> None:
    """The CSVs, tables and plots of the runs."""
    methods = {m: METHODS[m] for m in args.methods}
    stamp = runs[0]["date"]
    if args.csv:
        header = list(dict.fromkeys(k for r in runs for k in r))
        append_rows(Path(args.csv), header, ([r.get(k, "") for k in header] for r in runs))
        steps_csv = Path(args.csv).with_name(Path(args.csv).stem + "_steps.csv")
        steps_header = list(dict.fromkeys(k for r in steps_log for k in r))
        append_rows(steps_csv, ["date", *steps_header], ([stamp, *(r.get(k, "") for k in steps_header)]
                                                         for r in steps_log))  # fmt: skip
        print(f"rows appended to {args.csv} and {steps_csv}")
    print_tables(runs, methods)
    print_paired(runs)
    if args.plot:
        plot(runs, methods, args.plot)
        print(f"plot: {args.plot}")
    if args.weights_plot and steps_log:
        plot_steps(steps_log, args.weights_plot)
        print(f"weights plot: {args.weights_plot}")


def metric_values(scored, name: str) -> dict[str, float]:
    mine = scored.metrics[scored.metrics["model"] == name]
    return {m: float(mine.loc[mine["metric"] == m, "value"].iloc[0]) for m in BENCH_METRICS}


SHOWN = (
    ("color_accuracy", "colour accuracy, counterfactual shapes ↑"),
    ("blank_prior_rate", "'red' for a blank picture ↓"),
    ("blank_says_none", "blank picture: says there is no shape ↑"),
    ("CHAIRs", "CHAIRs ↓"),
    ("heldout_chosen_vs_rejected", "held-out chosen > rejected ↑"),
    ("heldout_chosen_vs_question_only", "held-out chosen > question_only (wrong ones) ↑"),
    ("dlogp_language_right", "Δ log-prob, right-anyway language-biased answers"),
    ("dlogp_language_wrong", "Δ log-prob, wrong language-biased answers ↓"),
)


def levels(runs: list[dict]) -> list[tuple[str, float]]:
    return list(dict.fromkeys((r["right_share"], r["flip"]) for r in runs if r["method"] != "pretrained"))


def cell(values: list[float]) -> str:
    values = [v for v in values if v == v]  # no NaN (a level without right-anyway rows)
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def print_tables(runs: list[dict], methods: dict) -> None:
    pretrained = runs[0]
    for key, title in SHOWN:
        print(f"\n{title}" + (f" (pretrained: {pretrained[key]:.3f})" if key in pretrained else ""))
        print("| method | " + " | ".join(f"right {s}, flip {f:g}" for s, f in levels(runs)) + " |")
        print("|---|" + "---:|" * len(levels(runs)))
        for method in methods:
            cells = [cell([r[key] for r in runs if r["method"] == method and (r["right_share"], r["flip"]) == lv])
                     for lv in levels(runs)]  # fmt: skip
            print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nmeasured shares per level (mean over seeds; min-max)")
    for lv in levels(runs):
        mine = [r for r in runs if r["method"] != "pretrained" and (r["right_share"], r["flip"]) == lv]
        firsts = {r["seed"]: r for r in mine}.values()  # one row per seed: the shares are the data's
        text = ", ".join(f"{k} {statistics.mean(r[k] for r in firsts):.3f} ({min(r[k] for r in firsts):.3f}-"
                         f"{max(r[k] for r in firsts):.3f})" for k in SHARES)  # fmt: skip
        print(f"  right {lv[0]}, flip {lv[1]:g}: {text}")


SHARES = ("language_right_anyway", "language_equal_text", "vision_right_anyway", "vision_equal_text", "absent_rows")
PAIRED = ("color_accuracy", "blank_prior_rate", "heldout_chosen_vs_rejected", "heldout_chosen_vs_question_only",
          "dlogp_language_right")  # fmt: skip


def sign_test(differences: list[float]) -> float:
    """Two-sided exact sign test p-value (ties dropped)."""
    from math import comb

    up, down = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(0, min(up, down) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_ci(differences: list[float], draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean paired difference."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(differences, k=len(differences))) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def paired(runs: list[dict], other: str, key: str, level: tuple[str, float]) -> list[float]:
    """Per seed: the full method's value minus ``other``'s, at one level (same rows, steps and trainer seed)."""
    by = {(r["method"], r["seed"]): r[key] for r in runs if r["method"] != "pretrained" and
          (r["right_share"], r["flip"]) == level}  # fmt: skip
    seeds = sorted({s for m, s in by if m == FULL and (other, s) in by})
    return [by[(FULL, s)] - by[(other, s)] for s in seeds if by[(FULL, s)] == by[(FULL, s)] and
            by[(other, s)] == by[(other, s)]]  # fmt: skip


def print_paired(runs: list[dict]) -> None:
    present = {r["method"] for r in runs}
    if FULL not in present:
        return
    print("\npaired per seed, full method minus its nearest ablations: mean difference [95% bootstrap CI], "
          "higher/equal/lower seeds, sign-test p")  # fmt: skip
    for other in (m for m in NEAREST if m in present):
        print(f"\nvs {other}")
        print("| level | " + " | ".join(PAIRED) + " |")
        print("|---|" + "---|" * len(PAIRED))
        for lv in levels(runs):
            cells = []
            for key in PAIRED:
                d = paired(runs, other, key, lv)
                if not d:
                    cells.append("-")
                    continue
                low, high = bootstrap_ci(d)
                counts = f"{sum(x > 0 for x in d)}/{sum(x == 0 for x in d)}/{sum(x < 0 for x in d)}"
                cells.append(f"{statistics.mean(d):+.3f} [{low:+.3f}, {high:+.3f}] {counts} p={sign_test(d):.2f}")
            print(f"| right {lv[0]}, flip {lv[1]:g} | " + " | ".join(cells) + " |")


def plot(runs: list[dict], methods: dict, path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 8), layout="constrained")
    axes = figure.subplots(2, 4).flatten()
    lvls = levels(runs)
    for axis, (key, title) in zip(axes, SHOWN, strict=False):
        for number, method in enumerate(methods):
            values = [[r[key] for r in runs if r["method"] == method and (r["right_share"], r["flip"]) == lv
                       and r[key] == r[key]] for lv in lvls]  # fmt: skip
            xs = [i + 0.09 * (number - len(methods) / 2) for i, v in enumerate(values) if v]
            axis.errorbar(xs, [statistics.mean(v) for v in values if v],
                          yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values if v], capsize=2,
                          marker="o", linestyle="none", color=f"C{number}", label=method)  # fmt: skip
        if key in runs[0]:
            axis.axhline(runs[0][key], color="grey", linewidth=0.8, linestyle=":", label="pretrained")
        axis.set_title(title, fontsize="small")
        axis.set_xticks(range(len(lvls)), [f"{s}\nflip {f:g}" for s, f in lvls], fontsize="x-small")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=4, fontsize="small")
    figure.suptitle("tiny LLaVA, preference set by another writer: the paper's ablations, mean ± sd over seeds "
                    "(x: right-anyway share of language-biased answers, flipped share)")  # fmt: skip
    figure.savefig(path, dpi=90)


def plot_steps(steps_log: list[dict], path: str) -> None:
    """The full method's three weights and three q's per step, one line per seed, one column per level."""
    from matplotlib.figure import Figure

    lvls = list(dict.fromkeys((r["right_share"], r["flip"]) for r in steps_log))
    figure = Figure(figsize=(3.2 * len(lvls), 6), layout="constrained")
    axes = figure.subplots(2, len(lvls), squeeze=False)
    for column, lv in enumerate(lvls):
        for row, kind in enumerate(("weight", "q")):
            axis = axes[row][column]
            for number, term in enumerate(("original", "language", "vision")):
                seeds = sorted({r["seed"] for r in steps_log})
                for seed in seeds:
                    mine = [r for r in steps_log if (r["right_share"], r["flip"]) == lv and r["seed"] == seed]
                    values = [r.get(f"napo/{kind}_{term}", float("nan")) for r in mine]
                    axis.plot([r["step"] for r in mine], values, color=f"C{number}", alpha=0.6, linewidth=0.9,
                              label=term if seed == seeds[0] else None)  # fmt: skip
            axis.set_title(f"{kind}, right {lv[0]}, flip {lv[1]:g}", fontsize="small")
            axis.set_xlabel("step")
            if kind == "weight":
                axis.set_yscale("log")
    axes[0][0].legend(fontsize="small")
    figure.suptitle("full method (Eq. 12 q, Eq. 13 weights), one line per seed")
    figure.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
