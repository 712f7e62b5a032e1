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


def run_data_demo(workdir: str | Path, rows: int = 16, max_new_tokens: int = 16) -> Path | None:
    """Tiny LLaVA + sample set -> biased answers under ``workdir``; prints a few rows. None if the
    data extras are missing."""
    try:
        import pandas as pd

        from napo.data import generate_biased, make_sample_data, make_tiny_model
    except ImportError as error:
        print(f"(skipping the data step: {error}; install napo[data] for it)\n")
        return None
    workdir = Path(workdir)
    model_dir = workdir / "tiny-llava"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir)
    data = make_sample_data(workdir / "sample.parquet", rows=rows)
    output = workdir / "rlaif-v-bias"
    summary = generate_biased(
        model_dir, data, output, batch_size=8, max_new_tokens=max_new_tokens, device="cpu", progress=False
    )
    print(
        f"Step 1: {summary.written} rows answered ({summary.already_done} already done) by the tiny LLaVA "
        f"in {summary.seconds:.1f} s -> {output}"
    )
    frame = pd.read_parquet(output).sort_values("idx").head(3)
    for _, row in frame.iterrows():
        print(f"  [{row['idx']}] {row['question']}")
        print(f"      chosen:        {row['chosen']}")
        print(f"      question_only: {row['question_only'][:60]!r}  (no image: language-biased)")
        print(f"      image_only:    {row['image_only'][:60]!r}  (no question: vision-biased)")
    print("  (the tiny model is random, so its answers are noise: the pipeline is what is shown)\n")
    return output


def run_training_demo(workdir: str | Path, data: Path, learning_rate: float = 1e-3, seed: int = 0) -> Path:
    """Steps 2 and 3: cache the reference log-probs, then train the tiny LLaVA with NaPO; prints a table per step."""
    from napo.train.run import train

    workdir = Path(workdir)
    output = workdir / "napo-run"
    print("Step 2: reference log-probs of chosen, rejected, question_only, image_only (napo logps, fused kernel)")
    print("Step 3: NaPO training of the tiny LLaVA: DPO on the original pair, adaptive-q NaPO on the biased pairs,")
    print(
        f"        dynamic weights; 4 epochs of batch 4 (paper), learning rate {learning_rate:g} (tiny random model),\n"
        "        cosine after a 10% warmup (paper); the warmup starts at learning rate 0: step 2 repeats step 1\n"
    )
    start = time.perf_counter()
    train(
        workdir / "tiny-llava",
        data,
        output,
        config={
            "num_train_epochs": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": learning_rate,
            "logging_steps": 1,
            "save_strategy": "no",
            "seed": seed,
        },
        progress=False,
    )
    print(f"\nTrained in {time.perf_counter() - start:.1f} s -> {output} (loads with from_pretrained).")
    print("q: adaptive noise-robustness (1 = MAE at step 1, falling toward DPO as margins grow; 0 for the DPO term);")
    print("w: dynamic weights (uniform at step 1); m: mean reward margin beta*M per term.")
    print("\nNext, on what the demo made:")
    for command in next_commands(workdir):
        print(f"  {command}")
    return output


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
