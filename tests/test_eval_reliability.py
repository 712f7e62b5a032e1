"""napo eval against a hostile user, round 2 (issue 23): resumed sampled runs, --answers validation, locks."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

import napo.eval.answers as answers_module  # noqa: E402
from napo.data import load_model, make_tiny_model  # noqa: E402
from napo.eval import read_answers  # noqa: E402
from napo.eval.answers import generate_benchmark_answers  # noqa: E402
from napo.eval.benchmark import Decoding  # noqa: E402
from napo.eval.shapes import ShapesBench  # noqa: E402

QUIET = {"progress": False}


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
    decoding = Decoding(max_new_tokens=6, num_beams=1, temperature=temperature)
    whole = _answers_after_kills(tiny, loaded, tmp_path / "whole", decoding, [], monkeypatch)
    if temperature:
        assert len(set(whole)) > 3, "sampling at temperature 1 must give varied answers for the test to mean anything"
    for kills in ([1], [2, 1], [1, 1, 1]):
        name = "-".join(map(str, kills))
        assert _answers_after_kills(tiny, loaded, tmp_path / name, decoding, kills, monkeypatch) == whole, kills
    one_by_one = tmp_path / "one"
    generate_benchmark_answers(ShapesBench(scenarios=1), tiny, one_by_one, loaded=loaded, decoding=decoding,
                               batch_size=1, **QUIET)  # fmt: skip
    assert read_answers(one_by_one).frame["answer"].tolist() == whole
