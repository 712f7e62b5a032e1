"""``napo eval``: models on the paper's benchmarks (and the built-in shapes), reports side by side."""

from __future__ import annotations

import argparse
import sys

from napo.cli.args import add_prompt_format_argument, add_run_arguments, error, output_dir, positive_int


def _temperature(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _benchmark_list(text: str) -> list[str]:
    from napo.eval.run import BENCHMARKS

    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in BENCHMARKS]
    if not all(names) or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated names among {', '.join(BENCHMARKS)}")
    return names


def _shapes_kinds(text: str) -> tuple[str, ...]:
    from napo.eval.shapes import KINDS

    kinds = tuple(kind.strip() for kind in text.split(","))
    if not all(kinds) or any(kind not in KINDS for kind in kinds) or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct comma-separated kinds among {', '.join(KINDS)}")
    return kinds


def _shapes_options(args: argparse.Namespace) -> dict:
    options: dict = {"scenarios": args.shapes_scenarios}
    if args.shapes_kinds is not None:
        options["kinds"] = args.shapes_kinds
    return options


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate models on the paper's benchmarks (and the built-in shapes); reports side by side"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="a vision-language checkpoint (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Gemma 3, Idefics3/SmolVLM); "
        "repeat: models compared side by side",
    )
    parser.add_argument(
        "--benchmark", required=True, type=_benchmark_list, help="comma-separated: vlind,objhal,amber,mmhal,pope,shapes"
    )
    parser.add_argument("--data-dir", default=None, help="folder holding <benchmark>/ with each benchmark's files")
    parser.add_argument("--output", required=True, type=output_dir, help="reports and answers (rerunning resumes)")
    parser.add_argument("--answers", default=None, help="score an earlier run's answers without generating")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: each benchmark's own")
    parser.add_argument("--num-beams", type=positive_int, default=None, help="default: each benchmark's own")
    parser.add_argument(
        "--temperature",
        type=_temperature,
        default=None,
        help="sampling temperature, 0: none (default: each benchmark's own)",
    )
    add_prompt_format_argument(parser)
    parser.add_argument("--shapes-scenarios", type=positive_int, default=12, help="shapes: scenarios (10 items each)")
    parser.add_argument(
        "--shapes-kinds",
        type=_shapes_kinds,
        default=None,
        help="shapes: comma-separated kinds of question kept, among vlind,color,blank,describe (default: all)",
    )
    add_run_arguments(parser, rows="items of each benchmark")  # --allow-outside-images: a linked images/ folder
    parser.add_argument(
        "--judge",
        default="openai",
        choices=["openai", "hf"],
        help="mmhal: an OpenAI-compatible endpoint (NAPO_JUDGE_BASE_URL / _MODEL / _API_KEY) or a local HF model",
    )
    parser.add_argument("--judge-model", default=None, help="mmhal: the judge model (name, or checkpoint for hf)")
    parser.add_argument("--judge-base-url", default=None, help="mmhal: the endpoint (default NAPO_JUDGE_BASE_URL)")


def _judge_options(args: argparse.Namespace) -> dict:
    if "mmhal" not in args.benchmark:
        return {}
    if args.judge == "hf":
        if not args.judge_model:
            raise ValueError("--judge hf needs --judge-model (a local causal LM checkpoint)")
        from napo.eval.mmhal import HFJudge

        return {"mmhal": {"judge": HFJudge(args.judge_model, device=args.device)}}
    from napo.eval.mmhal import OpenAIJudge

    return {"mmhal": {"judge": OpenAIJudge(base_url=args.judge_base_url, model=args.judge_model)}}


def run_eval(args: argparse.Namespace) -> int:
    try:
        from napo.eval import MissingDataError, evaluate
        from napo.eval.nlp import NlpUnavailable
    except ImportError as problem:
        print(f"napo eval: error: {problem} (pip install 'napo[eval]')", file=sys.stderr)
        return 2
    if not args.model and not args.answers:
        print("napo eval: error: give --model (one or more) or --answers", file=sys.stderr)
        return 2
    try:
        judge_options = _judge_options(args)
        result = evaluate(
            args.model,
            args.benchmark,
            args.output,
            data_dir=args.data_dir,
            answers=args.answers,
            options={"shapes": _shapes_options(args), **judge_options},
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            temperature=args.temperature,
            prompt_format=args.prompt_format or "template",
            limit=args.limit,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            device=args.device,
            dtype=args.dtype,
            rows_per_part=args.rows_per_part,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            allow_outside_images=args.allow_outside_images,
        )
    except MissingDataError as problem:
        print(f"napo eval: error: {problem}", file=sys.stderr)  # the list of missing files, one per line
        return 2
    except (ValueError, OSError, KeyError, NlpUnavailable) as problem:
        return error("eval", problem)
    for tag, name, summary in result.summaries:
        print(
            f"napo eval: {tag} / {name}: {summary.written} answered, {summary.failed} skipped with errors, "
            f"{summary.already_done} already done, {summary.seconds:.1f} s"
        )
        if summary.failed:
            print(f"napo eval: the skipped items and why are in {summary.output_dir}/__napo__/errors.jsonl")
    print(f"napo eval: report written to {result.report}")
    nothing = result.summaries and all(s.written == 0 and s.already_done == 0 for _, _, s in result.summaries)
    return 1 if nothing else 0


COMMANDS = {"eval": run_eval}
