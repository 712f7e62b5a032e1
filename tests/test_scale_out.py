"""NaPOTrainer under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2: two gloo CPU processes against one process on the same
global batch, the fused LM head under sharded weights, resume after SIGKILL under each engine, and bad engine settings.

Each run is ``tests/scale_out_worker.py`` under ``torch.distributed.run``, a NaPOTrainer built from Python as a
user script builds it (the model loaded before the config), on the tiny LLaVA and 8 rows with cached reference
log-probs, 3 steps of AdamW at lr 1e-3. Tolerances: per step, the loss and every napo/q_, napo/weight_,
napo/margin_ value to 1e-5 relative (1e-7 absolute); the trained weights to 2e-5 absolute, 1/50 of one AdamW step
(each entry moves ~1e-3 per step: a gradient missing a rank's half, or unreduced, moves them by that much).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("deepspeed")  # CI installs it (requirements/ci-constraints.txt); FSDP2 is torch's own

import pandas as pd
import psutil
from scale_out_worker import TRAINING, engine_settings
from transformers import AutoModelForImageTextToText

from napo.cli import main
from napo.data import make_sample_data, make_tiny_model
from napo.train.run import last_complete_checkpoint

WORKER = Path(__file__).with_name("scale_out_worker.py")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scale"
# DeepSpeed on CPU processes: its CPU accelerator (it JIT-builds a small shared-memory comm op once, cached).
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
STEPS = 3
WEIGHT_ATOL = 2e-5
_ports = iter(range(29641, 29700))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The tiny model and 8 rows with every answer column and its cached reference log-probs, the reference
    columns of the other answers shifted away from the policy so that step 1 already has margins and q < 1."""
    from napo.train.reference import compute_reference_logps

    root = tmp_path_factory.mktemp("scale")
    make_tiny_model(root / "model")
    frame = pd.read_parquet(make_sample_data(root / "sample.parquet", rows=8, seed=11))
    # Biased answers without generating them: other rows' answers are as good a stand-in for the trainer.
    frame["question_only"] = frame["rejected"].shift(1, fill_value=frame["rejected"].iloc[-1])
    frame["image_only"] = frame["chosen"].shift(2, fill_value=frame["chosen"].iloc[0])
    (root / "biased").mkdir()
    frame.to_parquet(root / "biased" / "part-s0000-000000.parquet")
    compute_reference_logps(root / "model", root / "biased", root / "scored", progress=False)
    scored = pd.read_parquet(root / "scored")
    generator = torch.Generator().manual_seed(0)
    for answer in ("rejected", "question_only", "image_only"):
        for column, scale in ((f"ref_{answer}_logps", 40.0), (f"ref_{answer}_avg_logps", 2.0)):
            scored[column] += scale * torch.rand(len(scored), generator=generator, dtype=torch.float64).numpy()
    (root / "data").mkdir()
    scored.to_parquet(root / "data" / "part-s0000-000000.parquet")
    return root


def launch(workdir: Path, engine: str, output: Path, *flags: str, processes: int = 2, **popen) -> list[str]:
    command = [str(WORKER), engine, str(workdir / "model"), str(workdir / "data"), str(output), *flags]
    if processes == 1:
        return [sys.executable, *command]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(next(_ports))]
    return [sys.executable, *launcher, *command]


def run(workdir: Path, engine: str, output: Path, *flags: str, processes: int = 2) -> dict:
    """One worker run to completion; its run.json (per-step logs, how the engine held the LM head)."""
    command = launch(workdir, engine, output, "--steps", str(STEPS), *flags, processes=processes)
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output / "run.json").read_text())


@pytest.fixture(scope="module")
def runs(workdir, tmp_path_factory):
    """Runs by name, each made once: ``one`` is one process on the global batch of 4, the others two
    processes of 2 rows each; ``<engine>`` with the fused head forbidden to form logits, ``<engine>-logits``
    through the model's own logits (the fallback)."""
    root = tmp_path_factory.mktemp("runs")
    made: dict[str, tuple[dict, Path]] = {}

    def get(name: str) -> tuple[dict, Path]:
        if name not in made:
            engine, _, variant = name.partition("-")
            flags = ["--logits"] if variant == "logits" else ["--forbid-logits"]
            if engine == "one":
                made[name] = run(workdir, "plain", root / name, *flags, "--batch-size", "4", processes=1), root / name
            else:
                made[name] = run(workdir, engine, root / name, *flags, "--batch-size", "2"), root / name
        return made[name]

    return get


def assert_same_steps(expected: list[dict], actual: list[dict]) -> None:
    assert [s["step"] for s in actual] == [s["step"] for s in expected] == list(range(1, STEPS + 1))
    first = expected[0]
    assert 0.001 < first["napo/q_language"] < 1.0 and first["napo/margin_language"] != 0  # a real check of q
    keys = ["loss", *(k for k in first if k.startswith(("napo/q_", "napo/weight_", "napo/margin_")))]
    assert len(keys) == 10
    for step, (want, got) in enumerate(zip(expected, actual, strict=True), start=1):
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (step, key)


def assert_same_weights(expected: Path, actual: Path) -> None:
    """Two saved models (from_pretrained loads both) hold the same weights within WEIGHT_ATOL."""
    first, second = (AutoModelForImageTextToText.from_pretrained(path).state_dict() for path in (expected, actual))
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)


HEAD_LAYOUT = {"zero2": "zero2 whole", "zero3": "zero3 partition of (427, 64), ", "fsdp2": "fsdp2 DTensor"}


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_two_processes_under_an_engine_match_one_process_and_ddp(engine, runs):
    """Every step's loss, q, weights and margins equal one process's on the same global batch; the trained
    weights equal that run's and DDP's. The LM head never forms [B, T, V] logits (it raises if asked to). Under
    ZeRO-3 the reference model TRL loads is partitioned at construction (its vocabulary check read 0 rows)."""
    sharded, sharded_dir = runs(engine)
    assert sharded["engine"]["processes"] == 2
    assert sharded["engine"]["head"].startswith(HEAD_LAYOUT[engine])  # the engine really held the head so
    one, one_dir = runs("one")
    assert_same_steps(one["steps"], sharded["steps"])
    assert_same_weights(one_dir, sharded_dir)
    ddp, ddp_dir = runs("plain")
    assert ddp["engine"]["head"] == "DistributedDataParallel"
    assert_same_weights(ddp_dir, sharded_dir)


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_fused_head_under_sharding_equals_the_logits_fallback(engine, runs):
    """The fused head on the gathered weight and the model's own logits with napo's token kernel: the same
    steps and the same trained weights (the gradient reaches the sharded weight the same way)."""
    fused, fused_dir = runs(engine)
    fallback, fallback_dir = runs(f"{engine}-logits")
    assert fallback["engine"]["head"] == fused["engine"]["head"]
    assert_same_steps(fallback["steps"], fused["steps"])
    assert_same_weights(fallback_dir, fused_dir)


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_resumes_after_sigkill_with_its_weights(engine, workdir, runs, tmp_path):
    """A run killed with SIGKILL after a checkpoint and rerun resumes from the newest complete checkpoint (the
    engine's own loader: DeepSpeed's, or the Trainer's FSDP one) and ends with the uninterrupted run's weights
    (gathered into one from_pretrained model) and metrics."""
    killed = tmp_path / "killed"
    command = launch(workdir, engine, killed, "--steps", "400", "--save-steps", "1", "--batch-size", "2")
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while last_complete_checkpoint(killed) is None:
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # The launcher and both workers at once, as a killed job's would be (torchrun starts its workers in their
        # own sessions, so a kill of the launcher's process group would leave them training).
        tree = [process, *psutil.Process(process.pid).children(recursive=True)]
        for member in tree:
            member.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree[1:], timeout=30)
    finally:
        process.wait()
    complete = int(last_complete_checkpoint(killed).name.removeprefix("checkpoint-"))
    if complete >= STEPS:  # killed late: resume from the step-1 checkpoint instead, as if the kill came then
        for path in killed.glob("checkpoint-*"):
            if int(path.name.removeprefix("checkpoint-")) > 1:
                subprocess.run(["rm", "-rf", str(path)], check=True)
        complete = 1
    resumed = run(workdir, engine, killed, "--batch-size", "2", "--resume", "--save-steps", "1")
    full, full_dir = runs(engine)
    # The log history comes back with the checkpoint: steps 1..complete from before the kill, then the new ones.
    assert_same_steps(full["steps"], resumed["steps"])
    assert_same_weights(full_dir, killed)


def launcher(name: str, port: int) -> list[str]:
    """The command line before `napo train` (a module) under each launcher, two processes."""
    if name == "deepspeed":  # on CPU processes --num_gpus N starts N; without it, one per NUMA node
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
                "--module"]  # fmt: skip
    config = EXAMPLES / ("accelerate_zero3_2proc.yaml" if name == "accelerate-zero3" else "accelerate_2proc.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(port), "-m"]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "engine", "expected"),
    [
        ("accelerate", "zero2", "DeepSpeed ZeRO-2"),  # examples/scale/accelerate_2proc.yaml, engine in napo.json
        ("accelerate-zero3", "plain", "DeepSpeed ZeRO-3"),  # the engine in the accelerate config, TRL's way
        ("deepspeed", "zero3", "DeepSpeed ZeRO-3"),  # DeepSpeed's own launcher (it passes --local_rank to napo)
    ],
    ids=["accelerate", "accelerate-zero3-config", "deepspeed"],
)
def test_napo_train_under_each_launcher_matches_one_process(name, engine, expected, workdir, runs, tmp_path):
    """`napo train` as users start TRL runs: under `accelerate launch` (the engine from the napo config or from the
    accelerate config) and DeepSpeed's launcher, two processes on the engine it reports, with every step's loss, q,
    weights and margins and the trained weights of one process on the same global batch."""
    config = tmp_path / "napo.json"
    settings = {**TRAINING, "max_steps": STEPS, "per_device_train_batch_size": 2, "save_strategy": "no"}
    config.write_text(json.dumps({**settings, **engine_settings(engine)}))
    output = tmp_path / "run"
    napo = ["napo", "train", "--model", str(workdir / "model"), "--data", str(workdir / "data"),
            "--output", str(output), "--config", str(config), "--no-progress"]  # fmt: skip
    result = subprocess.run([*launcher(name, next(_ports)), *napo], env=ENV, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"napo train: training on 2 processes (cpu), {expected}\n" in result.stdout
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    one, one_dir = runs("one")
    assert_same_steps(one["steps"], [entry for entry in history if "loss" in entry])
    assert_same_weights(one_dir, output)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "stage3_gather_16bit_weights_on_model_save"),
        ({"deepspeed": {"zero_optimization": {"stage": 2, "overlap_com": True}}}, "overlap_com"),
        ({"deepspeed_zero": 3}, "deepspeed_zero"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}, "missing": "deepspeed"}, "DeepSpeed, which is not"),
        # What `accelerate launch` with a DeepSpeed accelerate config sets: its zero_stage, or its deepspeed file.
        ({"accelerate": {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}}, "zero3_save_16bit_model: true"),
        ({"accelerate": {"ACCELERATE_DEEPSPEED_CONFIG_FILE": {"zero_optimization": {"stage": 3}}}},
         "stage3_gather_16bit_weights_on_model_save"),
    ],
    ids=["zero3-not-gathered", "unknown-zero-key", "unknown-field", "deepspeed-not-installed",
         "accelerate-zero3-not-gathered", "accelerate-deepspeed-file"],
)  # fmt: skip
def test_bad_engine_settings_fail_before_any_model_loads(settings, message, workdir, tmp_path, monkeypatch, capsys):
    """`napo train --config` with engine settings that would fail after loading (or save no loadable model)
    exits with a usage error naming the setting, before scoring the reference log-probs loads any model; so does
    plain `napo train` under `accelerate launch` with such DeepSpeed settings in the accelerate config."""
    settings = dict(settings)
    if settings.pop("missing", None):
        monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without it gives
        monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.config", None)
    for name, value in settings.pop("accelerate", {}).items():
        if isinstance(value, dict):
            (tmp_path / "ds.json").write_text(json.dumps(value))
            value = str(tmp_path / "ds.json")
        monkeypatch.setenv(name, value)
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    config = tmp_path / "engine.json"
    config.write_text(json.dumps(settings))
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_loading)
    run_dir = tmp_path / "run"
    code = main(["train", "--model", str(workdir / "model"), "--data", str(workdir / "biased"),
                 "--output", str(run_dir), "--config", str(config), "--no-progress"])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (run_dir / "reference-logps").exists()


@pytest.mark.parametrize("name", ["napo_7b_zero3.yaml", "napo_13b_zero3.yaml", "napo_7b_fsdp2.yaml"])
def test_example_configs_pass_the_engine_checks(name, monkeypatch):
    from napo.train.run import check_engine_settings, load_config_file

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the examples name their DeepSpeed file relative to the repository
    values = load_config_file(root / "examples" / "scale" / name)
    check_engine_settings(values)
    assert values.get("deepspeed") or values.get("fsdp")


class _ModelLoading(Exception):
    pass


@pytest.mark.parametrize(
    ("settings", "warned"),
    [({"fsdp": True, "fsdp_config": {"version": 2}}, True), ({}, False)],
    ids=["fsdp-on-cpu", "no-fsdp"],
)
def test_fsdp_settings_on_cpu_processes_warn_that_they_run_as_ddp(settings, warned, workdir, tmp_path, monkeypatch):
    """accelerate 1.15 runs CPU processes with FSDP settings as plain DDP, silently: `napo train` says so, once,
    before any model loads (stopped there: the warning is all this checks)."""
    import warnings

    import transformers

    import napo.data.generate

    def stop(*args, **kwargs):
        raise _ModelLoading

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", stop)
    monkeypatch.setattr(napo.data.generate, "load_weights", stop)
    config = tmp_path / "engine.json"
    config.write_text(json.dumps(settings))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(_ModelLoading):
        warnings.simplefilter("always")
        main(["train", "--model", str(workdir / "model"), "--data", str(workdir / "data"),
              "--output", str(tmp_path / "run"), "--config", str(config), "--no-progress"])  # fmt: skip
    about_fsdp = [str(w.message) for w in caught if "accelerate ignores FSDP" in str(w.message)]
    assert len(about_fsdp) == (1 if warned else 0), about_fsdp
    if warned:
        assert "plain DDP" in about_fsdp[0] and "DeepSpeed ZeRO" in about_fsdp[0]
