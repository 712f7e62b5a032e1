"""`napo logps` and `napo train` end to end on the tiny LLaVA: cached reference log-probs, a three-way
NaPO run with its metrics and a reloadable checkpoint, resume after SIGKILL, and two gloo processes
computing the same q as one process on the whole batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

import pandas as pd
from transformers import AutoModelForImageTextToText, AutoProcessor

from napo.cli import main
from napo.data import generate_biased, make_sample_data, make_tiny_model
from napo.train.run import last_complete_checkpoint

ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The tiny model and 8 RLAIF-V-Bias rows it wrote (short greedy answers, to stay fast)."""
    root = tmp_path_factory.mktemp("pipeline")
    make_tiny_model(root / "model")
    make_sample_data(root / "sample.parquet", rows=8, seed=11)
    generate_biased(
        root / "model", root / "sample.parquet", root / "biased", max_new_tokens=10, num_beams=1, progress=False
    )
    return root


@pytest.fixture(scope="module")
def scored(workdir) -> Path:
    """The biased rows with their cached reference log-probs."""
    from napo.train.reference import compute_reference_logps

    compute_reference_logps(workdir / "model", workdir / "biased", workdir / "scored", progress=False)
    return workdir / "scored"


def log_history(run: Path) -> list[dict]:
    states = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text())["log_history"]


def torch_reference_logps(model, processor, row: dict, column: str) -> tuple[float, float]:
    """Plain torch, no napo kernel: log_softmax over the full logits of one prompt + answer."""
    from napo.train.collator import NaPOVisionCollator

    batch = NaPOVisionCollator(processor, columns=(column,))([dict(row)])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits.double()
    token_logps = torch.log_softmax(logits[0, :-1], -1).gather(1, batch["input_ids"][0, 1:, None]).squeeze(1)
    counted = batch["completion_mask"][0, 1:].bool()
    return token_logps[counted].sum().item(), token_logps[counted].mean().item()


def test_logps_match_a_plain_torch_reference_and_resume(workdir, capsys):
    output = workdir / "logps"
    model, biased = str(workdir / "model"), str(workdir / "biased")
    assert main(["logps", "--model", model, "--data", biased, "--output", str(output), "--batch-size", "3",
                 "--rows-per-part", "3", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "8 rows scored" in out and out.count("napo logps: prompt format template:") == 1
    frame = pd.read_parquet(output).sort_values("idx")
    columns = ["chosen", "rejected", "question_only", "image_only"]
    for column in columns:
        assert frame[f"ref_{column}_logps"].notna().all() and (frame[f"ref_{column}_logps"] < 0).all()
    model = AutoModelForImageTextToText.from_pretrained(workdir / "model")
    processor = AutoProcessor.from_pretrained(workdir / "model")
    for _, row in frame.head(2).iterrows():
        for column in columns:
            expected_sum, expected_avg = torch_reference_logps(model, processor, row.to_dict(), column)
            assert row[f"ref_{column}_logps"] == pytest.approx(expected_sum, rel=1e-5)
            assert row[f"ref_{column}_avg_logps"] == pytest.approx(expected_avg, rel=1e-5)
    # Rerun: everything is done; drop one part and rerun: only its rows are scored again.
    assert main(["logps", "--model", str(workdir / "model"), "--data", str(workdir / "biased"),
                 "--output", str(output), "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "0 rows scored" in out and "8 already done" in out
    parts = sorted(output.glob("part-*.parquet"))
    parts[0].unlink()
    assert main(["logps", "--model", str(workdir / "model"), "--data", str(workdir / "biased"),
                 "--output", str(output), "--no-progress"]) == 0  # fmt: skip
    assert "3 rows scored" in capsys.readouterr().out
    again = pd.read_parquet(output).sort_values("idx")
    assert list(again["idx"]) == list(frame["idx"])
    pd.testing.assert_frame_equal(again.reset_index(drop=True), frame.reset_index(drop=True), check_exact=False)


def test_logps_refuses_data_without_the_rlaif_columns(workdir, tmp_path, capsys):
    pd.DataFrame({"idx": [1], "prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}).to_parquet(tmp_path / "x.parquet")
    code = main(["logps", "--model", str(workdir / "model"), "--data", str(tmp_path / "x.parquet"),
                 "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2 and "lacks the column(s) image, question" in capsys.readouterr().err


def test_three_way_training_logs_metrics_and_saves_a_loadable_model(workdir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--model", str(workdir / "model"), "--data", str(workdir / "biased"), "--output", str(run),
                 "--max-steps", "4", "--batch-size", "2", "--logging-steps", "1", "--save-steps", "2",
                 "--learning-rate", "1e-3", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "q_lang" in out and f"model saved to {run}" in out
    assert "napo train: training on 1 process (cpu)\n" in out
    assert (run / "reference-logps").is_dir()  # the data had no reference columns: computed first
    history = [h for h in log_history(run) if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for entry in history:
        assert torch.isfinite(torch.tensor(entry["loss"]))
        for term in ("original", "language", "vision"):
            for kind in ("q", "weight", "margin", "accuracy"):
                assert f"napo/{kind}_{term}" in entry
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/question_only"):
            assert key in entry
    first = history[0]
    # Step 1: the policy is the reference, and the cached log-probs are the policy's own: no margin, q = 1.
    assert abs(first["napo/margin_language"]) < 1e-4 and first["napo/q_language"] == 1.0
    assert first["napo/weight_language"] == pytest.approx(1 / 3) and first["napo/q_original"] == 0.0
    assert history[-1]["napo/margin_language"] > 0.05 and history[-1]["napo/q_language"] < 1.0
    trained = AutoModelForImageTextToText.from_pretrained(run)
    initial = AutoModelForImageTextToText.from_pretrained(workdir / "model")
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    AutoProcessor.from_pretrained(run)


def test_resume_after_sigkill(workdir, scored, tmp_path):
    run = tmp_path / "run"
    data = scored
    command = [sys.executable, "-m", "napo", "train", "--model", str(workdir / "model"), "--data", str(data),
               "--output", str(run), "--max-steps", "16", "--batch-size", "2", "--save-steps", "2",
               "--logging-steps", "1", "--learning-rate", "1e-4", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while last_complete_checkpoint(run) is None:
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    # The kill may land while a trainer_state.json is half written: the newest *complete* one is what resumes.
    complete = int(last_complete_checkpoint(run).name.removeprefix("checkpoint-"))
    assert complete < 16, "the kill must land before the run ends"
    (run / "checkpoint-999").mkdir()  # what a kill while saving leaves: no trainer_state.json
    (run / "checkpoint-999" / "model.safetensors").write_bytes(b"partial")
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint-999 is incomplete" in result.stdout
    assert f"resuming from {run / f'checkpoint-{complete}'}" in result.stdout
    steps = [h["step"] for h in log_history(run) if "loss" in h]
    assert steps == list(range(1, 17))  # the first run's steps, then the rest (the same command resumes)


def assert_same_weights(a: Path, b: Path) -> None:
    """Two saved models hold the same weights (1e-6 relative to each tensor's largest entry: the same CPU
    ops on the same data, so in practice they are bit-identical)."""
    first, second = (AutoModelForImageTextToText.from_pretrained(path).state_dict() for path in (a, b))
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=1e-6 * tensor.abs().max().item(), msg=name)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(workdir, scored, tmp_path):
    """A run cut right after its step-3 checkpoint (what SIGKILL leaves) and rerun ends with the uninterrupted
    run's weights and logs its steps 4-6 with the same metrics. (Before the fix, the resumed steps restarted
    from the initial weights: step 4 logged margin 0 and q = 1, like step 1.)"""
    full, cut = tmp_path / "full", tmp_path / "cut"
    command = ["train", "--model", str(workdir / "model"), "--data", str(scored), "--max-steps", "6",
               "--batch-size", "2", "--save-steps", "3", "--logging-steps", "1", "--learning-rate", "1e-3",
               "--seed", "5", "--no-progress"]  # fmt: skip
    assert main([*command, "--output", str(full)]) == 0
    shutil.copytree(full / "checkpoint-3", cut / "checkpoint-3")
    assert main([*command, "--output", str(cut)]) == 0
    assert_same_weights(full, cut)
    expected = {h["step"]: h for h in log_history(full) if "loss" in h}
    resumed = {h["step"]: h for h in log_history(cut) if "loss" in h}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed[4]["napo/q_language"] < 1.0  # the trained weights came back: step 4 has margins
    for step in (4, 5, 6):
        for key, value in expected[step].items():
            if key.startswith(("napo/", "rewards/", "logps/")) or key == "loss":
                assert resumed[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)


def test_resume_refuses_a_checkpoint_that_leaves_weights_unrestored(workdir, scored, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    command = ["train", "--model", str(workdir / "model"), "--data", str(scored), "--max-steps", "2",
               "--batch-size", "2", "--save-steps", "1", "--output", str(run), "--no-progress"]  # fmt: skip
    assert main(command) == 0
    weights = run / "checkpoint-2" / "model.safetensors"
    state = load_file(weights)
    dropped = next(name for name in state if "layers.1" in name)
    save_file({k: v for k, v in state.items() if k != dropped}, weights, metadata={"format": "pt"})
    assert main(command) == 2  # the same command resumes from checkpoint-2
    err = capsys.readouterr().err
    assert "does not restore every weight" in err and "refusing to resume" in err


def test_two_gloo_processes_compute_the_same_q_as_one(workdir, scored, tmp_path):
    # Reference columns shifted away from the policy, so that step 1 has non-zero margins and q != 1.
    source = pd.read_parquet(scored).head(4)  # one step of 4 rows, or 2 x 2 rows: the same rows either way
    # M = const + ref(answer) - ref(chosen): raising the reference of the other answers makes M > 0 on average.
    generator = torch.Generator().manual_seed(0)
    for answer in ("rejected", "question_only", "image_only"):
        for column, scale in ((f"ref_{answer}_logps", 40.0), (f"ref_{answer}_avg_logps", 2.0)):
            source[column] += scale * torch.rand(len(source), generator=generator, dtype=torch.float64).numpy()
    data = tmp_path / "data"
    data.mkdir()
    source.to_parquet(data / "part-s0000-000000.parquet")
    common = ["-m", "napo", "train", "--model", str(workdir / "model"), "--data", str(data), "--max-steps", "1",
              "--logging-steps", "1", "--save-steps", "1", "--no-progress", "--seed", "3"]  # fmt: skip
    single = subprocess.run([sys.executable, *common, "--output", str(tmp_path / "one"), "--batch-size", "4"],
                            env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    double = subprocess.run([*launcher, *common, "--output", str(tmp_path / "two"), "--batch-size", "2"],
                            env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    assert "training on 1 process (cpu)\n" in single.stdout and "training on 2 processes (cpu), DDP" in double.stdout
    one, two = log_history(tmp_path / "one")[0], log_history(tmp_path / "two")[0]
    keys = [k for k in one if k.startswith(("napo/q_", "napo/weight_", "napo/margin_"))]
    assert len(keys) == 9 and 0.001 < one["napo/q_language"] < 1.0
    for key in keys:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_config_file_sets_napo_fields_and_bad_fields_are_refused(workdir, scored, tmp_path, capsys):
    config = tmp_path / "napo.yaml"
    config.write_text("language_column: none\nnapo_weights: '1,0.5'\nvision_gamma: 0.05\nlogging_steps: 1\n")
    run = tmp_path / "run"
    assert main(["train", "--model", str(workdir / "model"), "--data", str(scored), "--output", str(run),
                 "--config", str(config), "--max-steps", "1", "--no-progress"]) == 0  # fmt: skip
    entry = next(h for h in log_history_or_final(run) if "loss" in h)
    assert "napo/q_language" not in entry and entry["napo/weight_vision"] == 0.5 and entry["napo/weight_original"] == 1
    (tmp_path / "bad.json").write_text(json.dumps({"no_such_field": 1}))
    assert main(["train", "--model", str(workdir / "model"), "--data", str(scored), "--output", str(tmp_path / "b"),
                 "--config", str(tmp_path / "bad.json")]) == 2  # fmt: skip
    assert "no_such_field" in capsys.readouterr().err


def log_history_or_final(run: Path) -> list[dict]:
    """The log history of the newest checkpoint, or of the final trainer_state.json when none was saved."""
    if list(run.glob("checkpoint-*/trainer_state.json")):
        return log_history(run)
    return json.loads((run / "trainer_state.json").read_text())["log_history"]


def test_cached_reference_truncated_otherwise_is_scored_again(workdir, scored, tmp_path, capsys):
    config = tmp_path / "napo.json"
    config.write_text(json.dumps({"max_length": 512}))
    run = tmp_path / "run"
    assert main(["train", "--model", str(workdir / "model"), "--data", str(scored), "--output", str(run),
                 "--config", str(config), "--max-steps", "1", "--no-progress"]) == 0  # fmt: skip
    assert "truncated at max_length=2048, training uses 512: scoring them again" in capsys.readouterr().out
    from napo.train.reference import cached_settings

    assert cached_settings(run / "reference-logps")["max_length"] == 512


def test_under_torchrun_each_process_scores_its_shard_then_all_train(workdir, tmp_path):
    run = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    command = [*launcher, "-m", "napo", "train", "--model", str(workdir / "model"), "--data", str(workdir / "biased"),
               "--output", str(run), "--max-steps", "2", "--batch-size", "2", "--logging-steps", "1",
               "--no-progress"]  # fmt: skip
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = sorted(p.name[:11] for p in (run / "reference-logps").glob("part-*.parquet"))
    assert set(parts) == {"part-s0000-", "part-s0001-"}  # one shard per process
    scored = pd.read_parquet(run / "reference-logps")
    assert sorted(scored["idx"]) == sorted(pd.read_parquet(workdir / "biased")["idx"])  # every row once
    assert [h["step"] for h in log_history_or_final(run) if "loss" in h] == [1, 2]


def test_cached_reference_of_another_prompt_format_is_scored_again(workdir, scored, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", str(workdir / "model"), "--data", str(scored), "--output", str(run),
                 "--prompt-format", "llava_v1", "--max-steps", "1", "--logging-steps", "1",
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "used prompt_format=template, training uses llava_v1: scoring them again" in out
    assert out.count("napo train: prompt format llava_v1:") == 1
    from napo.train.reference import cached_settings

    assert cached_settings(run / "reference-logps")["prompt_format"] == "llava_v1"
    entry = next(h for h in log_history_or_final(run) if "loss" in h)
    assert abs(entry["napo/margin_language"]) < 1e-4  # step 1: the rescored reference is the policy's own


def test_a_rerun_with_other_settings_is_refused_and_overwrite_starts_again(workdir, scored, tmp_path, capsys):
    """Issue 23, defect 9: a finished run rerun with another learning rate, beta or step count resumed its old
    checkpoint and saved the old weights; now each setting is compared and --overwrite starts afresh."""
    run = tmp_path / "run"
    base = ["train", "--model", str(workdir / "model"), "--data", str(scored), "--output", str(run), "--batch-size",
            "2", "--save-steps", "1", "--logging-steps", "1", "--no-progress"]  # fmt: skip
    assert main([*base, "--max-steps", "2", "--learning-rate", "1e-3"]) == 0
    capsys.readouterr()
    assert main([*base, "--max-steps", "1", "--learning-rate", "1e-2", "--beta", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--overwrite" in err
    for expected in ("learning_rate 0.001 (this run: 0.01)", "max_steps 2 (this run: 1)", "beta 0.1 (this run: 0.5)"):
        assert expected in err, err
    assert main([*base, "--max-steps", "1", "--learning-rate", "1e-2", "--beta", "0.5", "--overwrite"]) == 0
    assert "resuming" not in capsys.readouterr().out
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and not (run / "checkpoint-2").exists()
    # Options that leave the result alone (logging, saving, progress) do not stop a resume.
    assert main([*base[:-5], "--max-steps", "1", "--learning-rate", "1e-2", "--beta", "0.5"]) == 0


def test_a_full_disk_during_a_checkpoint_save_is_one_clear_error_and_the_rerun_resumes(
    workdir, scored, tmp_path, capsys, monkeypatch
):
    """Issue 23, defect 8: ENOSPC while saving a checkpoint gave a raw traceback whose message (torch's zip
    writer: 'unexpected pos ...') did not say the disk was full. Simulated in-process: torch.save fails for
    checkpoint-2 as torch's writer does on a full disk, and the disk reports no free space."""
    import shutil as shutil_module
    from collections import namedtuple

    command = ["train", "--model", str(workdir / "model"), "--data", str(scored), "--max-steps", "3",
               "--batch-size", "2", "--save-steps", "1", "--learning-rate", "1e-3", "--seed", "5",
               "--no-progress"]  # fmt: skip
    real_save, real_usage = torch.save, shutil_module.disk_usage
    Usage = namedtuple("Usage", "total used free")

    def full_disk_save(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 614144 vs 614036")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    cut = tmp_path / "cut"

    def usage(path):
        return Usage(10**9, 10**9, 0) if str(path).startswith(str(cut)) else real_usage(path)

    monkeypatch.setattr(shutil_module, "disk_usage", usage)
    assert main([*command, "--output", str(cut)]) == 2
    err = capsys.readouterr().err
    assert "no space left on device while saving checkpoint-2" in err and "rerun the same command" in err
    assert "Traceback" not in err and err.count("napo train: error:") == 1 and "unexpected pos" not in err
    assert last_complete_checkpoint(cut) == cut / "checkpoint-1" and not (cut / "checkpoint-2").exists()
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(shutil_module, "disk_usage", real_usage)
    assert main([*command, "--output", str(cut)]) == 0
    assert f"resuming from {cut / 'checkpoint-1'}" in capsys.readouterr().out
    assert main([*command, "--output", str(tmp_path / "full")]) == 0
    assert_same_weights(tmp_path / "full", cut)


def test_non_finite_cached_reference_logps_are_refused_naming_the_rows(workdir, scored, tmp_path, capsys):
    """Issue 23: with -inf reference log-probs the trainer trained with loss 0.0 and logged NaN weights."""
    frame = pd.read_parquet(scored)
    column = next(c for c in frame.columns if c.startswith("ref_") and "question_only" in c)
    frame.loc[1, column] = float("-inf")
    frame.loc[3, column] = float("nan")
    frame.to_parquet(tmp_path / "bad.parquet", index=False)
    code = main(["train", "--model", str(workdir / "model"), "--data", str(tmp_path / "bad.parquet"), "--output",
                 str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"{column!r} is null, NaN or infinite in 2 row(s) (idx {frame['idx'][1]}, {frame['idx'][3]})" in err


def test_a_null_cached_reference_value_is_named_not_reported_as_a_missing_column():
    from napo.train.collator import _reference_tensors, reference_columns

    name, average = reference_columns("rejected")
    rows = [{"idx": "a", name: -3.0, average: -1.0}, {"idx": "b", name: float("nan"), average: -1.0},
            {"idx": "c", name: None, average: -1.0}]  # fmt: skip
    with pytest.raises(ValueError, match=rf"{name!r} is null, NaN or infinite in the rows idx=b, c"):
        _reference_tensors(rows, ["rejected"])
    assert set(_reference_tensors([{"idx": "a"}], ["rejected"])) == set()  # no cached column: the model scores


def test_cached_reference_of_earlier_token_ids_is_scored_again(workdir, scored, tmp_path, capsys):
    """Reference log-probs napo logps wrote before the sequences changed (issue 22: BOS and </s> on the
    template path, LLaVA's ids on llava_v1) carry no sequence version: they are not reused."""
    import pyarrow.parquet as pq

    from napo.train.reference import METADATA_KEY, cached_settings

    older = tmp_path / "older"
    older.mkdir()
    for part in sorted(scored.glob("part-*.parquet")):
        table = pq.read_table(part)
        manifest = json.loads(table.schema.metadata[METADATA_KEY])
        del manifest["settings"]["sequences"]
        metadata = {**table.schema.metadata, METADATA_KEY: json.dumps(manifest).encode()}
        pq.write_table(table.replace_schema_metadata(metadata), older / part.name)
    run = tmp_path / "run"
    assert main(["train", "--model", str(workdir / "model"), "--data", str(older), "--output", str(run),
                 "--max-steps", "1", "--no-progress"]) == 0  # fmt: skip
    assert "token ids of an earlier napo" in capsys.readouterr().out
    assert cached_settings(run / "reference-logps")["sequences"] >= 2
