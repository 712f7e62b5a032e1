"""``napo logps``: reference log-probs of every answer, computed once and cached with the data.

For each RLAIF-V-Bias row the reference model scores ``chosen``, ``rejected`` and the generated
biased answers (``question_only``, ``image_only``, and ``question_only_white`` / ``_black`` when
present), every one under the full prompt (image and question), through napo's fused LM-head
kernel, and adds ``ref_<column>_logps`` (sum over the answer's tokens) and
``ref_<column>_avg_logps`` (per-token average). Batches are built by the same collator the trainer
uses, so the cached values are those of the sequences the policy is trained on.

Like ``napo generate``: batched, sharded (WORLD_SIZE / RANK), resumable (rerun the same command),
crash-safe (atomic Parquet parts), with a progress bar; rows that cannot be scored are logged to
``__napo__/errors.jsonl`` and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from napo.data.inputs import check_answer_columns, check_idx_values, check_int, check_rlaif_schema
from napo.data.prompts import (
    SEQUENCE_VERSION,
    check_checkpoint_prompt_format,
    check_prompt_format,
)
from napo.data.store import (
    RowError,
    RowJob,
    RunSummary,
    check_run_options,
    extend_schema,
    open_input,
    parquet_files,
    run_rows,
    start_run,
)
from napo.train.collator import NaPOVisionCollator, reference_columns
from napo.train.lm_head import SequenceLogps, add_napo_lm_head, completion_logps

__all__ = [
    "ANSWER_COLUMNS",
    "DEFAULT_MAX_LENGTH",
    "MANIFEST",
    "cached_settings",
    "check_vocabulary",
    "compute_reference_logps",
    "score_examples",
    "scored_columns",
]

MANIFEST = "logps.json"  # in the output's __napo__/ folder
DEFAULT_MAX_LENGTH = 2048
"""NaPOConfig's default max_length (the authors' 2048; DPOConfig's is 1024): cached and live log-probs
truncate alike."""
METADATA_KEY = b"napo_logps"
ANSWER_COLUMNS = ("chosen", "rejected", "question_only", "image_only", "question_only_white", "question_only_black")
"""The answer columns scored when the data has them, in this order."""
REQUIRED = ("image", "question", "chosen", "rejected", "idx")


def scored_columns(names: list[str], columns: list[str] | None = None) -> list[str]:
    """The columns ``napo logps`` scores: ``columns`` (see :func:`napo.data.inputs.check_answer_columns`), or
    every answer column present."""
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ValueError(
            f"the data lacks the column(s) {', '.join(missing)} (has: {', '.join(names)}); napo logps scores "
            "RLAIF-V(-Bias) rows: image, question, chosen, rejected, idx, and the napo generate columns"
        )
    if columns is None:
        return [c for c in ANSWER_COLUMNS if c in names]
    return check_answer_columns(names, columns)


def check_input(schema: Any, columns: list[str] | None = None) -> list[str]:
    """The columns to score (:func:`scored_columns`), once the schema is one ``napo logps`` can read: the
    scored columns and ``question`` strings, ``idx`` a key, ``image`` images (named in the ValueError)."""
    columns = scored_columns(list(schema.names), columns)
    check_rlaif_schema(schema, columns, "napo logps")
    return columns


def compute_reference_logps(
    model: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    columns: list[str] | None = None,
    batch_size: int = 8,
    max_length: int | None = DEFAULT_MAX_LENGTH,
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
    """Adds ``ref_<column>_logps`` and ``ref_<column>_avg_logps`` to every row of ``data``; writes Parquet parts.

    Args:
        model: the reference model (a vision-language checkpoint directory: LLaVA, LLaVA-NeXT, Qwen2-VL,
            Qwen2.5-VL, Gemma 3, Idefics3 / SmolVLM; or a hub id where reachable).
        data: ``napo generate``'s output (or any Parquet / saved dataset with the RLAIF-V columns).
        output: the output directory; rerunning the same command resumes.
        columns: the answer columns to score (default: every one of :data:`ANSWER_COLUMNS` present).
        batch_size: rows per forward (each row is ``len(columns)`` sequences).
        max_length: truncate prompt + answer to this many tokens (>= 1); None: no truncation. It must be the
            trainer's ``max_length`` (NaPOConfig's default, 2048, here too) for the cached values to be the reference
            log-probs of the sequences the policy trains on; it is recorded in the output's metadata.
        limit, num_shards, shard_index, rows_per_part, overwrite, progress: as for ``napo generate``.
        device, dtype: where and in what precision the model runs (auto: CUDA in bfloat16 when present).
        allow_outside_images: as for ``napo generate``.
        prompt_format: ``template`` or ``llava_v1`` (:mod:`napo.data.prompts`); like ``max_length``, it must be
            the trainer's, and it is recorded.
        loaded: an already loaded ``(model, processor)`` pair.
    """
    import pyarrow as pa

    from napo.models.loading import decode_image, load_model, resolve_device, resolve_dtype

    if max_length is not None:
        check_int("max_length", max_length, 1)
    check_run_options(batch_size=batch_size, rows_per_part=rows_per_part, limit=limit, num_shards=num_shards,
                      shard_index=shard_index)  # fmt: skip
    source, total_rows = open_input(data)
    columns = check_input(source.schema, columns)
    check_idx_values(source, limit)
    output = Path(output)
    resolved_device = resolve_device(device)
    settings = {
        "columns": columns,
        "max_length": max_length,
        "dtype": str(resolve_dtype(dtype, resolved_device)).removeprefix("torch."),
    }
    if check_prompt_format(prompt_format) != "template":  # absent = the default: earlier manifests still match
        settings["prompt_format"] = prompt_format
    settings["sequences"] = SEQUENCE_VERSION  # earlier outputs scored other token ids: not resumed into
    # llava_v1 on another family: refused before the run is recorded or a row is scored.
    check_checkpoint_prompt_format(model, prompt_format, loaded[1] if loaded is not None else None)
    run = start_run(model, data, output, settings, manifest_name=MANIFEST, overwrite=overwrite,
                    batch_size=batch_size, rows_per_part=rows_per_part, limit=limit, num_shards=num_shards,
                    shard_index=shard_index)  # fmt: skip
    if loaded is None:
        loaded = load_model(model, device=resolved_device, dtype=dtype)
    reference, processor = loaded
    check_vocabulary(reference, processor)
    add_napo_lm_head(reference)
    collator = NaPOVisionCollator(processor=processor, columns=columns, max_length=max_length,
                                  prompt_format=prompt_format)  # fmt: skip
    added = [name for column in columns for name in reference_columns(column)]
    # Rescoring data that has reference columns already: the new values replace the old.
    schema = extend_schema(
        source.schema, [pa.field(n, pa.float64()) for n in added], METADATA_KEY, {**run.manifest, "columns": added}
    )
    data_root = run.data_root

    def prepare(row: dict) -> tuple[dict, Any]:
        for column in columns:
            if not isinstance(row[column], str):  # the schema says strings: this is a null
                raise RowError(f"column {column!r} is null")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise RowError("empty question")
        return row, decode_image(row["image"], data_root, allow_outside_images)

    def score(items: list[tuple[dict, Any]]) -> list[dict]:
        # The example holds only what the collator reads; the decoded image never enters the row.
        examples = [{"image": image, "question": r["question"], **{c: r[c] for c in columns}} for r, image in items]
        rows = [row for row, _ in items]
        for column, out in score_examples(reference, collator, examples).items():
            sum_name, avg_name = reference_columns(column)
            for row, total, average in zip(rows, out.logps.tolist(), out.avg_logps.tolist(), strict=True):
                row[sum_name], row[avg_name] = total, average
        return rows

    tokenizer = processor.tokenizer
    job = RowJob(
        name="napo logps",
        prepare=prepare,
        process=score,
        sort_key=lambda r: sum(len(tokenizer(r[c] or "").input_ids) for c in columns),
        failure="scoring failed",
    )
    options = {"batch_size": batch_size, "rows_per_part": rows_per_part, "limit": limit, "progress": progress}
    return run_rows(source, total_rows, output, schema, job, run, **options)


def score_examples(model: Any, collator: NaPOVisionCollator, examples: list[dict]) -> dict[str, SequenceLogps]:
    """Per answer column of ``collator``, the ``[B]`` log-prob sums and averages of ``examples`` under ``model``
    (which must carry :func:`napo.train.add_napo_lm_head`), without gradient, on the model's device and dtype."""
    import torch

    batch = {k: v.to(model.device) for k, v in collator(examples).items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    with torch.no_grad():
        return completion_logps(model, batch, tuple(collator.columns))


def cached_settings(data: str | Path) -> dict | None:
    """The settings (columns, max_length, dtype) ``napo logps`` recorded in ``data``'s Parquet metadata, or
    None when the reference columns did not come from it."""
    import pyarrow.parquet as pq

    try:
        files = parquet_files(data)
    except FileNotFoundError:
        return None
    metadata = pq.read_schema(files[0]).metadata or {}
    if METADATA_KEY not in metadata:
        return None
    return json.loads(metadata[METADATA_KEY]).get("settings")


def check_vocabulary(model: Any, processor: Any) -> None:
    """A processor whose tokenizer can emit ids past the model's LM head is the wrong processor: say so."""
    head = model.get_output_embeddings()
    vocabulary = int(head.weight.shape[0])
    if len(processor.tokenizer) > vocabulary:
        raise ValueError(
            f"the tokenizer has {len(processor.tokenizer)} tokens but the model's LM head only {vocabulary}: "
            "token ids past the head would be out of range; is this the model's own processor?"
        )
