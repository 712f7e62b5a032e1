"""napo eval: the generation path and the built-in shapes benchmark on the tiny offline LLaVA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from napo.data import load_model, make_tiny_model  # noqa: E402
from napo.eval import evaluate, read_answers  # noqa: E402
from napo.eval.answers import generate_benchmark_answers  # noqa: E402
from napo.eval.benchmark import Decoding, item  # noqa: E402
from napo.eval.shapes import ShapesBench, shape_mentions  # noqa: E402

QUIET = {"progress": False}
SHORT = {"max_new_tokens": 4, "num_beams": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llava")


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(tiny, device="cpu")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "napo", "eval", *args]


def test_shapes_items_are_deterministic_and_well_formed():
    items = ShapesBench(scenarios=3, seed=1).items()
    again = ShapesBench(scenarios=3, seed=1).items()
    assert items == again
    # Per scenario: 6 a/b/c questions, 2 d pairs on two images (4), colour, blank, describe.
    assert len(items) == 3 * 13
    kinds = [json.loads(i["meta"])["kind"] for i in items]
    assert kinds.count("vlind") == 3 * 10 and kinds.count("describe") == 3
    first = [i for i in items if i["idx"].startswith("0000/")]
    a1 = next(i for i in first if i["idx"] == "0000/a1")
    d1 = next(i for i in first if i["idx"] == "0000/d1:0")
    # a1 asks the prior (red) statement by common sense; d1 the drawn colour on the counterfactual image.
    assert a1["question"].startswith("Statement: The ") and "is red." in a1["question"]
    assert "common sense" in a1["question"] and "Based on the image" in d1["question"]
    assert "is red." not in d1["question"]


def test_comparison_figure_has_a_bar_per_model_and_headline_metric():
    from napo.eval import plot_comparison

    rows = [("before", "vlind", "CB", 0.2), ("before", "vlind", "LP", 0.1), ("after", "vlind", "CB", 0.5),
            ("after", "vlind", "LP", 0.4), ("before", "pope", "F1", 0.8), ("after", "pope", "F1", 0.9)]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["model", "benchmark", "metric", "value"])
    figure = plot_comparison(frame)
    vlind, pope = figure.axes
    assert [b.get_height() for b in vlind.patches] == [0.2, 0.1, 0.5, 0.4]  # before: CB, LP; after: CB, LP
    assert [t.get_text() for t in vlind.get_xticklabels()] == ["CB", "LP"]
    assert len(pope.patches) == 2 * 1 and pope.get_title() == "pope"  # F1 only: no model has accuracy, yes-ratio
    assert [t.get_text() for t in pope.get_xticklabels()] == ["F1"]
    assert vlind.get_ylim()[0] == 0


def test_shape_mentions_count_every_shape_word():
    assert shape_mentions("Two circles and a square; another Circle.") == ["circle", "square", "circle"]
    assert shape_mentions("A star next to nothing") == ["star"]
    assert shape_mentions("") == []


def test_shapes_scoring_by_hand():
    """Two scenarios with made-up answers; every metric computed by hand here."""
    bench = ShapesBench(scenarios=2, seed=0)
    items = bench.items()
    frame = pd.DataFrame(items)
    answers = {}
    for row in items:
        meta = json.loads(row["meta"])
        scenario = int(row["idx"][:4])
        if meta["kind"] == "vlind":
            # Scenario 0 passes every pair; scenario 1 passes a, b and c but says True to d2 on image 1.
            part = meta["part"]
            answer = "True" if part.startswith(("a1", "b1", "c1", "d1")) else "False"
            if scenario == 1 and part == "d2:1":
                answer = "True."
            answers[row["idx"]] = answer
        elif meta["kind"] == "color":
            answers[row["idx"]] = f"It is {meta['truth']}." if scenario == 0 else "It is red."
        elif meta["kind"] == "blank":
            answers[row["idx"]] = "red" if scenario == 0 else "I cannot tell."
        else:
            truth = meta["truth"]
            answers[row["idx"]] = f"A {truth[0]} and a star." if scenario == 0 else f"A {truth[0]}."
    frame["answer"] = frame["idx"].map(answers)
    metrics, per_item = bench.score(frame)
    assert metrics["instances"] == 2 and metrics["images"] == 4
    assert metrics["CK"] == 1.0 and metrics["VP"] == 1.0 and metrics["CB"] == 1.0
    # LP: scenario 0 passes 2 of 2 images, scenario 1 passes 1 of 2: (1 + 0.5) / 2 b-and-c passes.
    assert metrics["LP"] == pytest.approx(0.75)
    assert metrics["LP_micro"] == pytest.approx(3 / 4)
    assert metrics["color_accuracy"] == 0.5 and metrics["blank_prior_rate"] == 0.5
    # Descriptions: scenario 0 mentions one drawn shape and a star (hallucinated), scenario 1 one drawn shape.
    assert metrics["CHAIRs"] == 0.5 and metrics["CHAIRi"] == pytest.approx(1 / 3)
    drawn = sum(len(json.loads(r["meta"])["truth"]) for r in items if json.loads(r["meta"])["kind"] == "describe")
    assert metrics["recall"] == pytest.approx(2 / drawn)
    assert len(per_item) == len(items)


def test_evaluate_end_to_end_two_models_and_rescoring(tiny, loaded, tmp_path):
    other = make_tiny_model(tmp_path / "llava-other", seed=1)
    out = tmp_path / "eval"
    options = {"shapes": {"scenarios": 2}}
    result = evaluate(
        [tiny, other], "shapes", out, options=options, batch_size=8, loaded={tiny: loaded}, **SHORT, **QUIET
    )
    assert [s.written for _, _, s in result.summaries] == [26, 26]
    assert list(result.table["model"]) == ["llava", "llava-other"]
    assert "shapes CB ↑" in result.table.columns and "shapes CHAIRi ↓" in result.table.columns
    record = json.loads((out / "shapes" / "metrics.json").read_text())
    assert set(record["models"]) == {"llava", "llava-other"}
    run = record["models"]["llava"]
    assert (run["items"], run["answered"], run["skipped"]) == (26, 26, 0)
    assert run["decoding"] == {"max_new_tokens": 4, "num_beams": 1, "temperature": 0.0, "prompt_format": "template",
                               "do_sample": False}  # fmt: skip
    csv = pd.read_csv(out / "shapes" / "metrics.csv")
    assert set(csv["model"]) == {"llava", "llava-other"} and "LP" in set(csv["metric"])
    assert len(pd.read_csv(out / "shapes" / "items-llava.csv")) == 26
    report = (out / "report.md").read_text()
    assert "| model | shapes CB ↑" in report and "| greedy, 1 beam(s), max 4 new tokens |" in report
    assert "| `LP` |" in report and "Files in `shapes/`: `metrics.json`, `metrics.csv`, `items-<model>.csv`." in report
    assert (out / "comparison.png").stat().st_size > 0
    # The answers alone give the same metrics, with no model loaded.
    again = evaluate(None, ["shapes"], tmp_path / "rescored", answers=out, options=options, **QUIET)
    pd.testing.assert_frame_equal(again.metrics, result.metrics)
    assert again.summaries == []


def test_batched_answers_equal_one_at_a_time(tiny, loaded, tmp_path):
    bench = ShapesBench(scenarios=1)
    decoding = Decoding(max_new_tokens=5, num_beams=1)
    for name, size in (("one", 1), ("many", 13)):
        generate_benchmark_answers(
            bench, tiny, tmp_path / name, loaded=loaded, decoding=decoding, batch_size=size, **QUIET
        )
    one, many = read_answers(tmp_path / "one").frame, read_answers(tmp_path / "many").frame
    assert one["answer"].tolist() == many["answer"].tolist() and len(one) == 13


class _OneBadImage(ShapesBench):
    def items(self):
        rows = super().items()
        rows[2] = item(rows[2]["idx"], b"this is not an image", rows[2]["question"], **json.loads(rows[2]["meta"]))
        return rows


def test_a_corrupt_image_is_logged_and_skipped(tiny, loaded, tmp_path):
    bench = _OneBadImage(scenarios=1)
    bad_idx = bench.items()[2]["idx"]
    summary = generate_benchmark_answers(bench, tiny, tmp_path / "a", loaded=loaded, decoding=Decoding(3, 1), **QUIET)
    assert (summary.written, summary.failed) == (12, 1)
    answers = read_answers(tmp_path / "a")
    assert bad_idx not in set(answers.frame["idx"]) and answers.complete
    assert answers.errors[0]["idx"] == bad_idx and answers.errors[0]["reason"].startswith("undecodable image")
    metrics, _ = bench.score(answers.frame)  # the skipped question parses as "NA": its pair fails
    assert metrics["instances"] == 1


def test_other_settings_are_refused_unless_overwrite(tiny, loaded, tmp_path):
    bench = ShapesBench(scenarios=1)
    generate_benchmark_answers(bench, tiny, tmp_path / "a", loaded=loaded, decoding=Decoding(3, 1), **QUIET)
    with pytest.raises(ValueError, match="other settings"):
        generate_benchmark_answers(bench, tiny, tmp_path / "a", loaded=loaded, decoding=Decoding(4, 1), **QUIET)
    with pytest.raises(ValueError, match="other settings"):
        generate_benchmark_answers(
            ShapesBench(scenarios=1, seed=5), tiny, tmp_path / "a", loaded=loaded, decoding=Decoding(3, 1), **QUIET
        )
    again = generate_benchmark_answers(
        bench, tiny, tmp_path / "a", loaded=loaded, decoding=Decoding(4, 1), overwrite=True, **QUIET
    )
    assert again.written == 13


def test_shards_answer_disjoint_items_that_cover_the_benchmark(tiny, loaded, tmp_path):
    bench = ShapesBench(scenarios=1)
    for shard in (0, 1):
        generate_benchmark_answers(
            bench,
            tiny,
            tmp_path / "a",
            loaded=loaded,
            decoding=Decoding(2, 1),
            num_shards=2,
            shard_index=shard,
            **QUIET,
        )
    frame = read_answers(tmp_path / "a").frame
    assert len(frame) == 13 and set(frame["idx"]) == {i["idx"] for i in bench.items()}


def test_cli_sigkill_mid_run_then_rerun_answers_every_item_once(tiny, tmp_path):
    out = tmp_path / "o"
    args = _cli(
        "--model",
        str(tiny),
        "--benchmark",
        "shapes",
        "--shapes-scenarios",
        "4",
        "--output",
        str(out),
        "--batch-size",
        "2",
        "--rows-per-part",
        "2",
        "--max-new-tokens",
        "24",
        "--device",
        "cpu",
    )
    answers = out / "answers" / "llava" / "shapes"
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(answers.glob("part-*.parquet"))) < 2 and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = len(read_answers(answers).frame)
    assert 0 < before < 52, f"the kill must land mid-run (items answered: {before})"
    rerun = subprocess.run(args, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{before} already done" in rerun.stdout
    frame = pd.concat([pq.read_table(p).to_pandas() for p in answers.glob("part-*.parquet")])
    assert len(frame) == 52 and frame["idx"].is_unique
    assert set(frame["idx"]) == {i["idx"] for i in ShapesBench(scenarios=4).items()}
    assert json.loads((out / "shapes" / "metrics.json").read_text())["models"]["llava"]["answered"] == 52


def test_cli_missing_files_exit_2_listing_them(tiny, tmp_path, capsys):
    from napo.cli import main

    (tmp_path / "data" / "vlind").mkdir(parents=True)
    code = main(
        [
            "eval",
            "--model",
            str(tiny),
            "--benchmark",
            "vlind,pope,shapes",
            "--data-dir",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "data" / "vlind" / "data.json") in err
    assert str(tmp_path / "data" / "pope" / "coco_pope_random.json") in err
    assert "2 required file(s) missing" in err
    assert not (tmp_path / "o" / "answers").exists()  # refused before any model loaded or item ran


def test_cli_answers_without_model_and_unknown_benchmark(tmp_path, capsys):
    from napo.cli import main

    assert main(["eval", "--benchmark", "shapes", "--output", str(tmp_path / "o")]) == 2
    assert "give --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "m", "--benchmark", "shapes,nope", "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert (
        main(["eval", "--answers", str(tmp_path / "none"), "--benchmark", "shapes", "--output", str(tmp_path / "o")])
        == 2
    )
    assert "no such answers directory" in capsys.readouterr().err


# ---------------------------------------------------------------- every file-based benchmark, end to end

from test_eval_chair import STUB_TOOLS, amber_dir, objhal_dir, stub_similarity  # noqa: E402, F401
from test_eval_metrics import pope_dir, vlind_dir  # noqa: E402, F401
from test_eval_mmhal import mmhal_dir  # noqa: E402, F401


class _CountingJudge:
    name = "counting test judge"
    is_gpt4 = False

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompt: str) -> str:
        self.calls += 1
        return "Looks fine. Rating: 3"


@pytest.mark.usefixtures("vlind_dir", "pope_dir", "objhal_dir", "amber_dir", "mmhal_dir")  # each under tmp_path/<name>
def test_evaluate_every_file_based_benchmark_on_its_fixtures(tiny, loaded, tmp_path):
    judge = _CountingJudge()
    options = {
        "objhal": {"tools": STUB_TOOLS},
        "amber": {"tools": STUB_TOOLS, "similarity": stub_similarity},
        "mmhal": {"judge": judge},
    }
    names = "vlind,objhal,amber,mmhal,pope"
    out = tmp_path / "report"
    result = evaluate(tiny, names, out, data_dir=tmp_path, options=options, loaded={tiny: loaded}, **SHORT, **QUIET)
    expected_items = {"vlind": 28, "objhal": 3, "amber": 2, "mmhal": 10, "pope": 8}
    for name, count in expected_items.items():
        run = json.loads((out / name / "metrics.json").read_text())["models"]["llava"]
        assert (run["items"], run["answered"], run["skipped"]) == (count, count, 0), name
    assert judge.calls == 10
    assert {"VLind CB ↑", "ObjHal CHAIRs ↓", "AMBER Cog ↓", "POPE F1 ↑", "MMHal HalRate ↓"} <= set(result.table.columns)
    assert result.metrics.query("benchmark == 'mmhal' and metric == 'score'")["value"].item() == 3.0
    report = (out / "report.md").read_text()
    assert "not GPT-4" in report  # the judge is named as not the paper's (nothing to escape in it)
    assert "not GPT-4" in pd.read_csv(out / "mmhal" / "metrics.csv")["note"].iloc[0]
    # Rescoring the kept answers gives the same numbers and asks the judge nothing again.
    again = evaluate(None, names, tmp_path / "again", data_dir=tmp_path, answers=out, options=options, **QUIET)
    pd.testing.assert_frame_equal(again.metrics, result.metrics)
    assert judge.calls == 10


def test_decoding_follows_the_reference_scripts_sampling_and_prompt_format(tiny, loaded, tmp_path, monkeypatch):
    """Object HalBench, AMBER and MMHal answers are sampled at temperature 0.2 with 3 beams, as the authors'
    muffin_vqa.py defaults; the sampling is seeded (a rerun of a batch gives the same answers) and the
    prompt format (llava_v1, the scripts' conversation) reaches the prompts."""
    import napo.data.generate as generate
    from napo.data.generate import GenerationSettings, generate_answers
    from napo.eval.benchmark import Decoding

    model, processor = loaded
    seen: dict = {}
    original = model.generate

    def spy(**kwargs):
        seen.update({k: v for k, v in kwargs.items() if k in ("do_sample", "temperature", "num_beams")})
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    prompts = ["USER: hello ASSISTANT:"] * 2
    sampled = GenerationSettings(max_new_tokens=6, num_beams=1, temperature=0.7)
    first = generate_answers(model, processor, prompts, None, sampled)
    assert seen == {"do_sample": True, "temperature": 0.7, "num_beams": 1}
    assert generate_answers(model, processor, prompts, None, sampled) == first  # seeded
    generate_answers(model, processor, prompts, None, GenerationSettings(max_new_tokens=6, num_beams=1))
    assert seen["do_sample"] is False
    monkeypatch.setattr(model, "generate", original)

    asked: list[str] = []

    def record(model, processor, prompts, images, settings):
        asked.extend(prompts)
        assert settings.temperature == 0.0
        return ["red"] * len(prompts)

    monkeypatch.setattr(generate, "generate_answers", record)
    bench = ShapesBench(scenarios=1, seed=5)
    generate_benchmark_answers(bench, tiny, tmp_path / "a", loaded=loaded,
                               decoding=Decoding(3, 1, prompt_format="llava_v1"), **QUIET)  # fmt: skip
    system = "A chat between a curious human and an artificial intelligence assistant."
    assert asked and all(p.startswith(system) and p.endswith(" ASSISTANT:") for p in asked)


def test_shapes_kinds_keep_a_subset_of_the_same_items_and_metrics():
    full = ShapesBench(scenarios=3, seed=2).items()
    bench = ShapesBench(scenarios=3, seed=2, kinds=("color", "describe"))
    subset = bench.items()
    assert subset == [i for i in full if json.loads(i["meta"])["kind"] in ("color", "describe")]  # same pictures
    frame = pd.DataFrame(subset)
    frame["answer"] = ["It is red." if json.loads(m)["kind"] == "color" else "A star." for m in frame["meta"]]
    metrics, per_item = bench.score(frame)
    assert set(metrics) == {"color_accuracy", "CHAIRs", "CHAIRi", "recall"}  # no VLind scores, no blank rate
    assert metrics["color_accuracy"] == 0.0 and metrics["CHAIRs"] == 1.0 and len(per_item) == 6
    for bad in ((), ("color", "color"), ("colour",)):
        with pytest.raises(ValueError, match="kinds must be"):
            ShapesBench(kinds=bad)


def test_shapes_kinds_option_on_the_command_line(tmp_path, capsys):
    from napo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            ["eval", "--model", "m", "--benchmark", "shapes", "--shapes-kinds", "color,nope", "--output", str(tmp_path)]
        )
    assert exit_info.value.code == 2 and "distinct comma-separated kinds among vlind" in capsys.readouterr().err
