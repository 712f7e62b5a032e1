"""Accuracy of float32 sequence log-probs and their gradients against the float64 truth.

For random logits (scale 3, like tests/test_logps.py) and several vocabulary sizes, each variant
computes TRL's quantity (weighted sum and mean of answer-token log-probs) and its gradient with
respect to float32 logits; the error is measured against the same recipe run in float64:
  torch-recipe    log_softmax + gather in float32 (TRL's get_batch_logps)
  trl-selective   TRL's selective_log_softmax (when trl is installed)
  napo            napo.sequence_logps
Reported per (vocab, variant), worst over the inputs: the gradient's max absolute error in
float32 ulps of the largest gradient (eps * max |grad|), and the log-prob sums' max relative error.

Run: python benchmarks/accuracy_logps.py [--inputs N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform

import torch

import napo

IGNORE = -100


def recipe(logits: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
    labels = labels[:, 1:].clone()
    mask = labels != IGNORE
    labels[~mask] = 0
    per_token = torch.gather(logits[:, :-1].to(dtype).log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    logps = (per_token * mask).sum(-1)
    return logps, logps / mask.sum(-1)


def trl_selective(logits: torch.Tensor, labels: torch.Tensor):
    from trl.trainer.utils import selective_log_softmax

    labels = labels[:, 1:].clone()
    mask = labels != IGNORE
    labels[~mask] = 0
    per_token = selective_log_softmax(logits[:, :-1], labels)
    logps = (per_token * mask).sum(-1)
    return logps, logps / mask.sum(-1)


def gradient(fn, logits, labels, weights):
    leaf = logits.detach().clone().requires_grad_(True)
    logps, avg = fn(leaf, labels)
    (weights[0].to(logps.dtype) * logps + weights[1].to(logps.dtype) * avg).sum().backward()
    return logps.detach().double(), leaf.grad.double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100, help="random inputs per vocabulary size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    variants = {"torch-recipe": lambda x, y: recipe(x, y, torch.float32), "napo": napo.sequence_logps}
    try:
        import trl.trainer.utils  # noqa: F401

        variants["trl-selective"] = trl_selective
    except ImportError:
        pass

    eps = torch.finfo(torch.float32).eps
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    print(f"float32 log-prob accuracy against float64, {name}, torch {torch.__version__}, {args.inputs} inputs each\n")
    print("| B, T, V | variant | worst grad error (ulps) | mean grad error (ulps) | worst logps rel. error |")
    print("|---|---|---:|---:|---:|")
    for batch, time_, vocab in [(4, 64, 13), (4, 64, 123), (4, 32, 4099), (2, 16, 32000), (2, 8, 128256)]:
        worst = {key: [0.0, 0.0, 0.0] for key in variants}
        for seed in range(args.inputs):
            generator = torch.Generator().manual_seed(seed)
            logits = (3.0 * torch.randn(batch, time_, vocab, generator=generator)).to(device)
            labels = torch.randint(0, vocab, (batch, time_), generator=generator)
            labels[torch.rand(batch, time_, generator=generator) < 0.3] = IGNORE
            labels[:, 1] = torch.randint(0, vocab, (batch,), generator=generator)
            labels = labels.to(device)
            weights = torch.rand(2, batch, generator=generator).to(device)
            true_logps, true_grad = gradient(lambda x, y: recipe(x, y, torch.float64), logits, labels, weights)
            ulp = eps * true_grad.abs().max().item()
            for key, fn in variants.items():
                logps, grad = gradient(fn, logits, labels, weights)
                grad_error = (grad - true_grad).abs().max().item() / ulp
                logps_error = ((logps - true_logps).abs() / true_logps.abs()).max().item()
                worst[key][0] = max(worst[key][0], grad_error)
                worst[key][1] += grad_error / args.inputs
                worst[key][2] = max(worst[key][2], logps_error)
        for key, (grad_worst, grad_mean, logps_worst) in worst.items():
            print(f"| {batch}, {time_}, {vocab} | {key} | {grad_worst:.2f} | {grad_mean:.2f} | {logps_worst:.1e} |")


if __name__ == "__main__":
    main()
