"""The `napo` command line: the demo (the README's main job) and argument errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from napo.cli import main
from napo.demo import run_demo


def test_demo_objective_only_prints_the_toy_table(capsys):
    assert main(["demo", "--objective-only", "--steps", "9", "--batch-size", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "loss", "q_lang"])
    first = lines[header + 2].split()
    assert first[0] == "0" and first[2:4] == ["1.0000", "1.0000"] and first[4:7] == ["0.333"] * 3
    assert any(line.startswith("9 steps of batch 16") for line in lines)


def test_demo_learns_and_q_falls_below_one():
    rows = run_demo(steps=40, batch_size=32, print_every=39)
    assert rows[0]["q_language"] == 1.0 and rows[0]["loss"] > rows[-1]["loss"]
    assert rows[-1]["q_language"] < 1.0 and rows[-1]["q_vision"] < 1.0
    assert rows[-1]["margin_original"] > 0


@pytest.mark.parametrize(
    "argv",
    [["demo", "--steps", "0"], ["demo", "--beta", "-1"], ["frobnicate"], [], ["generate", "--model", "m"],
     ["make-sample-data", "x.parquet", "--rows", "0"]],
)  # fmt: skip
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: napo" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--local_rank=1", "--local-rank=0"])
def test_the_local_rank_deepspeeds_launcher_passes_is_accepted(flag, tmp_path, capsys):
    """`deepspeed --module napo train ...` runs `python -m napo --local_rank=N train ...` in each process."""
    assert main([flag, "make-sample-data", str(tmp_path / "s.parquet"), "--rows", "2"]) == 0
    assert "2 sample rows written" in capsys.readouterr().out


def test_python_dash_m_napo_runs():
    result = subprocess.run([sys.executable, "-m", "napo", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("napo ")


def test_objective_quickstart_example_runs():
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "objective_quickstart.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("loss ") and "napo/q_language" in result.stdout


def test_make_commands_write_loadable_artifacts(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["make-tiny-model", str(tmp_path / "m")]) == 0
    assert main(["make-sample-data", str(tmp_path / "s.parquet"), "--rows", "5"]) == 0
    assert "5 sample rows written" in capsys.readouterr().out
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    AutoProcessor.from_pretrained(tmp_path / "m")


def test_demo_runs_the_whole_pipeline_then_its_next_commands_work_as_printed(capsys, tmp_path, monkeypatch):
    """`napo demo` on a reduced size (8 rows, 3 eval scenarios), in the default workdir as a user runs it."""
    import json
    import os
    import shlex

    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--rows", "8", "--eval-scenarios", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    workdir = tmp_path / "napo-demo"
    # Step 0-1: the pretrained model's prior, then its biased answers: sentences, the prior's colour without the image.
    assert out.startswith("Step 0: a tiny LLaVA pretrained on the sample world") and "without the picture" in out
    assert "Step 1: 8 rows answered by the pretrained tiny LLaVA" in out
    blind = [line.split("question_only:")[1].strip() for line in lines if line.strip().startswith("question_only:")]
    assert blind and all(re.fullmatch(r"The (circle|square|triangle) in the image is red\.|The picture shows .*\.", b)
                         for b in blind)  # fmt: skip
    # Step 3: the NaPO table, one row per step (8 rows: 4 epochs x 2 batches of 4), q = 1 and uniform weights at 1.
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["step", "loss", "q_orig", "q_lang"])
    rows = [line.split() for line in lines[header + 1 : header + 9]]
    assert [int(r[0]) for r in rows] == list(range(1, 9))
    assert rows[0][3:5] == ["1.0000", "1.0000"] and rows[0][5:8] == ["0.3333"] * 3
    assert (workdir / "napo-run" / "reference-logps").is_dir() and "Baseline: DPO" in out
    # Step 4: the before/after table holds napo eval's own numbers (metrics.json), for the three models.
    table_start = next(i for i, line in enumerate(lines) if line.startswith("Step 4: napo eval --benchmark shapes"))
    assert lines[table_start + 1].split() == ["pretrained", "dpo-run", "napo-run"]
    record = json.loads((workdir / "eval" / "shapes" / "metrics.json").read_text())
    accuracy_line = next(line for line in lines[table_start:] if line.startswith("  colour right on a non-red shape"))
    printed = [float(v) for v in accuracy_line.split()[-3:]]
    stored = [record["models"][tag]["metrics"]["color_accuracy"] for tag in ("pretrained", "dpo-run", "napo-run")]
    assert printed == [round(v, 3) for v in stored]
    report = (workdir / "eval" / "report.md").read_text()
    assert (workdir / "eval" / "comparison.png").is_file() and "shapes colour acc" in report
    assert "shapes CB" not in report  # the VLind kind was not asked: no empty column for it
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(workdir / "napo-run")
    # The next commands, run as printed.
    start = lines.index("Next, on what the demo made:")
    commands = [shlex.split(line) for line in lines[start + 1 :] if line.startswith("  napo ")]
    assert len(commands) >= 2 and any("--run" in words for words in commands)
    assert (workdir / "napo-run" / "trainer_state.json").is_file()  # no checkpoints, still a state
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for words in commands:
        result = subprocess.run([sys.executable, "-m", *words], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)  # fmt: skip
        assert result.returncode == 0, (words, result.stderr[-2000:])
        output = Path(tmp_path, words[words.index("--output") + 1])
        assert (output / "report.md").is_file()
        if "--run" in words:
            assert (output / "training_curves.png").is_file() and "training_curves.png" in (
                output / "report.md"
            ).read_text()
