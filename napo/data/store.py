"""Resumable Parquet output shared by the data stages (``napo generate``, ``napo logps``).

Finished rows go to part files written atomically (temporary file, fsync, rename), named
``part-sSSSS-NNNNNN.parquet`` by shard and sequence number; a run killed at any moment and rerun
with the same settings ends with every row exactly once. A manifest records the settings and
refuses a rerun with other ones; it and the log of skipped rows live in ``__napo__/``, a folder
that pyarrow, pandas and `datasets` all skip (each reads a JSON file beside the parts as data when
there is no part, so a run with no row written would read as a one-row dataset).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napo.errors import RowError  # also imported from here: its old home

BOOKKEEPING = "__napo__"
ERRORS = f"{BOOKKEEPING}/errors.jsonl"
LEGACY_ERRORS = "_errors.jsonl"  # where napo <= 0.1 kept it, beside the parts
PART_PATTERN = re.compile(r"^part-s(\d{4})-(\d{6})\.parquet$")


def open_input(data: str | Path) -> tuple[Any, int]:
    """(a pyarrow dataset or table to stream RecordBatches from, row count) for a Parquet file, a
    directory of Parquet files, a saved `datasets` directory or (where a hub is reachable) a hub id."""
    path = Path(data)
    if path.is_file():
        dataset = parquet_dataset(path)
        return dataset, dataset.count_rows()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets

            table = datasets.load_from_disk(str(path)).data.table
            return table, table.num_rows
        dataset = parquet_dataset(path)
        return dataset, dataset.count_rows()
    if "/" in str(data) and not str(data).startswith((".", "/")):
        import datasets

        try:
            table = datasets.load_dataset(str(data), split="train").data.table
        except Exception as error:
            raise FileNotFoundError(
                f"{data} is not a local path and could not be loaded from a hub: {error}"
            ) from error
        return table, table.num_rows
    raise FileNotFoundError(f"no such file or directory: {data}")


def parquet_files(path: str | Path) -> list[str]:
    """The Parquet file, or the Parquet files under a directory (sorted; dot-prefixed temporaries skipped)."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    files = sorted(str(p) for p in path.rglob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {path}")
    return files


def parquet_schema(files: list[str]) -> Any:
    """One schema for all ``files``: every column of every file (missing ones read as null), with types
    widened where that loses nothing (int32 and int64 -> int64). pyarrow's default is the first file's
    schema, which silently drops the columns only later files have. Reads only the files' footers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(f) for f in files]
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    seen: dict[str, tuple[Any, str]] = {}
    for file, schema in zip(files, schemas, strict=True):
        for arrow_field in schema:
            first = seen.setdefault(arrow_field.name, (arrow_field.type, file))
            try:
                pa.unify_schemas([pa.schema([pa.field("x", first[0])]), pa.schema([pa.field("x", arrow_field.type)])],
                                 promote_options="permissive")  # fmt: skip
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise ValueError(
                    f"column {arrow_field.name!r} is {first[0]} in {first[1]} but {arrow_field.type} in {file}; "
                    "give the column one type in every file"
                ) from None
    raise ValueError(f"the Parquet files under {Path(files[0]).parent} have schemas that cannot be merged")


def parquet_dataset(path: str | Path) -> Any:
    """A pyarrow dataset over :func:`parquet_files` with the :func:`parquet_schema` of all of them."""
    import pyarrow.dataset as pads

    files = parquet_files(path)
    return pads.dataset(files, schema=parquet_schema(files), format="parquet")


def record_batches(source: Any, size: int) -> Iterator[Any]:
    yield from (
        source.to_batches(max_chunksize=size) if hasattr(source, "num_rows") else source.to_batches(batch_size=size)
    )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write, owner: str = "") -> None:
    """write(tmp_path), fsync, then rename over path: readers see the whole file or nothing.
    The dot-prefixed temporary name is invisible to Parquet readers; ``owner`` tags it so that a
    rerun can remove what a killed run of the same shard left behind."""
    tmp = path.parent / f".tmp-{owner}-{uuid.uuid4().hex}-{path.name}"
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def existing_parts(output: Path) -> list[Path]:
    return sorted(p for p in output.iterdir() if PART_PATTERN.match(p.name))


def part_numbers(output: Path, shard_index: int) -> list[int]:
    """The sequence numbers of this shard's parts already written."""
    matches = (PART_PATTERN.match(p.name) for p in existing_parts(output))
    return [int(m.group(2)) for m in matches if m is not None and int(m.group(1)) == shard_index]


def done_indices(output: Path) -> set:
    import pyarrow.parquet as pq

    done: set = set()
    for part in existing_parts(output):
        done.update(pq.read_table(part, columns=["idx"]).column("idx").to_pylist())
    errors = output / ERRORS
    if errors.exists():
        for line in errors.read_text().splitlines():
            try:
                done.add(json.loads(line)["idx"])
            except (ValueError, KeyError):
                continue  # a line cut short by a crash
    return done


def _move_legacy_bookkeeping(output: Path, manifest_name: str) -> None:
    """Outputs written before ``__napo__/`` existed resume too: their manifest and error log move in."""
    legacy = {
        output / LEGACY_ERRORS: output / ERRORS,
        output / f"_napo_{manifest_name}": output / BOOKKEEPING / manifest_name,
    }
    for old, new in legacy.items():
        if old.exists() and not new.exists():
            os.replace(old, new)


def prepare_output(output: Path, manifest: dict, overwrite: bool, manifest_name: str) -> None:
    """``manifest_name``: the manifest's file name inside ``__napo__/`` (``generate.json``, ``logps.json``)."""
    (output / BOOKKEEPING).mkdir(parents=True, exist_ok=True)
    _move_legacy_bookkeeping(output, manifest_name)
    path = output / BOOKKEEPING / manifest_name
    if overwrite:
        for part in existing_parts(output):
            part.unlink()
        (output / ERRORS).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    if path.exists():
        previous = json.loads(path.read_text())
        keys = ("model", "data", "settings")
        if any(previous.get(k) != manifest[k] for k in keys):
            differences = {k: (previous.get(k), manifest[k]) for k in keys if previous.get(k) != manifest[k]}
            raise ValueError(
                f"{output} holds a run with other settings {differences}; use another output directory "
                "or overwrite=True (--overwrite) to start again"
            )
        return
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))


def progress_bar(total: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=description, unit="row", dynamic_ncols=True)


# ---------------------------------------------------------------- the resumable row loop


@dataclass
class RunSummary:
    output_dir: Path
    written: int = 0
    failed: int = 0
    already_done: int = 0
    seconds: float = 0.0
    shard_index: int = 0
    num_shards: int = 1
    errors: list[dict] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RowJob:
    """What a stage does to rows.

    name: the progress bar's label. prepare(row) -> item: what ``process`` needs of one row (the row and
    whatever the stage derives from it, such as the decoded image), raising :class:`RowError` for a row
    to skip. process(items) -> rows: one batch, the finished rows to write. Derived values travel in the
    item, never in the row under a made-up key: any such key could be one of the user's columns.
    sort_key: orders the rows of a window (similar lengths batch together). failure: the log reason
    prefix when ``process`` raises.
    """

    name: str
    prepare: Callable[[dict], Any]
    process: Callable[[list[Any]], list[dict]]
    sort_key: Callable[[dict], Any] | None = None
    failure: str = "processing failed"


def shard_from_env(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(num_shards, shard_index), defaulting to the WORLD_SIZE / RANK that torchrun and accelerate set."""
    if num_shards is None:
        num_shards = int(os.environ.get("WORLD_SIZE", 1))
    if shard_index is None:
        shard_index = int(os.environ.get("RANK", 0))
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need num_shards >= 1 and 0 <= shard_index < num_shards, got {shard_index} of {num_shards}")
    return num_shards, shard_index


def check_run_options(
    *, batch_size: int, rows_per_part: int, limit: int | None, num_shards: int | None, shard_index: int | None
) -> None:
    """The options every row stage shares, in the ranges the CLI enforces (ValueError naming the option)."""
    from napo.data.inputs import check_int

    check_int("batch_size", batch_size, 1)
    check_int("rows_per_part", rows_per_part, 1)
    if limit is not None:
        check_int("limit", limit, 0)
    if num_shards is not None:
        check_int("num_shards", num_shards, 1)
    if shard_index is not None:
        check_int("shard_index", shard_index, 0)


@dataclass(frozen=True)
class RunStart:
    """What a stage knows once its output directory is ready: the manifest and this process's shard."""

    manifest: dict
    num_shards: int
    shard_index: int
    data_root: Path | None  # where relative image paths of the input resolve


def start_run(
    model: str | Path,
    data: str | Path,
    output: Path,
    settings: dict,
    *,
    manifest_name: str,
    overwrite: bool,
    batch_size: int,
    rows_per_part: int,
    limit: int | None,
    num_shards: int | None,
    shard_index: int | None,
) -> RunStart:
    """Checks the run options, resolves the shard, and records (or checks) the run's manifest."""
    from napo._version import __version__

    check_run_options(batch_size=batch_size, rows_per_part=rows_per_part, limit=limit, num_shards=num_shards,
                      shard_index=shard_index)  # fmt: skip
    num_shards, shard_index = shard_from_env(num_shards, shard_index)
    manifest = {
        "model": str(Path(model).resolve()) if Path(model).exists() else str(model),
        "data": str(Path(data).resolve()) if Path(data).exists() else str(data),
        "settings": settings,
        "napo_version": __version__,
    }
    prepare_output(output, manifest, overwrite, manifest_name)
    data = Path(data)
    data_root = data.parent if data.is_file() else data if data.is_dir() else None
    return RunStart(manifest=manifest, num_shards=num_shards, shard_index=shard_index, data_root=data_root)


def extend_schema(schema: Any, fields: list, metadata_key: bytes, metadata: dict) -> Any:
    """The input schema plus ``fields`` (replacing same-named ones), with napo's provenance in its metadata.

    Every part is written with this one schema: inferring it per part would give a column that happens to
    be all-null in one part another type, and readers would refuse the set."""
    for new in fields:
        if new.name in schema.names:
            schema = schema.remove(schema.get_field_index(new.name))
        schema = schema.append(new)
    return schema.with_metadata({**(schema.metadata or {}), metadata_key: json.dumps(metadata).encode()})


def _breaks_the_run(error: BaseException, single_row: bool) -> bool:
    """Errors that are no row's fault must not be logged as bad rows (a rerun would skip them for good):
    a CUDA error poisons the context for every later row; running out of memory on a whole batch is
    retried row by row, but on a single row it is the machine's limit, not the row's data."""
    text = f"{type(error).__name__}: {error}"
    if "CUDA error" in text or "device-side assert" in text or "CUBLAS_STATUS" in text:
        return True
    out_of_memory = isinstance(error, MemoryError) or "OutOfMemoryError" in type(error).__name__
    return out_of_memory and single_row


def run_rows(
    source: Any,
    total_rows: int,
    output: Path,
    schema: Any,
    job: RowJob,
    start: RunStart,
    *,
    batch_size: int,
    rows_per_part: int,
    limit: int | None,
    progress: bool,
) -> RunSummary:
    """Streams ``source`` (keyed by its ``idx`` column, which the stage has checked with
    :func:`napo.data.inputs.check_idx_values`), runs ``job`` on this shard's rows not done yet, and
    writes the finished rows as parts with ``schema``. A batch that fails is retried row by row, so one
    bad row cannot sink the others; bad rows go to ``__napo__/errors.jsonl`` with the reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    num_shards, shard_index = start.num_shards, start.shard_index
    for stale in output.glob(f".tmp-s{shard_index:04d}-*"):
        stale.unlink(missing_ok=True)  # a part this shard was writing when it was killed
    done = done_indices(output)
    rows_total = total_rows if limit is None else min(total_rows, limit)
    shard_total = len(range(shard_index, rows_total, num_shards))
    summary = RunSummary(output_dir=output, shard_index=shard_index, num_shards=num_shards)
    next_part = max(part_numbers(output, shard_index), default=-1) + 1
    pending: list[dict] = []
    started = time.perf_counter()
    bar = progress_bar(shard_total, progress, f"{job.name} (shard {shard_index}/{num_shards})")

    def flush() -> None:
        nonlocal next_part, pending
        if not pending:
            return
        table = pa.Table.from_pylist(pending, schema=schema)
        part = output / f"part-s{shard_index:04d}-{next_part:06d}.parquet"
        write_atomically(part, lambda tmp: pq.write_table(table, tmp), owner=f"s{shard_index:04d}")
        next_part += 1
        pending = []

    def record_error(row: dict, reason: str) -> None:
        entry = {"idx": row["idx"], "reason": reason, "shard": shard_index}
        with open(output / ERRORS, "a") as handle:  # O_APPEND: whole lines even with several shards
            handle.write(json.dumps(entry, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        summary.failed += 1
        summary.errors.append(entry)
        bar.update(1)

    def process(batch: list[tuple[dict, Any]]) -> list[dict]:
        """``batch``: (row, prepared item) pairs; the row is what an error is logged against."""
        if not batch:
            return []
        try:
            return job.process([item for _, item in batch])
        except Exception as error:
            if _breaks_the_run(error, single_row=len(batch) == 1):
                raise  # not this row's fault: stop, and let a rerun resume
            if len(batch) == 1:
                record_error(batch[0][0], f"{job.failure}: {type(error).__name__}: {error}")
                return []
        return [finished for pair in batch for finished in process([pair])]

    position = 0
    for record_batch in record_batches(source, batch_size * 32):
        mine = []
        for row in record_batch.to_pylist():
            if limit is not None and position >= limit:
                break
            if position % num_shards == shard_index:
                mine.append(row)
            position += 1
        todo = [r for r in mine if r["idx"] not in done]
        summary.already_done += len(mine) - len(todo)
        bar.update(len(mine) - len(todo))
        if job.sort_key is not None:
            todo.sort(key=job.sort_key)
        for offset in range(0, len(todo), batch_size):
            batch = []
            for row in todo[offset : offset + batch_size]:
                try:
                    batch.append((row, job.prepare(row)))
                except RowError as error:
                    record_error(row, str(error))
            for row in process(batch):
                pending.append(row)
                summary.written += 1
                bar.update(1)
                if len(pending) >= rows_per_part:
                    flush()
            bar.set_postfix(errors=summary.failed)
        if limit is not None and position >= limit:
            break
    flush()
    bar.close()
    summary.seconds = time.perf_counter() - started
    return summary
