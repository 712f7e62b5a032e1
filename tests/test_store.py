"""The resumable row loop shared by napo generate and napo logps, with a fake job: which failures are a row's
fault (logged, skipped for good) and which stop the run (nothing logged, a rerun retries the rows)."""

from __future__ import annotations

import json

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from napo.data.store import ERRORS, RowError, RowJob, open_input, run_rows, start_run  # noqa: E402


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"idx": list(range(6)), "text": [f"row {i}" for i in range(6)]}), path)
    return path


def run(source, output, process, prepare=lambda row: row):
    data, total = open_input(source)
    start = start_run("model", source, output, {}, manifest_name="_m.json", overwrite=False, batch_size=3,
                      rows_per_part=2, limit=None, num_shards=1, shard_index=0)  # fmt: skip
    job = RowJob(name="test", prepare=prepare, process=process, failure="failed")
    schema = data.schema.append(pa.field("out", pa.string()))
    return run_rows(data, total, output, schema, job, start, batch_size=3, rows_per_part=2, limit=None, progress=False)


def done(rows):
    for row in rows:
        row["out"] = row["text"].upper()
    return rows


def logged(output):
    path = output / ERRORS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_bad_row_is_logged_and_the_rest_of_its_batch_survives(source, tmp_path):
    def process(rows):
        if any(r["idx"] == 4 for r in rows):
            raise ValueError("cannot handle row 4")
        return done(rows)

    def prepare(row):
        if row["idx"] == 1:
            raise RowError("bad image")
        return row

    summary = run(source, tmp_path / "o", process, prepare=prepare)
    assert (summary.written, summary.failed) == (4, 2)
    reasons = {e["idx"]: e["reason"] for e in logged(tmp_path / "o")}
    assert reasons == {1: "bad image", 4: "failed: ValueError: cannot handle row 4"}
    assert sorted(pq.read_table(tmp_path / "o").column("idx").to_pylist()) == [0, 2, 3, 5]


@pytest.mark.parametrize(
    "message", ["CUDA error: device-side assert triggered", "CUDA error: an illegal memory access"]
)
def test_a_cuda_error_stops_the_run_without_blaming_rows(source, tmp_path, message):
    def process(rows):
        if any(r["idx"] == 4 for r in rows):
            raise RuntimeError(message)
        return done(rows)

    with pytest.raises(RuntimeError, match="CUDA error"):
        run(source, tmp_path / "o", process)
    assert logged(tmp_path / "o") == []
    summary = run(source, tmp_path / "o", done)  # the rerun: rows 3-5 were never marked done
    # Parts hold 2 rows: rows 0-1 were written, row 2 was still pending when the run stopped.
    assert (summary.already_done, summary.written) == (2, 4)
    assert sorted(pq.read_table(tmp_path / "o").column("idx").to_pylist()) == list(range(6))


def test_out_of_memory_retries_row_by_row_then_stops_on_a_single_row(source, tmp_path):
    sizes = []

    def process(rows):
        sizes.append(len(rows))
        if len(rows) > 1:
            raise MemoryError("batch too large")
        return done(rows)

    summary = run(source, tmp_path / "o", process)
    assert summary.written == 6 and logged(tmp_path / "o") == [] and sizes[:4] == [3, 1, 1, 1]

    def always(rows):
        raise MemoryError("even one row")

    with pytest.raises(MemoryError):
        run(source, tmp_path / "p", always)
    assert logged(tmp_path / "p") == []
