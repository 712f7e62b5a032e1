"""The `napo` command line: the demo (the README's main job) and argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from napo.cli import main
from napo.demo import run_demo


def test_demo_prints_a_table_starting_at_q_one_and_uniform_weights(capsys, tmp_path):
    assert main(["demo", "--steps", "9", "--batch-size", "16", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    if (tmp_path / "rlaif-v-bias").exists():  # the data step ran (napo[data] installed)
        assert out.startswith("Step 1: 16 rows answered") and "question_only:" in out
    else:
        assert "skipping the data step" in out
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
