"""What the data stages accept, checked before any model loads or any row runs.

A user's mistake (a numeric option out of range, a column of the wrong type, a duplicate ``idx``)
must stop a run at once with one ``ValueError`` naming the option or column, not fail row by row
or surface later as a traceback. The CLI turns these into exit code 2; its argparse types use the
same checks, so a flag and the Python keyword it sets accept exactly the same values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "SEED_RANGE",
    "check_answer_columns",
    "check_idx_values",
    "check_int",
    "check_output_dir",
    "check_rlaif_schema",
    "float_problem",
    "int_problem",
    "is_text_type",
]

REQUIRED_COLUMNS = ("image", "question", "chosen", "rejected", "idx")


def int_problem(value: Any, minimum: int, maximum: int | None = None) -> str | None:
    """None if ``value`` is an integer in ``[minimum, maximum]``, else what is wrong ("must be ..., got ...")."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    # bool is an int subclass, and a float such as 2.5 would fail later inside range(): refuse both here.
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer {bounds}, got {value!r}"
    if value < minimum or (maximum is not None and value > maximum):
        return f"must be an integer {bounds}, got {value}"
    return None


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]``; else a ValueError naming ``name`` and the range."""
    problem = int_problem(value, minimum, maximum)
    if problem:
        raise ValueError(f"{name} {problem}")
    return value


def float_problem(value: Any) -> str | None:
    """None if ``value`` is a finite number > 0, else what is wrong."""
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    return None if math.isfinite(number) and number > 0 else f"must be a finite number > 0, got {value!r}"


def check_output_dir(path: Any, name: str = "output") -> None:
    """Refuses an output directory that cannot be one: an existing file, or a path under a file."""
    from pathlib import Path

    path = Path(path)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is" if existing == path else f"is under {existing}, which is"
                raise ValueError(f"{name} {path} {where} a file, not a directory; give a directory (made if missing)")
            return


SEED_RANGE = (0, 2**32 - 1)
"""What every seeded library accepts (NumPy refuses negative seeds and seeds past 32 bits)."""


# ---------------------------------------------------------------- column types


def is_text_type(arrow_type: Any) -> bool:
    """A column of strings, or of nulls only (those rows are judged one by one)."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_null(arrow_type)


def _is_idx_type(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(arrow_type) or pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _is_image_type(arrow_type: Any) -> bool:
    """Encoded bytes, a path, or the ``{"bytes", "path"}`` struct of a `datasets` Image column."""
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        names = {arrow_type.field(i).name for i in range(arrow_type.num_fields)}
        return bool(names & {"bytes", "path"})
    binary = pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
    return binary or is_text_type(arrow_type)


def check_rlaif_schema(schema: Any, text_columns: Sequence[str], command: str) -> None:
    """Refuses an input napo cannot read, naming the column: a missing RLAIF-V column, an ``idx`` that is
    not integers or strings, an ``image`` that is not image bytes or paths, or one of ``text_columns``
    (``question`` and the answers the stage reads) that is not strings."""
    names = list(schema.names)
    missing = [column for column in REQUIRED_COLUMNS if column not in names]
    if missing:
        raise ValueError(
            f"the input lacks the RLAIF-V column(s) {', '.join(missing)} (has: {', '.join(names)}); "
            f"{command} needs {', '.join(REQUIRED_COLUMNS)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"the input has more than one column named {', '.join(map(repr, repeated))}; rename them")
    idx_type = schema.field("idx").type
    if not _is_idx_type(idx_type):
        raise ValueError(
            f"column 'idx' is of type {idx_type}; it must hold integers or strings (one unique key per row)"
        )
    image_type = schema.field("image").type
    if not _is_image_type(image_type):
        raise ValueError(
            f"column 'image' is of type {image_type}; it must hold encoded image bytes, image paths "
            'or {"bytes", "path"} structs (a `datasets` Image column)'
        )
    for column in dict.fromkeys(["question", *text_columns]):
        arrow_type = schema.field(column).type
        if not is_text_type(arrow_type):
            raise ValueError(f"column {column!r} is of type {arrow_type}; it must hold strings")


PROMPT_COLUMNS = ("image", "question", "idx", "prompt", "images")
"""Not answers: the prompt is built from ``image`` and ``question``; ``prompt`` / ``images`` would make the
collator read a row as TRL's format."""


def check_answer_columns(names: Iterable[str], columns: Sequence[str]) -> list[str]:
    """``columns`` (the answers to score) as a list: non-empty, each a non-empty name, no repeats, none of
    :data:`PROMPT_COLUMNS`, each one of ``names``."""
    names = list(names)
    columns = list(columns)
    if not columns:
        raise ValueError("no answer column to score: give at least one (e.g. chosen,rejected)")
    bad = [c for c in columns if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"answer column names must be non-empty strings, got {columns!r}")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise ValueError(f"answer column(s) {', '.join(map(repr, repeated))} given more than once")
    prompt = [c for c in columns if c in PROMPT_COLUMNS]
    if prompt:
        raise ValueError(f"{', '.join(map(repr, prompt))} cannot be scored as an answer: it is part of the prompt")
    absent = [c for c in columns if c not in names]
    if absent:
        raise ValueError(
            f"asked to score column(s) {', '.join(map(repr, absent))}, which the data lacks (has: {', '.join(names)})"
        )
    return columns


# ---------------------------------------------------------------- idx values


def check_idx_values(source: Any, limit: int | None = None) -> None:
    """Refuses a null or repeated ``idx`` among the first ``limit`` rows of ``source`` (a pyarrow Table or
    dataset), reading only that column. Every shard checks all of them, not just its own rows: a key
    repeated across two shards would otherwise let one row count as done for the other, which would
    then be silently skipped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = source.column("idx") if isinstance(source, pa.Table) else source.to_table(columns=["idx"]).column("idx")
    if limit is not None:
        column = column.slice(0, limit)
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise ValueError(f"column 'idx' is null in row {row}; every row needs a unique idx")
    counts = pc.value_counts(column)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        value, times = repeated[0]["values"].as_py(), repeated[0]["counts"].as_py()
        more = f" (and {len(repeated) - 1} more repeated values)" if len(repeated) > 1 else ""
        raise ValueError(
            f"idx {value!r} appears more than once in the input ({times} times){more}; idx must be unique: "
            "give every row its own"
        )
