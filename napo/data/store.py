"""Resumable Parquet output shared by the data stages (``napo generate``, ``napo logps``).

Finished rows go to part files written atomically (temporary file, fsync, rename), named
``part-sSSSS-NNNNNN.parquet`` by shard and sequence number; a run killed at any moment and rerun
with the same settings ends with every row exactly once. A manifest (underscore-prefixed, so
Parquet readers skip it) records the settings and refuses a rerun with other ones.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ERRORS = "_errors.jsonl"
PART_PATTERN = re.compile(r"^part-s(\d{4})-(\d{6})\.parquet$")


def open_input(data: str | Path) -> tuple[Any, int]:
    """(a pyarrow dataset or table to stream RecordBatches from, row count) for a Parquet file, a
    directory of Parquet files, a saved `datasets` directory or (where a hub is reachable) a hub id."""
    import pyarrow.dataset as pads

    path = Path(data)
    if path.is_file():
        dataset = pads.dataset(str(path), format="parquet")
        return dataset, dataset.count_rows()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets

            table = datasets.load_from_disk(str(path)).data.table
            return table, table.num_rows
        files = sorted(str(p) for p in path.rglob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"no Parquet files under {path}")
        dataset = pads.dataset(files, format="parquet")
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


def prepare_output(output: Path, manifest: dict, overwrite: bool, manifest_name: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    path = output / manifest_name
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
