"""The training commands: ``napo logps`` (the reference model's log-probs, cached) and ``napo train``."""

from __future__ import annotations

import argparse
import pickle

from napo.cli.args import (
    add_prompt_format_argument,
    add_run_arguments,
    column_list,
    error,
    integer,
    output_dir,
    positive_float,
    positive_int,
    run_options,
    run_stage,
    say_prompt_format,
    seed,
)

# napo train's flags and the NaPOConfig fields they set (over the --config file's).
TRAIN_FLAGS = {
    "max_steps": "max_steps",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "learning_rate": "learning_rate",
    "beta": "beta",
    "save_steps": "save_steps",
    "logging_steps": "logging_steps",
    "seed": "seed",
    "prompt_format": "prompt_format",
}


def add_logps_parser(commands) -> None:
    from napo.train.reference import DEFAULT_MAX_LENGTH

    logps = commands.add_parser(
        "logps", help="cache the reference model's log-probs of every answer (ref_<column>_logps, _avg_logps)"
    )
    logps.add_argument(
        "--model",
        required=True,
        help="reference model: vision-language checkpoint directory (or hub id), as napo generate --model",
    )
    logps.add_argument("--data", required=True, help="napo generate's output (Parquet with the RLAIF-V columns)")
    logps.add_argument("--output", required=True, type=output_dir, help="output directory (rerunning resumes)")
    logps.add_argument(
        "--columns", type=column_list, default=None, help="comma-separated answer columns (default: all present)"
    )
    logps.add_argument("--batch-size", type=positive_int, default=8)
    logps.add_argument(
        "--max-length",
        type=integer(0),
        default=DEFAULT_MAX_LENGTH,
        help="truncate prompt + answer as the trainer will (default 2048 = NaPOConfig's max_length; 0: no truncation)",
    )
    add_prompt_format_argument(logps)
    add_run_arguments(logps)


def add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="train with NaPO on napo generate's output (reference log-probs cached first)"
    )
    train.add_argument(
        "--model",
        required=True,
        help="vision-language checkpoint directory (or hub id), as napo generate --model: policy and reference",
    )
    train.add_argument("--data", required=True, help="napo generate / napo logps output")
    train.add_argument(
        "--output", required=True, type=output_dir, help="checkpoints and the final model (rerunning resumes)"
    )
    train.add_argument("--config", default=None, help="JSON or YAML file of NaPOConfig fields")
    train.add_argument("--max-steps", type=positive_int, default=None)
    train.add_argument("--epochs", type=positive_float, default=None, help="paper: 4")
    train.add_argument("--batch-size", type=positive_int, default=None, help="per device; paper: 4")
    train.add_argument("--learning-rate", type=positive_float, default=None, help="paper: 5e-7")
    train.add_argument("--beta", type=positive_float, default=None, help="paper: 0.1")
    train.add_argument("--save-steps", type=positive_int, default=None, help="checkpoint every N steps")
    train.add_argument("--logging-steps", type=positive_int, default=None)
    train.add_argument("--seed", type=seed, default=None)
    train.add_argument("--logps-batch-size", type=positive_int, default=8, help="rows per reference forward")
    add_prompt_format_argument(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run's checkpoints in --output and start again"
    )


def run_logps(args: argparse.Namespace) -> int:
    from napo.train.reference import compute_reference_logps

    say_prompt_format("logps", args.prompt_format or "template")

    def logps():  # compute_reference_logps refuses llava_v1 on another family before the run records anything
        return compute_reference_logps(
            args.model,
            args.data,
            args.output,
            columns=args.columns,
            max_length=args.max_length or None,
            prompt_format=args.prompt_format or "template",
            **run_options(args),
        )

    return run_stage("logps", "scored", logps)


def run_train(args: argparse.Namespace) -> int:
    try:
        from napo.train.run import load_config_file, train
    except ImportError as problem:
        return error("train", problem)
    try:
        config = load_config_file(args.config) if args.config else {}
        config.update(
            {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
        )
        say_prompt_format("train", config.get("prompt_format", "template"))
        output = train(
            args.model,
            args.data,
            args.output,
            config=config,
            logps_batch_size=args.logps_batch_size,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (ValueError, TypeError, OSError, KeyError, ImportError, pickle.UnpicklingError) as problem:
        # OSError: a path the user named (the data, the model) cannot be read; ImportError: the checkpoint's
        # processor or model needs a library that is not installed (transformers names it); UnpicklingError:
        # torch's weights-only loader refused a pickled checkpoint of the policy.
        return error("train", problem)
    print(f"napo train: model saved to {output}")
    return 0


COMMANDS = {"logps": run_logps, "train": run_train}
