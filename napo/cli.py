"""The ``napo`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import sys
from collections.abc import Sequence

from napo import _quiet


def _integer(minimum: int, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum], with the range in the error (the ranges are
    those the Python functions enforce, through the same check)."""
    from napo.data.inputs import int_problem

    def parse(text: str) -> int:
        try:
            value: object = int(text)
        except ValueError:
            value = text
        problem = int_problem(value, minimum, maximum)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _positive_float(text: str) -> float:
    from napo.data.inputs import float_problem

    try:
        value: object = float(text)
    except ValueError:
        value = text
    problem = float_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


_positive_int = _integer(1)


def _seed(text: str) -> int:
    from napo.data.inputs import SEED_RANGE

    return _integer(*SEED_RANGE)(text)


def _output_dir(text: str) -> str:
    from napo.data.inputs import check_output_dir

    try:
        check_output_dir(text, name="")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).strip()) from None
    return text


def _column_list(text: str) -> list[str]:
    """--columns: comma-separated names, each non-empty and given once."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"an empty column name in {text!r}; give comma-separated names, e.g. chosen,rejected"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"column(s) {', '.join(repeated)} given more than once in {text!r}")
    return names


def _error(command: str, error: BaseException) -> int:
    """The one line a user error prints (multi-line library messages folded), and exit code 2."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    print(f"napo {command}: error: {text or type(error).__name__}", file=sys.stderr)
    return 2


def _add_run_arguments(parser: argparse.ArgumentParser, rows: str = "input rows", images: bool = True) -> None:
    """The options every resumable row stage (generate, logps, eval's answers) shares; ``rows`` names what one
    row is in the help, ``images``: also --allow-outside-images (the stage reads the user's image paths)."""
    parser.add_argument("--limit", type=_integer(0), default=None, help=f"only the first N {rows}")
    parser.add_argument("--num-shards", type=_positive_int, default=None, help="default: WORLD_SIZE or 1")
    parser.add_argument("--shard-index", type=_integer(0), default=None, help="default: RANK or 0")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--rows-per-part", type=_positive_int, default=256, help="rows per Parquet part file")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if images:
        _add_image_argument(parser)


def _add_prompt_format_argument(parser: argparse.ArgumentParser) -> None:
    from napo.data.prompts import PROMPT_FORMATS

    parser.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default=None,
        help="template: the checkpoint's chat template (default); llava_v1: the authors' LLaVA-1.5 conversation format",
    )


def _add_image_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="read image paths that point outside the data's directory (../x.png, /abs/path): trusted data only",
    )


def _run_options(args: argparse.Namespace) -> dict:
    return {
        "batch_size": args.batch_size,
        "limit": args.limit,
        "num_shards": args.num_shards,
        "shard_index": args.shard_index,
        "device": args.device,
        "dtype": args.dtype,
        "rows_per_part": args.rows_per_part,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
        "allow_outside_images": args.allow_outside_images,
    }


def _run_stage(command: str, verb: str, run) -> int:
    """Runs a row stage; prints its summary. Exit code 2 on bad input, 1 when no row succeeded."""
    try:
        summary = run()
    except (ValueError, FileNotFoundError, OSError) as error:
        return _error(command, error)
    print(
        f"napo {command}: shard {summary.shard_index}/{summary.num_shards}: {summary.written} rows {verb}, "
        f"{summary.failed} skipped with errors, {summary.already_done} already done, "
        f"{summary.seconds:.1f} s ({summary.rows_per_second:.2f} rows/s) -> {summary.output_dir}"
    )
    if summary.failed:
        from napo.data.store import ERRORS

        print(f"napo {command}: the skipped rows and why are in {summary.output_dir / ERRORS}")
    nothing_succeeded = summary.written == 0 and summary.already_done == 0 and summary.failed > 0
    return 1 if nothing_succeeded else 0


def _add_eval_parser(commands) -> None:
    from napo.eval.cli import add_arguments

    add_arguments(commands.add_parser(
        "eval", help="evaluate models on the paper's benchmarks (and the built-in shapes); reports side by side"
    ))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from napo import __version__
    from napo.train.reference import DEFAULT_MAX_LENGTH

    parser = argparse.ArgumentParser(prog="napo", description="Noise-Aware Preference Optimization (NaPO) toolkit.")
    parser.add_argument("--version", action="version", version=f"napo {__version__}")
    # DeepSpeed's launcher (`deepspeed --module napo train ...`) starts each process as `python -m napo
    # --local_rank=N train ...`; the LOCAL_RANK variable it sets as well is what accelerate reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="the whole method on the embedded defaults: a tiny LLaVA pretrained with a language prior, its "
        "biased answers to the sample set, reference log-probs, NaPO training (q, weights, margins per step), a "
        "DPO baseline, and napo eval --benchmark shapes before and after",
    )
    demo.add_argument("--steps", type=_positive_int, default=40, help="(--objective-only) steps of the toy run")
    demo.add_argument("--batch-size", type=_positive_int, default=32, help="(--objective-only) toy batch size")
    demo.add_argument("--learning-rate", type=_positive_float, default=None, help="default 5e-5 (0.05 for the toy)")
    demo.add_argument("--beta", type=_positive_float, default=0.1)
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--device", default="cpu", help="(--objective-only) cpu, cuda or cuda:N")
    demo.add_argument("--workdir", default="napo-demo", help="where the tiny model, sample set and answers go")
    demo.add_argument("--rows", type=_positive_int, default=64, help="rows of the sample set the demo trains on")
    demo.add_argument("--no-baseline", action="store_true", help="skip the DPO baseline run")
    demo.add_argument(
        "--eval-scenarios", type=_positive_int, default=40, help="shapes benchmark scenarios of the before/after eval"
    )
    demo.add_argument(
        "--objective-only", action="store_true", help="only the objective, on a simulated toy policy (no model)"
    )

    generate = commands.add_parser(
        "generate",
        help="write language-biased (question_only) and vision-biased (image_only) answers for an RLAIF-V-style set",
    )
    generate.add_argument("--model", required=True, help="LLaVA checkpoint directory (or hub id where reachable)")
    generate.add_argument("--data", required=True, help="Parquet file, directory of Parquet files, or saved dataset")
    generate.add_argument("--output", required=True, type=_output_dir, help="output directory (rerunning resumes)")
    generate.add_argument("--batch-size", type=_positive_int, default=8)
    generate.add_argument("--max-new-tokens", type=_positive_int, default=1024)
    generate.add_argument("--num-beams", type=_positive_int, default=3)
    generate.add_argument("--blank-images", action="store_true", help="also question_only_white / _black")
    _add_prompt_format_argument(generate)
    _add_run_arguments(generate)

    logps = commands.add_parser(
        "logps", help="cache the reference model's log-probs of every answer (ref_<column>_logps, _avg_logps)"
    )
    logps.add_argument("--model", required=True, help="reference model: LLaVA checkpoint directory (or hub id)")
    logps.add_argument("--data", required=True, help="napo generate's output (Parquet with the RLAIF-V columns)")
    logps.add_argument("--output", required=True, type=_output_dir, help="output directory (rerunning resumes)")
    logps.add_argument(
        "--columns", type=_column_list, default=None, help="comma-separated answer columns (default: all present)"
    )
    logps.add_argument("--batch-size", type=_positive_int, default=8)
    logps.add_argument(
        "--max-length",
        type=_integer(0),
        default=DEFAULT_MAX_LENGTH,
        help="truncate prompt + answer as the trainer will (default 2048 = NaPOConfig's max_length; 0: no truncation)",
    )
    _add_prompt_format_argument(logps)
    _add_run_arguments(logps)

    train = commands.add_parser(
        "train", help="train with NaPO on napo generate's output (reference log-probs cached first)"
    )
    train.add_argument("--model", required=True, help="LLaVA checkpoint directory (or hub id): policy and reference")
    train.add_argument("--data", required=True, help="napo generate / napo logps output")
    train.add_argument(
        "--output", required=True, type=_output_dir, help="checkpoints and the final model (rerunning resumes)"
    )
    train.add_argument("--config", default=None, help="JSON or YAML file of NaPOConfig fields")
    train.add_argument("--max-steps", type=_positive_int, default=None)
    train.add_argument("--epochs", type=_positive_float, default=None, help="paper: 4")
    train.add_argument("--batch-size", type=_positive_int, default=None, help="per device; paper: 4")
    train.add_argument("--learning-rate", type=_positive_float, default=None, help="paper: 5e-7")
    train.add_argument("--beta", type=_positive_float, default=None, help="paper: 0.1")
    train.add_argument("--save-steps", type=_positive_int, default=None, help="checkpoint every N steps")
    train.add_argument("--logging-steps", type=_positive_int, default=None)
    train.add_argument("--seed", type=_seed, default=None)
    train.add_argument("--logps-batch-size", type=_positive_int, default=8, help="rows per reference forward")
    _add_prompt_format_argument(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run's checkpoints in --output and start again"
    )

    analyze = commands.add_parser(
        "analyze", help="a Markdown report (tables + PNG figures) of margins, q and noise for a dataset and a run"
    )
    analyze.add_argument("--data", required=True, help="napo generate / napo logps output")
    analyze.add_argument(
        "--output", required=True, type=_output_dir, help="where report.md, margins.csv and the figures go"
    )
    analyze.add_argument("--model", default=None, help="scores the reference columns if missing, else the policy")
    analyze.add_argument("--run", default=None, help="a napo train output directory or trainer_state.json")
    analyze.add_argument("--noise-labels", default=None, help="a column of the data, or a CSV/JSON/Parquet file")
    analyze.add_argument("--top", type=_positive_int, default=10, help="rows per noise ranking")
    analyze.add_argument("--batch-size", type=_positive_int, default=8)
    analyze.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    analyze.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    analyze.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_image_argument(analyze)

    _add_eval_parser(commands)

    tiny = commands.add_parser(
        "make-tiny-model", help="write the tiny LLaVA (offline) to a directory: random, or pretrained (--pretrain)"
    )
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=_seed, default=0)
    tiny.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain it on the sample world (under a minute on CPU): it sees colours, yet answers colour "
        "questions from a language prior ('red') when the image is missing and often when it is not",
    )

    commands.add_parser(
        "doctor",
        help="print versions and native backends, and check napo's kernels against the reference on every GPU "
        "(the CPU kernels without one); exit 1 when a check fails",
    )

    sample = commands.add_parser("make-sample-data", help="write the embedded RLAIF-V-schema sample set as Parquet")
    sample.add_argument("path")
    sample.add_argument("--rows", type=_positive_int, default=32)
    sample.add_argument("--seed", type=_seed, default=0)
    for command in commands.choices.values():
        command.add_argument("--verbose", action="store_true", help=_quiet.VERBOSE_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet.configure(args.verbose)
    if args.command == "demo":
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
        print(
            f"The paper objective (DPO original, adaptive NaPO language/vision) on a toy policy, backend: {backend}\n"
        )
        run_demo(
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate or 0.05,
            beta=args.beta,
            seed=args.seed,
            device=args.device,
        )
        return 0
    if args.command == "doctor":
        from napo.doctor import main as doctor

        return doctor()
    if args.command == "generate":
        return _generate(args)
    if args.command == "logps":
        return _logps(args)
    if args.command == "train":
        return _train(args)
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "eval":
        from napo.eval.cli import run_eval

        return run_eval(args)
    if args.command == "make-tiny-model":
        if args.pretrain:
            from napo.data.world import write_pretrained_model

            try:
                written = write_pretrained_model(args.path, seed=args.seed)
            except FileExistsError as error:
                print(f"napo make-tiny-model: {error}", file=sys.stderr)
                return 2
            print(f"pretrained tiny LLaVA written to {written} (napo_world.json: its recipe and measured prior)")
            return 0
        from napo.data import make_tiny_model

        print(f"tiny LLaVA written to {make_tiny_model(args.path, seed=args.seed)}")
        return 0
    if args.command == "make-sample-data":
        from napo.data import make_sample_data

        print(f"{args.rows} sample rows written to {make_sample_data(args.path, rows=args.rows, seed=args.seed)}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects unknown commands first


def _say_prompt_format(command: str, prompt_format: str) -> None:
    from napo.data.prompts import describe_prompt_format

    print(f"napo {command}: {describe_prompt_format(prompt_format)}")


def _generate(args: argparse.Namespace) -> int:
    from napo.data import generate_biased

    _say_prompt_format("generate", args.prompt_format or "template")
    return _run_stage(
        "generate",
        "written",
        lambda: generate_biased(
            args.model,
            args.data,
            args.output,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            blank_images=args.blank_images,
            prompt_format=args.prompt_format or "template",
            **_run_options(args),
        ),
    )


def _logps(args: argparse.Namespace) -> int:
    from napo.train.reference import compute_reference_logps

    _say_prompt_format("logps", args.prompt_format or "template")
    return _run_stage(
        "logps",
        "scored",
        lambda: compute_reference_logps(
            args.model,
            args.data,
            args.output,
            columns=args.columns,
            max_length=args.max_length or None,
            prompt_format=args.prompt_format or "template",
            **_run_options(args),
        ),
    )


_TRAIN_FLAGS = {
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


def _train(args: argparse.Namespace) -> int:
    try:
        from napo.train.run import load_config_file, train
    except ImportError as error:
        return _error("train", error)
    try:
        config = load_config_file(args.config) if args.config else {}
        config.update(
            {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
        )
        _say_prompt_format("train", config.get("prompt_format", "template"))
        output = train(
            args.model,
            args.data,
            args.output,
            config=config,
            logps_batch_size=args.logps_batch_size,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (ValueError, TypeError, OSError, KeyError, pickle.UnpicklingError) as error:
        # OSError: a path the user named (the data, the model) cannot be read; UnpicklingError: torch's
        # weights-only loader refused a pickled checkpoint of the policy.
        return _error("train", error)
    print(f"napo train: model saved to {output}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    try:
        from napo.analysis import analyze
    except ImportError as error:
        print(f"napo analyze: error: {error} (pip install 'napo[analysis]')", file=sys.stderr)
        return 2
    try:
        report = analyze(
            args.data,
            args.output,
            model=args.model,
            run=args.run,
            noise_labels=args.noise_labels,
            top=args.top,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
            allow_outside_images=args.allow_outside_images,
        )
    except (ValueError, OSError, KeyError) as error:
        return _error("analyze", error)
    print(f"napo analyze: report written to {report}")
    return 0
