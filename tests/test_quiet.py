"""Quiet by default (issue 25): a command shows napo's own lines and bars, not the libraries' progress bars
and known-harmless warnings; --verbose or NAPO_VERBOSE=1 brings them back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest

from napo import _quiet

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def _logps_command(tmp_path: Path) -> list[str]:
    from napo.data import make_sample_data, make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    data = make_sample_data(tmp_path / "data.parquet", rows=2)
    return [
        "logps",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "logps"),
        "--batch-size",
        "2",
    ]


def test_a_command_shows_napos_bar_but_not_the_libraries(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k not in {"NAPO_VERBOSE", *_quiet._PROGRESS_BAR_VARIABLES}}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "napo", *_logps_command(tmp_path)], env=environment, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout
    assert "napo logps (shard 0/1)" in run.stdout and "2 rows scored" in run.stdout, run.stdout  # napo's own
    assert "Loading weights" not in run.stdout, run.stdout  # transformers' bar, shown at every model load


def test_verbose_shows_the_libraries_bars(tmp_path, monkeypatch, capfd):
    from transformers.utils import logging as bars

    from napo.cli import main

    monkeypatch.delenv("NAPO_VERBOSE", raising=False)
    _quiet.configure(False)  # an earlier quiet command in this process (a notebook, another test)
    assert not bars.is_progress_bar_enabled()
    assert main([*_logps_command(tmp_path), "--verbose"]) == 0
    assert bars.is_progress_bar_enabled()
    output = "".join(capfd.readouterr())
    assert "Loading weights" in output and "napo logps (shard 0/1)" in output, output


def test_the_harmless_warnings_are_hidden_unless_verbose():
    from transformers import TrainingArguments
    from transformers.utils import logging as bars

    _quiet.configure(True)  # whatever an earlier test left
    assert bars.is_progress_bar_enabled()

    deepspeed = logging.getLogger("DeepSpeed")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    deepspeed.addHandler(handler)
    try:
        for verbose in (True, False):
            with mock.patch.dict(os.environ), warnings.catch_warnings(record=True) as caught:
                os.environ.pop("NAPO_VERBOSE", None)
                warnings.simplefilter("always")
                assert _quiet.configure(verbose) is verbose
                # TRL's configs set this deprecated field by default (transformers >= 5 warns about it)
                TrainingArguments(output_dir="unused", gradient_checkpointing=True)
                deepspeed.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
                deepspeed.warning("a DeepSpeed warning napo does not know")  # shown either way
                warnings.warn("a FutureWarning napo does not know", FutureWarning, stacklevel=1)  # shown either way
            messages = [str(w.message) for w in caught]
            assert any("a FutureWarning napo does not know" in m for m in messages)
            renamed = any("`gradient_checkpointing` is deprecated" in m for m in messages)
            assert renamed == (verbose and hasattr(TrainingArguments, "activation_checkpointing")), messages
            assert [m[:26] for m in seen] == ["Setting accelerator to CPU"] * verbose + ["a DeepSpeed warning napo d"]
            seen.clear()
    finally:
        bars.enable_progress_bar()  # as the other tests found them
        deepspeed.removeHandler(handler)
        deepspeed.filters[:] = [f for f in deepspeed.filters if not isinstance(f, _quiet._DropMessages)]


@pytest.mark.parametrize(
    "value,verbose", [("", False), ("0", False), ("false", False), ("no", False), ("1", True), ("yes", True)]
)
def test_napo_verbose_variable(monkeypatch, value, verbose):
    monkeypatch.setenv("NAPO_VERBOSE", value)
    assert _quiet.verbose_requested() is verbose and _quiet.verbose_requested(True)


def test_napo_verbose_hides_nothing(monkeypatch):
    monkeypatch.setenv("NAPO_VERBOSE", "1")
    _quiet.configure()  # undoes whatever an earlier quiet command in this process did
    environment, filters = dict(os.environ), list(warnings.filters)
    assert _quiet.configure() is True
    assert dict(os.environ) == environment and warnings.filters == filters
