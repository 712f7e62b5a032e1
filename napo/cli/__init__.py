"""The ``napo`` command line: one module per command family, each adding its subcommands' parsers and
naming the function that runs each (``COMMANDS``); ``args`` holds what they share."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from napo import _quiet
from napo.cli import analyze, data, demo, train
from napo.cli import eval as evaluation

__all__ = ["build_parser", "main"]

# Every subcommand's runner, by name.
COMMANDS = {**demo.COMMANDS, **data.COMMANDS, **train.COMMANDS, **analyze.COMMANDS, **evaluation.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    from napo._version import __version__

    parser = argparse.ArgumentParser(prog="napo", description="Noise-Aware Preference Optimization (NaPO) toolkit.")
    parser.add_argument("--version", action="version", version=f"napo {__version__}")
    # DeepSpeed's launcher (`deepspeed --module napo train ...`) starts each process as `python -m napo
    # --local_rank=N train ...`; the LOCAL_RANK variable it sets as well is what accelerate reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    # The order of `napo --help`: the pipeline first, then the tools.
    demo.add_parsers(commands)
    data.add_generate_parser(commands)
    train.add_logps_parser(commands)
    train.add_train_parser(commands)
    analyze.add_parser(commands)
    evaluation.add_parser(commands)
    data.add_tiny_model_parser(commands)
    demo.add_doctor_parser(commands)
    data.add_sample_data_parser(commands)
    for command in commands.choices.values():
        command.add_argument("--verbose", action="store_true", help=_quiet.VERBOSE_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet.configure(args.verbose)
    return COMMANDS[args.command](args)
