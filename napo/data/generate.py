"""Writing the biased answers (RLAIF-V -> RLAIF-V-Bias) with a HuggingFace vision-language model (LLaVA-1.5,
LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Gemma 3, Idefics3 / SmolVLM).

For every row of an RLAIF-V-style preference set the model writes a language-biased answer
(``question_only``: the question, no image) and a vision-biased answer (``image_only``: the
image, no question), through its own chat template and processor (which decide where the image goes,
how many tokens it becomes and which per-image tensors travel with it); optionally the question with an
all-white or all-black image (``question_only_white`` / ``question_only_black``). Paper defaults: greedy beam
search with ``num_beams=3`` and ``max_new_tokens=1024``.

Runs are batched (left padding, rows grouped by question length inside a window so that padding
stays small), sharded (``num_shards`` / ``shard_index``, or the ``WORLD_SIZE`` / ``RANK`` that
torchrun and accelerate set), and resumable: finished rows go to Parquet part files written
atomically (temporary file, fsync, rename), so a run killed at any moment and rerun ends with
every row exactly once. Rows that cannot be processed (undecodable image, empty question, a
generation error) are logged to ``__napo__/errors.jsonl`` (a folder Parquet and `datasets` readers
skip) and skipped. An image given by path is read only from inside the data's directory unless
``allow_outside_images`` says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from napo.data.inputs import REQUIRED_COLUMNS, check_idx_values, check_int, check_rlaif_schema
from napo.data.prompts import (
    check_checkpoint_prompt_format,
    check_prompt_format,
    tokenize_prompts,
    user_prompt,
)
from napo.data.store import (
    RowError,
    RowJob,
    RunSummary,
    check_run_options,
    extend_schema,
    open_input,
    run_rows,
    start_run,
)
from napo.models.loading import (  # noqa: F401  (also imported from here: their old home)
    decode_image,
    image_path,
    load_model,
    load_weights,
    resolve_device,
    resolve_dtype,
)

GenerationSummary = RunSummary  # the name this module's callers know

__all__ = ["REQUIRED_COLUMNS", "GenerationSettings", "decode_image", "generate_biased", "load_model"]

MANIFEST = "generate.json"  # in the output's __napo__/ folder


SAMPLING_SEED = 0
"""The seed each sampled generate call starts from."""


@dataclass(frozen=True)
class GenerationSettings:
    """What decides the answers; a rerun into the same output must use the same settings."""

    max_new_tokens: int = 1024
    num_beams: int = 3
    blank_images: bool = False
    prompt_format: str = "template"
    temperature: float = 0.0  # 0: no sampling (the paper's biased answers); > 0: sampled, seeded per call

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("num_beams", self.num_beams, 1)
        check_prompt_format(self.prompt_format)
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")

    def recorded(self) -> dict:
        """The settings as the manifest records them; options at their defaults are left out, so that
        outputs written before the options existed still resume."""
        values = asdict(self)
        for name, default in (("prompt_format", "template"), ("temperature", 0.0)):
            if values[name] == default:
                del values[name]
        return values

    @property
    def columns(self) -> tuple[str, ...]:
        extra = ("question_only_white", "question_only_black") if self.blank_images else ()
        return ("question_only", "image_only", *extra)


# ---------------------------------------------------------------- input


def check_input(source: Any, limit: int | None = None) -> None:
    """Refuses, before any model loads, an input ``napo generate`` cannot process: see
    :func:`napo.data.inputs.check_rlaif_schema` and :func:`napo.data.inputs.check_idx_values`."""
    check_rlaif_schema(source.schema, ("chosen", "rejected"), "napo generate")
    check_idx_values(source, limit)


def generate_answers(
    model, processor, prompts: list[str], images: list | None, settings: GenerationSettings, seed: int = SAMPLING_SEED
) -> list[str]:
    """One batched beam search (greedy, or sampled when ``settings.temperature`` > 0: seeded with ``seed``, so
    a rerun of the same batch gives the same answers); the new tokens of each prompt, decoded and stripped.
    Answers that must not depend on the batching are sampled one prompt per call, each with its own seed
    (see :func:`napo.eval.answers.item_seed`). ``images``: one per prompt, or None."""
    import torch

    if images is not None:
        if len(images) != len(prompts):
            raise ValueError(f"give one image per prompt: {len(images)} images for {len(prompts)} prompts")
        # One list per prompt: Gemma 3's processor reads a flat list as one prompt's images (and refuses the batch).
        images = [[image] for image in images]
    # Left padded whatever the processor's default (a right-padded batch would generate after the padding), with
    # one BOS: a template that writes its own (Gemma 3, Idefics3) gets none from the tokenizer. llava_v1: LLaVA's ids.
    inputs = tokenize_prompts(processor, prompts, images, settings.prompt_format)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    sampled = settings.temperature > 0
    sampling = {"do_sample": True, "temperature": settings.temperature} if sampled else {"do_sample": False}
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # the caller's random state is left as it was
        output = model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            num_beams=settings.num_beams,
            pad_token_id=processor.tokenizer.pad_token_id,
            **sampling,
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _requests(
    column: str, rows: list[dict], images: list, processor, prompt_format: str
) -> tuple[list[str], list | None]:
    from PIL import Image

    def prompt(question: str | None, num_images: int) -> str:
        return user_prompt(processor, prompt_format, question=question, num_images=num_images)

    if column == "question_only":
        return [prompt(r["question"], 0) for r in rows], None
    if column == "image_only":
        return [prompt(None, 1) for r in rows], images
    color = (255, 255, 255) if column == "question_only_white" else (0, 0, 0)
    blanks = [Image.new("RGB", image.size, color) for image in images]
    return [prompt(r["question"], 1) for r in rows], blanks


def _answer_rows(model, processor, rows: list[dict], images: list, settings: GenerationSettings) -> list[dict]:
    """``images``: the rows' decoded images, in order (kept beside the rows: see :class:`RowJob`)."""
    for column in settings.columns:
        prompts, column_images = _requests(column, rows, images, processor, settings.prompt_format)
        for row, answer in zip(rows, generate_answers(model, processor, prompts, column_images, settings), strict=True):
            row[column] = answer
    return rows


# ---------------------------------------------------------------- the run


def generate_biased(
    model: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 1024,
    num_beams: int = 3,
    blank_images: bool = False,
    limit: int | None = None,
    num_shards: int | None = None,
    shard_index: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    rows_per_part: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    allow_outside_images: bool = False,
    prompt_format: str = "template",
    loaded: tuple | None = None,
) -> RunSummary:
    """Adds ``question_only`` and ``image_only`` (and, with ``blank_images``, ``question_only_white``
    and ``question_only_black``) to every row of ``data`` and writes Parquet parts under ``output``.

    Args:
        model: a vision-language checkpoint directory (or hub id where a hub is reachable): LLaVA-1.5, LLaVA-NeXT,
            Qwen2-VL, Qwen2.5-VL, Gemma 3, Idefics3 / SmolVLM (see the README's "Supported model families").
        data: a Parquet file, a directory of Parquet files or a saved `datasets` directory with the
            RLAIF-V columns (image, question, chosen, rejected, idx, provenance kept as is).
        output: the output directory (created); rerunning the same command resumes.
        batch_size: rows per generate call (left padding, rows grouped by question length).
        limit: process only the first ``limit`` rows of the input (before sharding).
        num_shards, shard_index: this process's share of the input (row position modulo num_shards);
            default from WORLD_SIZE / RANK.
        rows_per_part: rows per Parquet part: what a crash can lose (it is regenerated on rerun).
        overwrite: start again in an output directory that holds a run with other settings.
        allow_outside_images: read image paths that point outside the data's directory (trusted data only).
        prompt_format: ``template`` (the checkpoint's chat template) or ``llava_v1`` (the authors' LLaVA-1.5
            conversation format, refused on other families before any row runs): see :mod:`napo.data.prompts`.
        loaded: an already loaded ``(model, processor)`` pair (``model`` is then only recorded).
    Returns:
        A :class:`napo.data.store.RunSummary`.
    """
    import pyarrow as pa

    settings = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams, blank_images=blank_images,
                                  prompt_format=prompt_format)  # fmt: skip
    check_run_options(batch_size=batch_size, rows_per_part=rows_per_part, limit=limit, num_shards=num_shards,
                      shard_index=shard_index)  # fmt: skip
    source, total_rows = open_input(data)
    check_input(source, limit)
    # llava_v1 on another family than LLaVA-1.5 is refused before the run records its settings (a rerun with
    # --prompt-format template then starts cleanly).
    check_checkpoint_prompt_format(model, prompt_format, loaded[1] if loaded is not None else None)
    output = Path(output)
    run = start_run(model, data, output, settings.recorded(), manifest_name=MANIFEST, overwrite=overwrite,
                    batch_size=batch_size, rows_per_part=rows_per_part, limit=limit, num_shards=num_shards,
                    shard_index=shard_index)  # fmt: skip
    if loaded is None:
        loaded = load_model(model, device=device, dtype=dtype)
    llava, processor = loaded
    # An answer column already in the input (a rerun on generated data) keeps its place and type.
    answer_fields = [pa.field(c, pa.string()) for c in settings.columns if c not in source.schema.names]
    schema = extend_schema(source.schema, answer_fields, b"napo", {**run.manifest, "columns": list(settings.columns)})
    data_root = run.data_root

    def prepare(row: dict) -> tuple[dict, Any]:
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise RowError("empty question")
        return row, decode_image(row["image"], data_root, allow_outside_images)

    def answer(items: list[tuple[dict, Any]]) -> list[dict]:
        rows, images = [row for row, _ in items], [image for _, image in items]
        return _answer_rows(llava, processor, rows, images, settings)

    job = RowJob(
        name="napo generate",
        prepare=prepare,
        process=answer,
        # Group by question length inside the window: little padding, bounded memory.
        sort_key=lambda r: len(processor.tokenizer(r["question"] or "").input_ids),
        failure="generation failed",
    )
    options = {"batch_size": batch_size, "rows_per_part": rows_per_part, "limit": limit, "progress": progress}
    return run_rows(source, total_rows, output, schema, job, run, **options)
