"""The embedded example behind ``napo demo``: the whole method on the embedded defaults, offline.

Step 1: the tiny offline LLaVA writes language-biased and vision-biased answers for the bundled
sample set (RLAIF-V -> RLAIF-V-Bias). Step 2: the reference log-probs of every answer are cached
(``napo logps``). Step 3: a short NaPO training run of the tiny LLaVA (``napo train``: the paper's
4 epochs of batch 4, a learning rate raised for a random tiny model), printing q, the weights and
the margins per step. Without ``napo[train]`` (TRL), the demo falls back to the objective alone on
a simulated run (``--objective-only``):

A toy policy scores four answers per sample (chosen, rejected, language-biased,
vision-biased) as ``reference log-prob + features @ theta``. A fraction of the
language-biased answers are noisy (as good as the chosen answer: their features
are the chosen answer's), which is the situation NaPO is built for. The run
prints, per step, the loss, the adaptive q of the biased terms, the dynamic
weights and the reward margins: q starts at 1 (policy == reference) and falls
toward DPO as the margins grow; the weights start uniform.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from napo.losses import TERMS, NaPOObjective

ANSWERS = ("chosen", "rejected", "language", "vision")


@dataclass
class DemoData:
    features: dict[str, torch.Tensor]  # answer -> [N, D]
    reference_logps: dict[str, torch.Tensor]  # answer -> [N]
    lengths: dict[str, torch.Tensor]  # answer -> [N]
    noisy_language: torch.Tensor  # [N] bool


def make_demo_data(num_samples: int = 512, dim: int = 16, noise: float = 0.3, seed: int = 0) -> DemoData:
    generator = torch.Generator().manual_seed(seed)
    good = torch.randn(dim, generator=generator)  # the direction a good answer has

    def answers(quality: float) -> torch.Tensor:
        return quality * good + torch.randn(num_samples, dim, generator=generator)

    features = {"chosen": answers(0.6), "rejected": answers(-0.2), "language": answers(-0.4), "vision": answers(-0.8)}
    noisy = torch.rand(num_samples, generator=generator) < noise
    features["language"][noisy] = features["chosen"][noisy] + 0.1 * torch.randn(
        int(noisy.sum()), dim, generator=generator
    )
    lengths = {a: torch.randint(8, 120, (num_samples,), generator=generator).float() for a in ANSWERS}
    reference = {a: -lengths[a] * (0.5 + torch.rand(num_samples, generator=generator)) for a in ANSWERS}
    return DemoData(features=features, reference_logps=reference, lengths=lengths, noisy_language=noisy)


def run_demo(
    steps: int = 40,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    beta: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    print_every: int = 4,
) -> list[dict[str, float]]:
    """Trains the toy policy with the paper's objective; prints and returns a row of metrics per printed step."""
    data = make_demo_data(seed=seed)
    theta = torch.zeros(data.features["chosen"].shape[1], device=device, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=learning_rate)
    objective = NaPOObjective(beta=beta)
    generator = torch.Generator().manual_seed(seed + 1)
    num_samples = data.features["chosen"].shape[0]

    header = (
        f"{'step':>4} {'loss':>8} {'q_lang':>7} {'q_vis':>7} {'w_orig':>7} {'w_lang':>7} {'w_vis':>7} "
        f"{'m_orig':>8} {'m_lang':>8} {'m_vis':>8} {'acc_orig':>8}"
    )
    print(header)
    print("-" * len(header))
    rows: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randperm(num_samples, generator=generator)[:batch_size]
        inputs: dict[str, torch.Tensor] = {}
        for answer in ANSWERS:
            reference = data.reference_logps[answer][index].to(device)
            length = data.lengths[answer][index].to(device)
            policy = reference + data.features[answer][index].to(device) @ theta
            inputs[f"policy_{answer}_logps"], inputs[f"reference_{answer}_logps"] = policy, reference
            inputs[f"policy_{answer}_avg_logps"] = policy / length
            inputs[f"reference_{answer}_avg_logps"] = reference / length
        out = objective(**inputs)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if step % print_every == 0 or step == steps - 1:
            row = {"step": float(step), "loss": out.loss.item()}
            row.update({f"q_{t}": out.q[t].item() for t in TERMS})
            row.update({f"w_{t}": out.weights[t].item() for t in TERMS})
            row.update({f"margin_{t}": out.margins[t].mean().item() for t in TERMS})
            row["accuracy_original"] = out.accuracies["original"].item()
            rows.append(row)
            print(
                f"{step:>4d} {row['loss']:>8.4f} {row['q_language']:>7.4f} {row['q_vision']:>7.4f} "
                f"{row['w_original']:>7.3f} {row['w_language']:>7.3f} {row['w_vision']:>7.3f} "
                f"{row['margin_original']:>8.3f} {row['margin_language']:>8.3f} {row['margin_vision']:>8.3f} "
                f"{row['accuracy_original']:>8.3f}"
            )
    elapsed = time.perf_counter() - start
    print(f"\n{steps} steps of batch {batch_size} in {elapsed:.2f} s on {device}.")
    print("q: adaptive noise-robustness (1 = MAE, 0 = DPO); w: dynamic weights; m: mean reward margin beta*M.")
    return rows


DEMO_LEARNING_RATE = 5e-5
"""The demo's learning rate for the pretrained tiny LLaVA (64 rows, 4 epochs of batch 4): measured, a rate of
1.5e-4 also debiases it, 5e-4 breaks its language (the paper's 5e-7 is for a 7B model)."""


def demo_recipe():
    """The world the demo's model is pretrained on: the experiment's (``benchmarks/noise_world_writer.py``), a stronger
    prior than the default recipe's (45% of its colour answers written without looking) and 5% of its colour turns
    about a shape the picture lacks. Measured (RESULTS.md): on the default recipe with the world's own preference
    set, 64 rows, colour accuracy went 0.75 -> 0.35 (DPO) / 0.45 (NaPO); here, with another writer's set, training
    has the prior to remove (pretrained 0.375)."""
    from napo.data.world import WorldRecipe

    return WorldRecipe(lazy_share=0.45, absent_share=0.05)


DEMO_WRITER, DEMO_ABSENT_SHARE = "other", 0.15
"""The demo's preference set: another writer's register than the model's (so a right-anyway biased answer differs in
words from the chosen one, as in RLAIF-V), 15% of its rows about a shape the picture lacks."""


def prepare_model(workdir: str | Path, seed: int = 0) -> Path:
    """``workdir/pretrained``: the tiny LLaVA pretrained on the sample world (from the cache, pretrained into it
    the first time, under a minute on a CPU), its measured language prior printed."""
    import json

    from napo.data.world import MANIFEST, default_cache_dir, write_pretrained_model

    print(f"Step 0: a tiny LLaVA pretrained on the sample world (cached in {default_cache_dir()})")
    target = write_pretrained_model(Path(workdir) / "pretrained", seed=seed, recipe=demo_recipe())
    manifest = json.loads((target / MANIFEST).read_text())
    prior = manifest["prior"]
    print(f"  pretrained in {manifest['pretraining_seconds']:.0f} s the first time -> {target}")
    print("  its language prior, on 60 probe pictures of a shape that is not red (napo.data.world.measure_prior):")
    print(
        f"    with the picture, it names the drawn colour  {prior['with_image_accuracy']:>4.0%}"
        f"  (red instead: {prior['with_image_prior']:.0%})"
    )
    print(f"    without the picture, it answers red          {prior['question_only_prior']:>4.0%}")
    print(
        f"    without the question, it names the colour    {prior['image_only_names_color']:>4.0%}  (it sees colours)\n"
    )
    return target


def run_data_demo(workdir: str | Path, rows: int = 64, max_new_tokens: int = 16, seed: int = 0) -> Path | None:
    """The pretrained tiny LLaVA + sample set -> biased answers under ``workdir``; prints a few rows. None if
    the data extras are missing."""
    try:
        import pandas as pd

        from napo.data import generate_biased, make_sample_data
    except ImportError as error:
        print(f"(skipping the data step: {error}; install napo[data] for it)\n")
        return None
    workdir = Path(workdir)
    model_dir = prepare_model(workdir, seed=seed)
    data = make_sample_data(workdir / "sample.parquet", rows=rows, writer=DEMO_WRITER, absent_share=DEMO_ABSENT_SHARE)
    output = workdir / "rlaif-v-bias"
    _fresh(output)
    summary = generate_biased(
        model_dir,
        data,
        output,
        batch_size=16,
        max_new_tokens=max_new_tokens,
        num_beams=1,
        device="cpu",
        progress=False,
    )
    print(
        f"Step 1: {summary.written} rows answered by the pretrained tiny LLaVA in {summary.seconds:.1f} s -> {output}\n"
        "  (question_only: the question without the image, the language-biased answer; image_only: the image "
        "without the question, the vision-biased one)"
    )
    frame = pd.read_parquet(output).sort_values("idx")
    colour = frame[frame["question"].str.startswith("What color")]
    right_anyway = colour.apply(lambda row: _right_anyway(row["question_only"], row["chosen"], row["question"]), axis=1)
    shown = pd.concat([colour[~right_anyway].head(2), frame.head(1)])
    for _, row in shown.drop_duplicates("idx").iterrows():
        print(f"  [{row['idx']}] {row['question']}")
        print(f"      chosen:        {row['chosen']}")
        print(f"      question_only: {row['question_only']}")
        print(f"      image_only:    {row['image_only']}")
    noisy = int(right_anyway.sum())
    same = int((colour["chosen"] == colour["question_only"].str.strip()).sum())
    print(
        f"  {noisy} of {len(colour)} colour questions got a language-biased answer that is right anyway (it names "
        f"the drawn colour and the asked shape; {same} of them word for word the chosen answer): the paper's noise, "
        "which NaPO's adaptive q is built for.\n"
    )
    return output


def _right_anyway(biased: str, chosen: str, question: str) -> bool:
    """A language-biased answer that agrees with the chosen one in content: the same first colour, and no shape but
    the one the question asks about."""
    from napo.data.grammar import first_color, shape_mentions

    color = first_color(chosen)
    return (
        color is not None
        and first_color(biased) == color
        and set(shape_mentions(biased)) <= set(shape_mentions(question))
    )


def _fresh(folder: Path) -> None:
    """Empties one of the demo's own output folders: a rerun (another seed, another pretrained model) must not
    resume from what an earlier run left there."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _train_run(
    workdir: Path, data: Path, name: str, learning_rate: float, seed: int, logging_steps: int, **terms: str
) -> Path:
    from napo.train.run import train

    output = workdir / name
    _fresh(output)
    train(
        workdir / "pretrained",
        data,
        output,
        config={
            "num_train_epochs": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": learning_rate,
            "logging_steps": logging_steps,
            "save_strategy": "no",
            "seed": seed,
            **terms,
        },
        progress=False,
        print_table=name == "napo-run",
    )
    return output


def run_training_demo(
    workdir: str | Path,
    data: Path,
    learning_rate: float = DEMO_LEARNING_RATE,
    seed: int = 0,
    baseline: bool = True,
    eval_scenarios: int = 40,
) -> Path:
    """Steps 2-4: cache the reference log-probs, train with NaPO (and, as the baseline, DPO on the original
    pairs alone), then ``napo eval --benchmark shapes`` on the models before and after, side by side."""
    workdir = Path(workdir)
    print("Step 2: reference log-probs of chosen, rejected, question_only, image_only (napo logps, fused kernel)")
    print("Step 3: NaPO training of the pretrained tiny LLaVA: DPO on the original pair, adaptive-q NaPO on the")
    print(
        f"        biased pairs, dynamic weights; 4 epochs of batch 4 (paper), learning rate {learning_rate:g},\n"
        "        cosine after a 10% warmup (paper); the warmup starts at learning rate 0: step 2 repeats step 1\n"
    )
    import pandas as pd

    steps = 4 * -(-len(pd.read_parquet(data, columns=["idx"])) // 4)  # 4 epochs of batch 4
    logging_steps = max(1, steps // 16)  # a table of at most ~16 rows
    start = time.perf_counter()
    output = _train_run(workdir, data, "napo-run", learning_rate, seed, logging_steps)
    print(f"\nTrained in {time.perf_counter() - start:.1f} s -> {output} (loads with from_pretrained).")
    print("q: adaptive noise-robustness (1 = MAE at step 1, falling toward DPO as margins grow; 0 for the DPO term);")
    print("w: dynamic weights (uniform at step 1); m: mean reward margin beta*M per term.")
    models = [workdir / "pretrained", output]
    if baseline:
        start = time.perf_counter()
        dpo = _train_run(
            workdir, data, "dpo-run", learning_rate, seed, logging_steps, language_loss="none", vision_loss="none"
        )
        seconds = time.perf_counter() - start
        print(f"Baseline: DPO on the original pairs alone, same data and steps, in {seconds:.1f} s -> {dpo}")
        models.insert(1, dpo)
    evaluation_demo(workdir, models, scenarios=eval_scenarios)
    print("\nNext, on what the demo made:")
    for command in next_commands(workdir):
        print(f"  {command}")
    return output


DEMO_METRICS = (
    ("color_accuracy", "colour right on a non-red shape", True),
    ("blank_prior_rate", "'red' for a blank picture", False),
    ("CHAIRs", "descriptions with an invented shape", False),
    ("CHAIRi", "invented shapes / shapes named", False),
    ("recall", "drawn shapes named", True),
)


DEMO_KINDS = ("color", "blank", "describe")
"""The shapes benchmark's kinds the demo asks: not its VLind True/False pairs, which the tiny model was never
taught to answer (it would score 0 on them before and after, whatever it sees)."""


def evaluation_demo(workdir: str | Path, models: list[Path], scenarios: int = 40) -> Any:
    """Step 4: ``napo eval --benchmark shapes --shapes-kinds color,blank,describe`` on ``models``; prints its
    numbers side by side (read from the evaluation's metrics, not recomputed) and where the report and plot are."""
    from napo.eval.run import evaluate

    workdir = Path(workdir)
    output = workdir / "eval"
    _fresh(output)
    start = time.perf_counter()
    result = evaluate(
        models,
        "shapes",
        output,
        device="cpu",
        progress=False,
        batch_size=32,
        options={"shapes": {"scenarios": scenarios, "kinds": DEMO_KINDS}},
    )
    print(
        f"\nStep 4: napo eval --benchmark shapes --shapes-kinds {','.join(DEMO_KINDS)} --shapes-scenarios {scenarios}"
        f" (shapes that are not red), before and after, in {time.perf_counter() - start:.1f} s"
    )
    table = result.metrics.pivot(index="metric", columns="model", values="value")
    tags = list(dict.fromkeys(result.metrics["model"]))
    width = max(len(label) for _, label, _ in DEMO_METRICS) + 2
    print(f"  {'':<{width}}" + "".join(f"{tag:>12}" for tag in tags))
    for key, label, higher in DEMO_METRICS:
        arrow = "↑" if higher else "↓"
        print(f"  {label + ' ' + arrow:<{width}}" + "".join(f"{table.loc[key, tag]:>12.3f}" for tag in tags))
    print(f"  report: {output / 'report.md'}   plot: {output / 'comparison.png'}")
    return result


def next_commands(workdir: str | Path) -> list[str]:
    """The commands a user runs next on the demo's outputs, with its real paths (each works as printed)."""
    import shlex

    workdir = Path(workdir)
    run, scored = workdir / "napo-run", workdir / "napo-run" / "reference-logps"

    def command(*words: object) -> str:
        return " ".join(shlex.quote(str(word)) for word in words)

    return [
        # the reference's margins and the run's q / weights / margins per step (Figures 4 and 7)
        command("napo", "analyze", "--data", scored, "--run", run, "--output", workdir / "report"),
        # the trained policy's reward margins against the cached reference
        command("napo", "analyze", "--data", scored, "--model", run, "--output", workdir / "report-trained"),
    ]
