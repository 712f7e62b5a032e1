"""Argument types and option groups the command families share, and how a command reports an error or a
finished row stage. Public inside ``napo.cli``: each command module imports what it needs from here."""

from __future__ import annotations

import argparse
import sys

__all__ = [
    "add_image_argument",
    "add_prompt_format_argument",
    "add_run_arguments",
    "column_list",
    "error",
    "integer",
    "output_dir",
    "positive_float",
    "positive_int",
    "run_options",
    "run_stage",
    "say_prompt_format",
    "seed",
]


def integer(minimum: int, maximum: int | None = None):
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


def positive_float(text: str) -> float:
    from napo.data.inputs import float_problem

    try:
        value: object = float(text)
    except ValueError:
        value = text
    problem = float_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


positive_int = integer(1)


def seed(text: str) -> int:
    from napo.data.inputs import SEED_RANGE

    return integer(*SEED_RANGE)(text)


def output_dir(text: str) -> str:
    from napo.data.inputs import check_output_dir

    try:
        check_output_dir(text, name="")
    except ValueError as problem:
        raise argparse.ArgumentTypeError(str(problem).strip()) from None
    return text


def column_list(text: str) -> list[str]:
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


def error(command: str, problem: BaseException) -> int:
    """The one line a user error prints (multi-line library messages folded), and exit code 2."""
    text = " ".join(line.strip() for line in str(problem).splitlines() if line.strip())
    print(f"napo {command}: error: {text or type(problem).__name__}", file=sys.stderr)
    return 2


def add_run_arguments(parser: argparse.ArgumentParser, rows: str = "input rows", images: bool = True) -> None:
    """The options every resumable row stage (generate, logps, eval's answers) shares; ``rows`` names what one
    row is in the help, ``images``: also --allow-outside-images (the stage reads the user's image paths)."""
    parser.add_argument("--limit", type=integer(0), default=None, help=f"only the first N {rows}")
    parser.add_argument("--num-shards", type=positive_int, default=None, help="default: WORLD_SIZE or 1")
    parser.add_argument("--shard-index", type=integer(0), default=None, help="default: RANK or 0")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--rows-per-part", type=positive_int, default=256, help="rows per Parquet part file")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if images:
        add_image_argument(parser)


def add_prompt_format_argument(parser: argparse.ArgumentParser) -> None:
    from napo.data.prompts import PROMPT_FORMATS

    parser.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default=None,
        help="template: the checkpoint's chat template (default); llava_v1: the authors' LLaVA-1.5 conversation format "
        "(LLaVA-1.5 checkpoints only: refused on other families)",
    )


def add_image_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="read image paths that point outside the data's directory (../x.png, /abs/path): trusted data only",
    )


def run_options(args: argparse.Namespace) -> dict:
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


def run_stage(command: str, verb: str, run) -> int:
    """Runs a row stage; prints its summary. Exit code 2 on bad input, 1 when no row succeeded."""
    try:
        summary = run()
    except (ValueError, FileNotFoundError, OSError) as problem:
        return error(command, problem)
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


def say_prompt_format(command: str, prompt_format: str) -> None:
    from napo.data.prompts import describe_prompt_format

    print(f"napo {command}: {describe_prompt_format(prompt_format)}")
