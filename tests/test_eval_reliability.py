"""napo eval against a hostile user, round 2 (issue 23): resumed sampled runs, --answers validation, locks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

import napo.eval.answers as answers_module  # noqa: E402
from napo.data import load_model, make_tiny_model  # noqa: E402
from napo.eval import evaluate, read_answers  # noqa: E402
from napo.eval.answers import generate_benchmark_answers  # noqa: E402
from napo.eval.benchmark import Decoding  # noqa: E402
from napo.eval.shapes import ShapesBench  # noqa: E402

QUIET = {"progress": False}
SHORT = {"max_new_tokens": 2, "num_beams": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llava")


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(tiny, device="cpu")


class _Killed(BaseException):
    """Stands for a SIGKILL between two batches (BaseException: no row is logged as failed for it)."""


def _answers_after_kills(tiny, loaded, out: Path, decoding: Decoding, kills: list[int], monkeypatch) -> list[str]:
    """Runs the benchmark into ``out``, killed after each count of batches in ``kills`` and rerun, then
    finished; the answers in idx order."""
    bench = ShapesBench(scenarios=1)
    original = answers_module._answer_batch
    for after in kills:
        calls = {"n": 0}

        def dying(*args, after=after, calls=calls):
            if calls["n"] == after:
                raise _Killed
            calls["n"] += 1
            return original(*args)

        monkeypatch.setattr(answers_module, "_answer_batch", dying)
        with pytest.raises(_Killed):
            generate_benchmark_answers(bench, tiny, out, loaded=loaded, decoding=decoding, batch_size=4,
                                       rows_per_part=3, **QUIET)  # fmt: skip
    monkeypatch.setattr(answers_module, "_answer_batch", original)
    generate_benchmark_answers(bench, tiny, out, loaded=loaded, decoding=decoding, batch_size=4, rows_per_part=3,
                               **QUIET)  # fmt: skip
    frame = read_answers(out).frame
    assert len(frame) == 13 and frame["idx"].is_unique
    return frame["answer"].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.0], ids=["sampled", "greedy"])
def test_killed_and_resumed_answers_equal_the_uninterrupted_run(tiny, loaded, tmp_path, monkeypatch, temperature):
    """Defect 6: a sampled answer is seeded per item (run seed, idx), so neither a resume (which batches the
    remaining items differently) nor another batch size changes it."""
    decoding = Decoding(max_new_tokens=4, num_beams=1, temperature=temperature)
    whole = _answers_after_kills(tiny, loaded, tmp_path / "whole", decoding, [], monkeypatch)
    if temperature:
        assert len(set(whole)) > 3, "sampling at temperature 1 must give varied answers for the test to mean anything"
    for kills in ([1], [2, 1]):
        name = "-".join(map(str, kills))
        assert _answers_after_kills(tiny, loaded, tmp_path / name, decoding, kills, monkeypatch) == whole, kills
    one_by_one = tmp_path / "one"
    generate_benchmark_answers(ShapesBench(scenarios=1), tiny, one_by_one, loaded=loaded, decoding=decoding,
                               batch_size=1, **QUIET)  # fmt: skip
    assert read_answers(one_by_one).frame["answer"].tolist() == whole


# ---------------------------------------------------------------- napo eval --answers trusts nothing it reads


def write_pope(root: Path, labels: dict[int, str] | None = None) -> Path:
    """A 4-question POPE file (question ids 1-4) and its two images under ``root/pope``."""
    from PIL import Image

    labels = labels or {1: "yes", 2: "no", 3: "yes", 4: "no"}
    pope = root / "pope"
    (pope / "images").mkdir(parents=True, exist_ok=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8), (10, 200, 30)).save(pope / "images" / name, format="JPEG")
    lines = [json.dumps({"question_id": q, "image": "ab"[q % 2] + ".jpg", "text": f"Is there a thing {q}?",
                         "label": label}) for q, label in labels.items()]  # fmt: skip
    (pope / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def pope_answers(tiny, loaded, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(data dir, an eval output holding the tiny model's POPE answers, its metrics)."""
    root = tmp_path_factory.mktemp("pope-answers")
    data = write_pope(root / "data")
    result = evaluate(tiny, "pope", root / "out", data_dir=data, loaded={tiny: loaded}, **SHORT, **QUIET)
    return data, root / "out", result.metrics


def _copy(pope_answers, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the answers to tamper with, and the folder of its one model's POPE answers."""
    out = pope_answers[1]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy, copy / "answers" / "llava" / "pope"


def _rescore(pope_answers, answers: Path, tmp_path: Path, data: Path | None = None):
    return evaluate(None, "pope", tmp_path / "rescored", data_dir=data or pope_answers[0], answers=answers, **QUIET)


def _write_part(folder: Path, name: str, rows: list[dict]) -> Path:
    import pyarrow as pa

    path = folder / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_rescoring_untouched_answers_gives_the_same_metrics(pope_answers, tmp_path):
    copy, _ = _copy(pope_answers, tmp_path)
    pd.testing.assert_frame_equal(_rescore(pope_answers, copy, tmp_path).metrics, pope_answers[2])


def test_an_answer_to_an_item_the_benchmark_lacks_is_refused(pope_answers, tmp_path):
    """Defect 2: a ninth answer (idx random/99) was scored: "9 answered of 8 items", marked complete."""
    copy, folder = _copy(pope_answers, tmp_path)
    part = _write_part(folder, "part-s0007-000000.parquet", [{"idx": "random/99", "image": "images/a.jpg",
                       "question": "Is there?", "meta": json.dumps({"category": "random", "label": "yes"}),
                       "answer": "Yes"}])  # fmt: skip
    with pytest.raises(ValueError, match=r"random/99.*not an item of the benchmark") as error:
        _rescore(pope_answers, copy, tmp_path)
    assert str(part) in str(error.value)


def test_answers_are_scored_against_the_benchmark_named_not_their_stored_copy(pope_answers, tmp_path):
    """Defect 3: the labels stored with the answers were scored and --data-dir's benchmark was ignored."""
    copy, folder = _copy(pope_answers, tmp_path)
    # Labels changed inside the answer parts: the scores stay the benchmark's.
    for part in folder.glob("part-*.parquet"):
        frame = pq.read_table(part).to_pandas()
        frame["meta"] = [json.dumps({**json.loads(m), "label": "no"}) for m in frame["meta"]]
        pq.write_table(pq.read_table(part).from_pandas(frame, preserve_index=False), part)
    pd.testing.assert_frame_equal(_rescore(pope_answers, copy, tmp_path).metrics, pope_answers[2])
    # A relabelled benchmark in --data-dir: refused, saying what differs.
    relabelled = write_pope(tmp_path / "relabelled", {1: "yes", 2: "no", 3: "no", 4: "no"})
    with pytest.raises(ValueError, match=r"other items.*the meta of 1 item\(s\) \(e\.g\. 'random/3'\)"):
        _rescore(pope_answers, copy, tmp_path, data=relabelled)


@pytest.mark.parametrize("bad", [None, 3, float("nan")], ids=["null", "int", "nan"])
def test_an_answer_that_is_not_text_is_refused_naming_the_part(pope_answers, tmp_path, bad):
    """Defect 4: a null, int or NaN answer gave a traceback."""
    copy, folder = _copy(pope_answers, tmp_path)
    part = next(folder.glob("part-*.parquet"))
    frame = pq.read_table(part).to_pandas()
    answers = frame["answer"].tolist()
    answers[1] = bad
    if isinstance(bad, int):
        answers = [bad] * len(answers)  # an int column (Parquet columns have one type)
    frame["answer"] = answers
    frame.to_parquet(part, index=False)
    with pytest.raises(ValueError, match=r"row \d \(idx '.*'\): answer must be a string") as error:
        _rescore(pope_answers, copy, tmp_path)
    assert str(part) in str(error.value)


def test_a_part_without_an_answer_column_is_refused_and_one_without_meta_is_scored(pope_answers, tmp_path):
    copy, folder = _copy(pope_answers, tmp_path)
    part = next(folder.glob("part-*.parquet"))
    table = pq.read_table(part)
    pq.write_table(table.drop_columns(["meta"]), part)
    pd.testing.assert_frame_equal(_rescore(pope_answers, copy, tmp_path).metrics, pope_answers[2])
    pq.write_table(table.drop_columns(["answer"]), part)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) answer") as error:
        _rescore(pope_answers, copy, tmp_path)
    assert str(part) in str(error.value)


@pytest.mark.parametrize("text", ["[1, 2]", '"eval"', '{"settings": 3}', '{"settings": {"items": "8"}}', "\xff"])
def test_a_manifest_that_is_not_an_object_is_a_clear_error(pope_answers, tmp_path, capsys, text):
    """Defect 5: an eval.json holding valid JSON that is not an object raised AttributeError."""
    from napo.cli import main

    copy, folder = _copy(pope_answers, tmp_path)
    manifest = folder / "__napo__" / "eval.json"
    manifest.write_bytes(text.encode("latin-1"))
    code = main(["eval", "--answers", str(copy), "--benchmark", "pope", "--data-dir", str(pope_answers[0]),
                 "--output", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert code == 2
    assert str(manifest) in capsys.readouterr().err


def test_the_same_item_answered_differently_in_two_parts_is_refused(pope_answers, tmp_path):
    copy, folder = _copy(pope_answers, tmp_path)
    first = pq.read_table(next(folder.glob("part-*.parquet"))).to_pylist()[0]
    _write_part(folder, "part-s0007-000000.parquet", [{**first, "answer": first["answer"] + " (other)"}])
    with pytest.raises(ValueError, match=rf"idx '{first['idx']}' is answered twice, differently"):
        _rescore(pope_answers, copy, tmp_path)


def test_skipped_items_count_once_and_a_bad_error_line_is_named(pope_answers, tmp_path):
    """Defect 7's counts: an item logged as skipped twice, or skipped then answered, counts once (23 answered
    + 2 skipped of 24 items before)."""
    copy, folder = _copy(pope_answers, tmp_path)
    answered = pq.read_table(next(folder.glob("part-*.parquet"))).column("idx").to_pylist()
    errors = folder / "__napo__" / "errors.jsonl"
    entry = {"idx": answered[0], "reason": "undecodable image", "shard": 0}
    errors.write_text(json.dumps(entry) + "\n" + json.dumps(entry) + "\n")
    read = read_answers(folder)
    assert (len(read.frame), len(read.errors), read.total) == (4, 0, 4)
    errors.write_text("[1, 2]\n" + json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a JSON object") as error:
        _rescore(pope_answers, copy, tmp_path)
    assert str(errors) in str(error.value)


def test_a_second_model_into_the_same_output_keeps_the_first_in_the_report(tiny, loaded, tmp_path):
    other = make_tiny_model(tmp_path / "llava-other", seed=1)
    out = tmp_path / "eval"
    options = {"shapes": {"scenarios": 1}}
    evaluate(tiny, "shapes", out, options=options, loaded={tiny: loaded}, **SHORT, **QUIET)
    result = evaluate(other, "shapes", out, options=options, **SHORT, **QUIET)
    assert list(result.table["model"]) == ["llava-other", "llava"]
    assert set(json.loads((out / "shapes" / "metrics.json").read_text())["models"]) == {"llava", "llava-other"}
    assert "| llava |" in (out / "report.md").read_text()


def test_a_second_eval_into_the_same_output_is_refused_naming_the_first(tiny, loaded, tmp_path):
    """Defect 7: two runs into one output took no lock (and counted an item skipped twice)."""
    import os
    import socket

    from napo.eval.run import output_lock

    out = tmp_path / "eval"
    options = {"shapes": {"scenarios": 1}}
    with output_lock(out), pytest.raises(ValueError, match="in use by another napo eval") as error:
        evaluate(tiny, "shapes", out, options=options, loaded={tiny: loaded}, **SHORT, **QUIET)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(error.value)
    assert not (out / "answers").exists()  # refused before anything was written
    # Another shard may share the output; the lock goes with the run that held it.
    with output_lock(out, shard_index=1):
        evaluate(tiny, "shapes", out, options=options, loaded={tiny: loaded}, num_shards=2, shard_index=0, **SHORT,
                 **QUIET)  # fmt: skip
    evaluate(tiny, "shapes", out, options=options, loaded={tiny: loaded}, **SHORT, **QUIET)


def test_the_outside_images_hint_names_an_option_eval_has(tiny, tmp_path, capsys):
    """Issue 23: eval's per-item hint named --allow-outside-images, which napo eval rejected as unknown. A POPE
    images/ folder that links to a copy elsewhere is refused item by item with the hint, and the option works."""
    from napo.cli import main

    data = write_pope(tmp_path / "data")
    elsewhere = tmp_path / "coco"
    (data / "pope" / "images").rename(elsewhere)
    (data / "pope" / "images").symlink_to(elsewhere)
    command = ["eval", "--model", str(tiny), "--benchmark", "pope", "--data-dir", str(data), "--max-new-tokens",
               "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*command, "--output", str(tmp_path / "refused")]) == 1  # nothing answered
    errors = read_answers(tmp_path / "refused" / "answers" / "llava" / "pope").errors
    assert len(errors) == 4 and all("--allow-outside-images" in e["reason"] for e in errors)
    capsys.readouterr()
    assert main([*command, "--output", str(tmp_path / "allowed"), "--allow-outside-images"]) == 0
    assert "4 answered, 0 skipped" in capsys.readouterr().out


class _OneLongQuestion(ShapesBench):
    def items(self):
        rows = super().items()
        rows[1] = {**rows[1], "question": "Is the square red? " * 10_000}  # 50,000 words
        return rows


def test_a_question_past_the_models_context_is_skipped_and_counted(tiny, loaded, tmp_path):
    """Issue 23: a 50,000-word question was generated from (time grows with the square of its length)."""
    import time

    bench = _OneLongQuestion(scenarios=1)
    started = time.perf_counter()
    summary = generate_benchmark_answers(bench, tiny, tmp_path / "a", loaded=loaded, decoding=Decoding(2, 1), **QUIET)
    assert (summary.written, summary.failed) == (12, 1)
    (error,) = read_answers(tmp_path / "a").errors
    assert error["idx"] == bench.items()[1]["idx"] and error["reason"].startswith("question too long: ")
    assert "the model's context is 2048" in error["reason"] and time.perf_counter() - started < 60


@pytest.mark.parametrize("problem", ["empty", "repeated"])
def test_benchmark_data_is_refused_before_any_model_loads(tmp_path, problem):
    """Issue 23: an empty file or repeated ids were refused only after the model had loaded."""
    data = write_pope(tmp_path / "data")
    path = data / "pope" / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    path.write_text("" if problem == "empty" else "\n".join([lines[0], lines[0]]) + "\n")
    expected = "has no items" if problem == "empty" else "repeat the idx 'random/1'"
    with pytest.raises(ValueError, match=expected) as error:
        evaluate(str(tmp_path / "no-such-model"), "pope", tmp_path / "out", data_dir=data, **QUIET)
    assert str(data / "pope") in str(error.value)
    assert not (tmp_path / "out").exists()  # a refused run writes nothing
