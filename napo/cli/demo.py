"""``napo demo`` (the whole method on the embedded defaults) and ``napo doctor``."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from napo.cli.args import positive_float, positive_int, seed


def add_parsers(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole method on the embedded defaults: a tiny LLaVA pretrained with a language prior, its "
        "biased answers to the sample set, reference log-probs, NaPO training (q, weights, margins per step), a "
        "DPO baseline, and napo eval --benchmark shapes before and after",
    )
    demo.add_argument("--steps", type=positive_int, default=40, help="(--objective-only) steps of the toy run")
    demo.add_argument("--batch-size", type=positive_int, default=32, help="(--objective-only) toy batch size")
    demo.add_argument("--learning-rate", type=positive_float, default=None, help="default 5e-5 (0.05 for the toy)")
    demo.add_argument("--beta", type=positive_float, default=0.1)
    demo.add_argument("--seed", type=seed, default=0)
    demo.add_argument("--device", default="cpu", help="(--objective-only) cpu, cuda or cuda:N")
    demo.add_argument("--workdir", default="napo-demo", help="where the tiny model, sample set and answers go")
    demo.add_argument("--rows", type=positive_int, default=64, help="rows of the sample set the demo trains on")
    demo.add_argument("--no-baseline", action="store_true", help="skip the DPO baseline run")
    demo.add_argument(
        "--eval-scenarios", type=positive_int, default=40, help="shapes benchmark scenarios of the before/after eval"
    )
    demo.add_argument(
        "--objective-only", action="store_true", help="only the objective, on a simulated toy policy (no model)"
    )


def add_doctor_parser(commands) -> None:
    commands.add_parser(
        "doctor",
        help="print versions and native backends, and check napo's kernels against the reference on every GPU "
        "(the CPU kernels without one); exit 1 when a check fails",
    )


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from napo import _native
    from napo.demo import run_data_demo, run_demo

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"napo demo: --device {args.device} asked for CUDA, but torch sees no CUDA device", file=sys.stderr)
        return 2
    trl_missing = importlib.util.find_spec("trl") is None
    if not args.objective_only and not trl_missing:
        from napo.demo import DEMO_LEARNING_RATE, run_training_demo

        data = run_data_demo(args.workdir, rows=args.rows, seed=args.seed)
        if data is not None:
            run_training_demo(
                args.workdir,
                data,
                learning_rate=args.learning_rate or DEMO_LEARNING_RATE,
                seed=args.seed,
                baseline=not args.no_baseline,
                eval_scenarios=args.eval_scenarios,
            )
            return 0
    if trl_missing and not args.objective_only:
        print("(TRL is not installed: showing the objective alone; pip install 'napo[train]' for the full demo)\n")
    backend = "reference (NAPO_BACKEND)" if _native.use_reference_backend() else "C core (napo._C)"
    print(f"The paper objective (DPO original, adaptive NaPO language/vision) on a toy policy, backend: {backend}\n")
    run_demo(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate or 0.05,
        beta=args.beta,
        seed=args.seed,
        device=args.device,
    )
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from napo.doctor import main as doctor

    return doctor()


COMMANDS = {"demo": run_demo, "doctor": run_doctor}
