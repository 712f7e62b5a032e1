"""The ``napo`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from napo import __version__

    parser = argparse.ArgumentParser(prog="napo", description="Noise-Aware Preference Optimization (NaPO) toolkit.")
    parser.add_argument("--version", action="version", version=f"napo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run the NaPO objective on the embedded example and print q, weights and margins per step"
    )
    demo.add_argument("--steps", type=_positive_int, default=40)
    demo.add_argument("--batch-size", type=_positive_int, default=32)
    demo.add_argument("--learning-rate", type=_positive_float, default=0.05)
    demo.add_argument("--beta", type=_positive_float, default=0.1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        import torch

        from napo import _native
        from napo.demo import run_demo

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print(f"napo demo: --device {args.device} asked for CUDA, but torch sees no CUDA device", file=sys.stderr)
            return 2
        backend = "reference (NAPO_BACKEND)" if _native.use_reference_backend() else "C core (napo._C)"
        print(f"napo demo: paper objective (DPO original, adaptive NaPO language/vision), backend: {backend}\n")
        run_demo(
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            beta=args.beta,
            seed=args.seed,
            device=args.device,
        )
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects unknown commands first
