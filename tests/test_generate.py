"""napo generate on the tiny offline LLaVA and the embedded sample set."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

from napo.data import generate_biased, load_model, make_sample_data, make_tiny_model  # noqa: E402
from napo.data.store import shard_from_env as _shard_from_env  # noqa: E402

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llava")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return make_sample_data(tmp_path_factory.mktemp("data") / "sample.parquet", rows=12)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(tiny, device="cpu")


def read_output(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values("idx").reset_index(drop=True)


def test_tiny_model_and_processor_round_trip(tiny):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny)
    processor = AutoProcessor.from_pretrained(tiny)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}],
        add_generation_prompt=True,
    )
    assert prompt == "USER: <image>\nWhat color is it? ASSISTANT:"
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert processor.tokenizer.decode(
        processor.tokenizer("The circle is red.").input_ids, skip_special_tokens=True
    ) == ("The circle is red.")
    again = make_tiny_model(tiny.parent / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()  # deterministic


def test_sample_data_round_trip(sample, tmp_path):
    from PIL import Image

    table = pq.read_table(sample)
    assert table.column_names == [
        "ds_name", "image", "question", "chosen", "rejected", "origin_dataset", "origin_split", "idx", "image_path",
    ]  # fmt: skip
    formats = {Image.open(io.BytesIO(row["bytes"])).format for row in table.column("image").to_pylist()}
    assert formats == {"PNG", "JPEG"}
    rows = table.to_pylist()
    assert all(row["chosen"] != row["rejected"] for row in rows)
    again = make_sample_data(tmp_path / "again.parquet", rows=12)
    assert pq.read_table(again).equals(table)


def test_end_to_end(tiny, sample, loaded, tmp_path):
    out = tmp_path / "out"
    summary = generate_biased(tiny, sample, out, max_new_tokens=4, batch_size=4, loaded=loaded, **QUIET)
    assert (summary.written, summary.failed, summary.already_done) == (12, 0, 0)
    frame = read_output(out)
    source = pd.read_parquet(sample).sort_values("idx").reset_index(drop=True)
    assert list(frame.columns) == [*source.columns, "question_only", "image_only"]
    pd.testing.assert_frame_equal(frame[source.columns], source)  # every input column kept as it was
    assert frame["question_only"].map(len).gt(0).all() and frame["image_only"].map(len).gt(0).all()
    metadata = json.loads(pq.read_schema(next(out.glob("part-*.parquet"))).metadata[b"napo"])
    assert metadata["settings"] == {"max_new_tokens": 4, "num_beams": 3, "blank_images": False}
    assert metadata["model"] == str(tiny.resolve()) and metadata["napo_version"]
    datasets = pytest.importorskip("datasets")
    assert len(datasets.load_dataset(str(out), split="train")) == 12
    # A rerun finds everything done and writes nothing.
    again = generate_biased(tiny, sample, out, max_new_tokens=4, batch_size=4, loaded=loaded, **QUIET)
    assert (again.written, again.already_done) == (0, 12)
    assert len(read_output(out)) == 12


def test_batched_answers_equal_unbatched(tiny, sample, loaded, tmp_path):
    one = generate_biased(tiny, sample, tmp_path / "one", batch_size=1, max_new_tokens=6, loaded=loaded, **QUIET)
    many = generate_biased(tiny, sample, tmp_path / "many", batch_size=5, max_new_tokens=6, loaded=loaded, **QUIET)
    assert one.written == many.written == 12
    a, b = read_output(tmp_path / "one"), read_output(tmp_path / "many")
    assert a["question_only"].tolist() == b["question_only"].tolist()
    assert a["image_only"].tolist() == b["image_only"].tolist()
    # Questions of different lengths were batched together, so left padding really was exercised.
    assert pd.read_parquet(sample)["question"].nunique() > 1


def test_raw_image_bytes_are_accepted(tiny, sample, loaded, tmp_path):
    rows = pq.read_table(sample).to_pylist()[:3]
    for row in rows:
        row["image"] = row["image"]["bytes"]
    data = tmp_path / "raw.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    assert pa.types.is_binary(pq.read_schema(data).field("image").type)
    summary = generate_biased(tiny, data, tmp_path / "o", max_new_tokens=2, loaded=loaded, **QUIET)
    assert (summary.written, summary.failed) == (3, 0)


def test_parts_share_one_schema_when_a_column_is_sometimes_null(tiny, sample, loaded, tmp_path):
    rows = pq.read_table(sample).to_pylist()[:6]
    for row in rows[:3]:
        row["image_path"] = None  # all-null in the first parts
    data = tmp_path / "nulls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    generate_biased(tiny, data, tmp_path / "o", max_new_tokens=2, batch_size=1, rows_per_part=1, loaded=loaded, **QUIET)
    schemas = {pq.read_schema(p).remove_metadata() for p in (tmp_path / "o").glob("part-*.parquet")}
    assert len(schemas) == 1
    frame = read_output(tmp_path / "o")
    assert frame["image_path"].isna().sum() == 3 and len(frame) == 6


def test_blank_image_columns(tiny, sample, loaded, tmp_path):
    generate_biased(tiny, sample, tmp_path / "o", max_new_tokens=3, blank_images=True, limit=4, loaded=loaded, **QUIET)
    frame = read_output(tmp_path / "o")
    assert len(frame) == 4
    assert {"question_only_white", "question_only_black"} <= set(frame.columns)


def test_bad_rows_are_logged_and_skipped(tiny, sample, loaded, tmp_path):
    rows = pq.read_table(sample).to_pylist()[:6]
    rows[1]["image"] = {"bytes": b"not an image at all", "path": "broken.png"}
    rows[4]["question"] = "   "
    data = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    summary = generate_biased(tiny, data, tmp_path / "o", max_new_tokens=3, loaded=loaded, **QUIET)
    assert (summary.written, summary.failed) == (4, 2)
    errors = [json.loads(line) for line in (tmp_path / "o" / "__napo__" / "errors.jsonl").read_text().splitlines()]
    reasons = {entry["idx"]: entry["reason"] for entry in errors}
    assert set(reasons) == {rows[1]["idx"], rows[4]["idx"]}
    assert reasons[rows[1]["idx"]].startswith("undecodable image") and reasons[rows[4]["idx"]] == "empty question"
    assert sorted(read_output(tmp_path / "o")["idx"]) == sorted(r["idx"] for i, r in enumerate(rows) if i not in (1, 4))


def test_missing_columns_are_one_clear_error(tiny, sample, loaded, tmp_path):
    data = tmp_path / "partial.parquet"
    pq.write_table(pq.read_table(sample).drop(["chosen", "idx"]), data)
    with pytest.raises(ValueError, match=r"lacks the RLAIF-V column\(s\) chosen, idx"):
        generate_biased(tiny, data, tmp_path / "o", loaded=loaded, **QUIET)


def test_duplicate_idx_is_an_error(tiny, sample, loaded, tmp_path):
    rows = pq.read_table(sample).to_pylist()[:3]
    rows[2]["idx"] = rows[0]["idx"]
    data = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    with pytest.raises(ValueError, match="appears more than once"):
        generate_biased(tiny, data, tmp_path / "o", max_new_tokens=2, loaded=loaded, **QUIET)


def test_other_settings_are_refused_unless_overwrite(tiny, sample, loaded, tmp_path):
    generate_biased(tiny, sample, tmp_path / "o", max_new_tokens=2, limit=2, loaded=loaded, **QUIET)
    with pytest.raises(ValueError, match="other settings"):
        generate_biased(tiny, sample, tmp_path / "o", max_new_tokens=3, limit=2, loaded=loaded, **QUIET)
    summary = generate_biased(tiny, sample, tmp_path / "o", max_new_tokens=3, limit=2, overwrite=True, loaded=loaded,
                              **QUIET)  # fmt: skip
    assert summary.written == 2 and len(read_output(tmp_path / "o")) == 2


def test_shards_partition_the_input(tiny, sample, loaded, tmp_path):
    written = []
    for index in range(3):
        summary = generate_biased(tiny, sample, tmp_path / "o", max_new_tokens=2, num_shards=3, shard_index=index,
                                  loaded=loaded, **QUIET)  # fmt: skip
        written.append(summary.written)
    frame = read_output(tmp_path / "o")
    assert written == [4, 4, 4]
    assert sorted(frame["idx"]) == sorted(pd.read_parquet(sample)["idx"])  # each row exactly once
    assert {p.name[:11] for p in (tmp_path / "o").glob("part-*")} == {"part-s0000-", "part-s0001-", "part-s0002-"}


def test_shard_defaults_follow_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert _shard_from_env(None, None) == (4, 2)
    assert _shard_from_env(2, 1) == (2, 1)
    assert _shard_from_env(8, None) == (8, 2)  # an explicit shard count still takes this process's RANK
    with pytest.raises(ValueError, match="shard_index"):
        _shard_from_env(2, 2)


def test_inputs_as_parquet_directory_and_saved_dataset(tiny, sample, loaded, tmp_path):
    table = pq.read_table(sample)
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table.slice(0, 5), folder / "a.parquet")
    pq.write_table(table.slice(5, 7), folder / "b.parquet")
    assert generate_biased(tiny, folder, tmp_path / "o1", max_new_tokens=2, loaded=loaded, **QUIET).written == 12
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset(table).save_to_disk(str(saved))
    assert generate_biased(tiny, saved, tmp_path / "o2", max_new_tokens=2, loaded=loaded, **QUIET).written == 12


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "napo", "generate", *args, "--no-progress", "--device", "cpu"]


def test_cli_exit_codes(tiny, sample, tmp_path):
    missing = subprocess.run(_cli("--model", str(tiny), "--data", str(tmp_path / "nope.parquet"), "--output",
                                  str(tmp_path / "o")), capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "no such file" in missing.stderr
    rows = pq.read_table(sample).to_pylist()[:2]
    for row in rows:
        row["image"] = {"bytes": b"garbage", "path": None}
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist(rows), broken)
    failed = subprocess.run(_cli("--model", str(tiny), "--data", str(broken), "--output", str(tmp_path / "o2")),
                            capture_output=True, text=True)  # fmt: skip
    assert failed.returncode == 1 and "0 rows written, 2 skipped with errors" in failed.stdout


def test_sigkill_mid_run_then_rerun_gives_every_row_once(tiny, tmp_path):
    data = make_sample_data(tmp_path / "many.parquet", rows=40)
    out = tmp_path / "o"
    args = _cli("--model", str(tiny), "--data", str(data), "--output", str(out), "--batch-size", "2",
                "--rows-per-part", "2", "--max-new-tokens", "48")  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("part-*.parquet"))) < 2 and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written_before = len(pd.read_parquet(out)) if list(out.glob("part-*.parquet")) else 0
    assert 0 < written_before < 40, f"the kill must land mid-run (rows written: {written_before})"
    rerun = subprocess.run(args, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{written_before} already done" in rerun.stdout
    frame = pd.read_parquet(out)
    assert len(frame) == 40 and frame["idx"].is_unique and set(frame["idx"]) == set(range(40))
    assert not list(out.glob(".tmp-*"))  # no stray temporary files visible as parts


# ---------------------------------------------------------------- input the run must refuse or keep intact (issue 15)


def _write(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_a_duplicate_idx_is_refused_whatever_the_sharding(tiny, sample, loaded, tmp_path):
    rows = pq.read_table(sample).to_pylist()[:6]
    rows[2]["idx"] = rows[1]["idx"]  # rows 1 and 2 land in different shards of 2
    data = _write(rows, tmp_path / "dup.parquet")
    for index in range(2):
        with pytest.raises(ValueError, match=rf"idx {rows[1]['idx']} appears more than once"):
            generate_biased(tiny, data, tmp_path / "o", max_new_tokens=2, num_shards=2, shard_index=index,
                            loaded=loaded, **QUIET)  # fmt: skip
    assert not list((tmp_path / "o").glob("part-*"))  # refused before any row ran


def test_an_idx_of_lists_is_refused_with_exit_code_2(tiny, sample, tmp_path, capsys):
    from napo.cli import main

    rows = pq.read_table(sample).to_pylist()[:2]
    for row in rows:
        row["idx"] = [row["idx"]]
    data = _write(rows, tmp_path / "lists.parquet")
    code = main(["generate", "--model", str(tiny), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--device", "cpu", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "column 'idx' is of type list<" in err and len(err.splitlines()) == 1


def test_an_input_column_named_like_napos_internals_is_kept(tiny, sample, loaded, tmp_path):
    rows = pq.read_table(sample).to_pylist()[:3]
    for row in rows:
        row["_image"] = f"user value {row['idx']}"
    data = _write(rows, tmp_path / "underscore.parquet")
    generate_biased(tiny, data, tmp_path / "o", max_new_tokens=2, loaded=loaded, **QUIET)
    assert read_output(tmp_path / "o")["_image"].tolist() == [f"user value {r['idx']}" for r in rows]


def test_a_parquet_directory_keeps_every_files_columns(tiny, sample, loaded, tmp_path):
    table = pq.read_table(sample).slice(0, 4)
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table.slice(0, 2).drop(["image_path"]), folder / "a.parquet")
    pq.write_table(table.slice(2, 2).append_column("note", pa.array(["x", "y"])), folder / "b.parquet")
    generate_biased(tiny, folder, tmp_path / "o", max_new_tokens=2, loaded=loaded, **QUIET)
    frame = read_output(tmp_path / "o")
    assert frame["note"].isna().tolist() == [True, True, False, False] and frame["note"].tolist()[2:] == ["x", "y"]
    assert frame["image_path"].isna().sum() == 2
    assert frame["image_path"].tolist()[2:] == table["image_path"].to_pylist()[2:]


def test_a_parquet_directory_with_clashing_column_types_is_one_clear_error(tiny, sample, loaded, tmp_path):
    table = pq.read_table(sample).slice(0, 4)
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table.slice(0, 2), folder / "a.parquet")
    as_text = table.slice(2, 2).set_column(table.schema.get_field_index("image_path"), "image_path",
                                          pa.array([1, 2]))  # fmt: skip
    pq.write_table(as_text, folder / "b.parquet")
    with pytest.raises(ValueError, match=r"column 'image_path' is string in .*a\.parquet but int64 in .*b\.parquet"):
        generate_biased(tiny, folder, tmp_path / "o", max_new_tokens=2, loaded=loaded, **QUIET)


def test_a_zero_row_output_reads_as_zero_rows(tiny, sample, loaded, tmp_path):
    datasets = pytest.importorskip("datasets")
    empty = tmp_path / "empty"
    assert generate_biased(tiny, sample, empty, max_new_tokens=2, limit=0, loaded=loaded, **QUIET).written == 0
    # No row, no part: datasets says so (it cannot read a 0-row Parquet file) rather than reading napo's manifest.
    with pytest.raises(datasets.data_files.EmptyDatasetError, match="doesn't contain any data files"):
        datasets.load_dataset(str(empty), split="train")
    assert len(pd.read_parquet(empty)) == 0
    full = tmp_path / "full"
    generate_biased(tiny, sample, full, max_new_tokens=2, limit=3, loaded=loaded, **QUIET)
    assert len(datasets.load_dataset(str(full), split="train")) == 3
    files = sorted(str(p) for p in full.glob("*.parquet"))
    assert len(datasets.load_dataset("parquet", data_files=files, split="train")) == 3


def test_a_manifest_of_the_previous_layout_still_resumes(tiny, sample, loaded, tmp_path):
    from napo.data.generate import MANIFEST

    out = tmp_path / "o"
    generate_biased(tiny, sample, out, max_new_tokens=2, limit=2, loaded=loaded, **QUIET)
    (out / "__napo__" / MANIFEST).rename(out / "_napo_generate.json")  # where napo <= 0.1 kept it
    again = generate_biased(tiny, sample, out, max_new_tokens=2, limit=4, loaded=loaded, **QUIET)
    assert (again.already_done, again.written) == (2, 2)
    with pytest.raises(ValueError, match="other settings"):
        generate_biased(tiny, sample, out, max_new_tokens=3, limit=4, loaded=loaded, **QUIET)


@pytest.mark.parametrize("column", ["question", "chosen"])
def test_a_non_string_text_column_is_refused_naming_it(tiny, sample, loaded, tmp_path, column):
    rows = pq.read_table(sample).to_pylist()[:2]
    for row in rows:
        row[column] = 7
    data = _write(rows, tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=rf"column '{column}' is of type int64; it must hold strings"):
        generate_biased(tiny, data, tmp_path / "o", max_new_tokens=2, loaded=loaded, **QUIET)


def test_image_paths_outside_the_data_directory_are_refused_unless_allowed(tiny, sample, loaded, tmp_path):
    png = pq.read_table(sample).column("image").to_pylist()[0]["bytes"]
    (tmp_path / "outside.png").write_bytes(png)
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "inside.png").write_bytes(png)
    rows = pq.read_table(sample).to_pylist()[:3]
    paths = ["images/inside.png", "../outside.png", str(tmp_path / "outside.png")]
    for row, path in zip(rows, paths, strict=True):
        row["image"] = {"bytes": None, "path": path}
    data = _write(rows, tmp_path / "data" / "paths.parquet")
    summary = generate_biased(tiny, data, tmp_path / "o", max_new_tokens=2, loaded=loaded, **QUIET)
    assert (summary.written, summary.failed) == (1, 2)
    reasons = [e["reason"] for e in summary.errors]
    assert all("outside the data directory" in r and "allow_outside_images" in r for r in reasons), reasons
    allowed = generate_biased(tiny, data, tmp_path / "o2", max_new_tokens=2, allow_outside_images=True,
                              loaded=loaded, **QUIET)  # fmt: skip
    assert (allowed.written, allowed.failed) == (3, 0)
