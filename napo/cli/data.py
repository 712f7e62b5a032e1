"""The data commands: ``napo generate`` (the biased answers), ``make-sample-data`` and ``make-tiny-model``."""

from __future__ import annotations

import argparse
import sys

from napo.cli.args import (
    add_prompt_format_argument,
    add_run_arguments,
    output_dir,
    positive_int,
    run_options,
    run_stage,
    say_prompt_format,
    seed,
)


def add_generate_parser(commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="write language-biased (question_only) and vision-biased (image_only) answers for an RLAIF-V-style set",
    )
    generate.add_argument(
        "--model",
        required=True,
        help="vision-language checkpoint directory (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Gemma 3, "
        "Idefics3/SmolVLM), or hub id where reachable",
    )
    generate.add_argument("--data", required=True, help="Parquet file, directory of Parquet files, or saved dataset")
    generate.add_argument("--output", required=True, type=output_dir, help="output directory (rerunning resumes)")
    generate.add_argument("--batch-size", type=positive_int, default=8)
    generate.add_argument("--max-new-tokens", type=positive_int, default=1024)
    generate.add_argument("--num-beams", type=positive_int, default=3)
    generate.add_argument("--blank-images", action="store_true", help="also question_only_white / _black")
    add_prompt_format_argument(generate)
    add_run_arguments(generate)


TINY_LLAVA = "llava"  # make-tiny-model's default architecture: the tiny LLaVA-1.5 (napo.data.tiny)


def add_tiny_model_parser(commands) -> None:
    from napo.data.tiny_families import FAMILIES

    tiny = commands.add_parser(
        "make-tiny-model",
        help="write a tiny random vision-language checkpoint (offline) to a directory: the tiny LLaVA-1.5 (random, "
        "or pretrained with --pretrain) or, with --arch, one of the other supported families",
    )
    tiny.add_argument("path")
    tiny.add_argument(
        "--arch",
        choices=(TINY_LLAVA, *FAMILIES),
        default=TINY_LLAVA,
        help="the model family: llava (LLaVA-1.5, the default), qwen2-vl, qwen2.5-vl, llava-next, gemma3, idefics3",
    )
    tiny.add_argument("--seed", type=seed, default=0)
    tiny.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain it on the sample world (under a minute on CPU; --arch llava only): it sees colours, yet "
        "answers colour questions from a language prior ('red') when the image is missing and often when it is not",
    )
    tiny.set_defaults(tiny_model_parser=tiny)  # run_tiny_model reports --pretrain with another --arch through it


def add_sample_data_parser(commands) -> None:
    sample = commands.add_parser("make-sample-data", help="write the embedded RLAIF-V-schema sample set as Parquet")
    sample.add_argument("path")
    sample.add_argument("--rows", type=positive_int, default=32)
    sample.add_argument("--seed", type=seed, default=0)


def run_generate(args: argparse.Namespace) -> int:
    from napo.data import generate_biased

    say_prompt_format("generate", args.prompt_format or "template")
    return run_stage(
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
            **run_options(args),
        ),
    )


def run_tiny_model(args: argparse.Namespace) -> int:
    if args.pretrain and args.arch != TINY_LLAVA:
        args.tiny_model_parser.error(
            f"--pretrain pretrains the tiny LLaVA-1.5 only, not --arch {args.arch}; leave out --pretrain for a random "
            f"{args.arch} checkpoint, or use --arch {TINY_LLAVA}"
        )
    if args.arch != TINY_LLAVA:
        from napo.data.tiny_families import make_tiny_family_model

        print(f"tiny {args.arch} written to {make_tiny_family_model(args.arch, args.path, seed=args.seed)}")
        return 0
    if args.pretrain:
        from napo.data.world import write_pretrained_model

        try:
            written = write_pretrained_model(args.path, seed=args.seed)
        except FileExistsError as problem:
            print(f"napo make-tiny-model: {problem}", file=sys.stderr)
            return 2
        print(f"pretrained tiny LLaVA written to {written} (napo_world.json: its recipe and measured prior)")
        return 0
    from napo.data import make_tiny_model

    print(f"tiny LLaVA written to {make_tiny_model(args.path, seed=args.seed)}")
    return 0


def run_sample_data(args: argparse.Namespace) -> int:
    from napo.data import make_sample_data

    print(f"{args.rows} sample rows written to {make_sample_data(args.path, rows=args.rows, seed=args.seed)}")
    return 0


COMMANDS = {"generate": run_generate, "make-tiny-model": run_tiny_model, "make-sample-data": run_sample_data}
