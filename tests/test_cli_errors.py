"""User mistakes on the command line and in the Python entry points: each is exit code 2 (ValueError in
Python) with one line naming the option, file or column, never a traceback (issue 15: D6, D7, D8, D14)."""

from __future__ import annotations

import json
import os

import pytest

from napo.cli import main

pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from napo.data import generate_biased, make_sample_data, make_tiny_model  # noqa: E402

MODEL, DATA, OUT = ["--model", "m"], ["--data", "d"], ["--output", "o"]

# (argv, the message fragment argparse must print): every numeric option of every subcommand.
BAD_NUMBERS = [
    (["logps", *MODEL, *DATA, *OUT, "--max-length", "-5"], "--max-length: must be an integer >= 0, got -5"),
    (["logps", *MODEL, *DATA, *OUT, "--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
    (["logps", *MODEL, *DATA, *OUT, "--rows-per-part", "-1"], "--rows-per-part: must be an integer >= 1"),
    (["logps", *MODEL, *DATA, *OUT, "--limit", "-2"], "--limit: must be an integer >= 0, got -2"),
    (["generate", *MODEL, *DATA, *OUT, "--shard-index", "-1"], "--shard-index: must be an integer >= 0, got -1"),
    (["generate", *MODEL, *DATA, *OUT, "--num-shards", "0"], "--num-shards: must be an integer >= 1"),
    (["generate", *MODEL, *DATA, *OUT, "--max-new-tokens", "2.5"], "--max-new-tokens: must be an integer >= 1, got '2"),
    (["generate", *MODEL, *DATA, *OUT, "--num-beams", "0"], "--num-beams: must be an integer >= 1"),
    (["train", *MODEL, *DATA, *OUT, "--epochs", "inf"], "--epochs: must be a finite number > 0, got inf"),
    (["train", *MODEL, *DATA, *OUT, "--learning-rate", "nan"], "--learning-rate: must be a finite number > 0, got nan"),
    (["train", *MODEL, *DATA, *OUT, "--beta", "-0.1"], "--beta: must be a finite number > 0, got -0.1"),
    (["train", *MODEL, *DATA, *OUT, "--max-steps", "0"], "--max-steps: must be an integer >= 1"),
    (["train", *MODEL, *DATA, *OUT, "--seed", "-1"], "--seed: must be an integer in [0, 4294967295], got -1"),
    (["train", *MODEL, *DATA, *OUT, "--seed", "4294967296"], "--seed: must be an integer in [0, 4294967295]"),
    (["train", *MODEL, *DATA, *OUT, "--logps-batch-size", "0"], "--logps-batch-size: must be an integer >= 1"),
    (["analyze", *DATA, *OUT, "--top", "0"], "--top: must be an integer >= 1, got 0"),
    (["analyze", *DATA, *OUT, "--batch-size", "x"], "--batch-size: must be an integer >= 1, got 'x'"),
    (["make-sample-data", "s.parquet", "--seed", "-3"], "--seed: must be an integer in [0, 4294967295]"),
    (["make-tiny-model", "m", "--seed", "-3"], "--seed: must be an integer in [0, 4294967295]"),
    (["demo", "--learning-rate", "inf"], "--learning-rate: must be a finite number > 0, got inf"),
    (["demo", "--seed", "-1"], "--seed: must be an integer in [0, 4294967295]"),
    (["logps", *MODEL, *DATA, *OUT, "--columns", ","], "--columns: an empty column name in ','"),
    (["logps", *MODEL, *DATA, *OUT, "--columns", "chosen,,rejected"], "--columns: an empty column name"),
    (["logps", *MODEL, *DATA, *OUT, "--columns", "chosen,chosen"], "--columns: column(s) chosen given more than once"),
]  # fmt: skip


@pytest.mark.parametrize("argv,message", BAD_NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_NUMBERS])
def test_out_of_range_options_exit_2_naming_the_range(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err, err


@pytest.mark.parametrize("command", ["generate", "logps", "train", "analyze"])
def test_an_output_that_is_a_file_exits_2(command, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    model = [] if command == "analyze" else ["--model", "m"]
    for output in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(SystemExit) as info:
            main([command, *model, "--data", "d", "--output", str(output)])
        assert info.value.code == 2 and "a file, not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------- with the tiny model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    make_tiny_model(root / "model")
    make_sample_data(root / "sample.parquet", rows=4, seed=3)
    generate_biased(root / "model", root / "sample.parquet", root / "biased", max_new_tokens=4, num_beams=1,
                    progress=False)  # fmt: skip
    return root


@pytest.mark.parametrize(
    "keywords,message",
    [({"max_length": -5}, "max_length must be an integer >= 1, got -5"),
     ({"max_length": 0}, "max_length must be an integer >= 1, got 0"),
     ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
     ({"limit": -1}, "limit must be an integer >= 0, got -1"),
     ({"shard_index": -1}, "shard_index must be an integer >= 0"),
     ({"columns": []}, "no answer column to score"),
     ({"columns": ["chosen", "chosen"]}, "'chosen' given more than once"),
     ({"columns": ["chosen", ""]}, "must be non-empty strings"),
     ({"columns": ["question"]}, "'question' cannot be scored as an answer"),
     ({"columns": ["nope"]}, "'nope', which the data lacks")],
)  # fmt: skip
def test_logps_python_arguments_are_checked_up_front(workdir, tmp_path, keywords, message):
    from napo.train.reference import compute_reference_logps

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compute_reference_logps(workdir / "model", workdir / "biased", tmp_path / "o", loaded=(None, None),
                                progress=False, **keywords)  # fmt: skip
    assert not (tmp_path / "o").exists()  # nothing written, no model touched


@pytest.mark.parametrize(
    "keywords,message",
    [({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
     ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
     ({"num_beams": 0}, "num_beams must be an integer >= 1"),
     ({"rows_per_part": 0}, "rows_per_part must be an integer >= 1"),
     ({"num_shards": 0}, "num_shards must be an integer >= 1")],
)  # fmt: skip
def test_generate_python_arguments_are_checked_up_front(workdir, tmp_path, keywords, message):
    with pytest.raises(ValueError, match=message):
        generate_biased(workdir / "model", workdir / "sample.parquet", tmp_path / "o", loaded=(None, None),
                        progress=False, **keywords)  # fmt: skip


def test_logps_names_a_non_string_answer_column_before_any_row(workdir, tmp_path, capsys):
    table = pq.read_table(workdir / "biased")
    table = table.set_column(table.schema.get_field_index("chosen"), "chosen", pa.array(range(len(table))))
    pq.write_table(table, tmp_path / "ints.parquet")
    code = main(["logps", "--model", str(workdir / "model"), "--data", str(tmp_path / "ints.parquet"), "--output",
                 str(tmp_path / "o"), "--device", "cpu", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "column 'chosen' is of type int64; it must hold strings" in err


def test_logps_columns_flag_reaches_python_as_a_list(workdir, tmp_path, capsys):
    code = main(["logps", "--model", str(workdir / "model"), "--data", str(workdir / "biased"), "--output",
                 str(tmp_path / "o"), "--columns", "chosen, nope", "--no-progress"])  # fmt: skip
    assert code == 2 and "'nope', which the data lacks" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name,text,message",
    [("bad.yaml", "beta: [1, 2\nlogging_steps: 1\n", "is not valid YAML at line"),
     ("evil.yaml", "beta: !!python/object/apply:os.system ['echo pwned']\n", "is not valid YAML"),
     ("bad.json", "{beta: 1}", "is not valid JSON"),
     ("list.yaml", "- 1\n- 2\n", "must hold a mapping of NaPOConfig fields, got list"),
     ("keys.yaml", "1: 2\n", "field names must be strings, got 1"),
     ("binary.json", b"\xff\xfe{", "is not UTF-8 text"),
     ("folder.yaml", None, "is a directory")],
)  # fmt: skip
def test_train_config_errors_exit_2_with_one_line(workdir, tmp_path, capsys, name, text, message):
    pytest.importorskip("trl")
    config = tmp_path / name
    if text is None:
        config.mkdir()
    elif isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    code = main(["train", "--model", str(workdir / "model"), "--data", str(workdir / "biased"), "--output",
                 str(tmp_path / "run"), "--config", str(config)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and message in err and str(config) in err and len(err.splitlines()) == 1, err
    assert "pwned" not in out


def test_a_pickled_checkpoint_is_refused_with_exit_2(workdir, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    model = tmp_path / "pickled"
    model.mkdir()
    for path in (workdir / "model").iterdir():
        if path.suffix != ".safetensors" and path.is_file():
            (model / path.name).write_bytes(path.read_bytes())
    (model / "model.safetensors.index.json").unlink(missing_ok=True)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"weight": Payload()}, model / "pytorch_model.bin")
    for command in ("generate", "logps"):
        code = main([command, "--model", str(model), "--data", str(workdir / "biased"), "--output",
                     str(tmp_path / command), "--device", "cpu", "--no-progress"])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 2 and "its PyTorch checkpoint holds more than weights" in err and "pwned" not in out, err
        assert len(err.splitlines()) == 1


def test_a_checkpoint_with_other_weight_names_is_refused_not_run_on_random_weights(workdir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "renamed"
    model.mkdir()
    for path in (workdir / "model").iterdir():
        if path.is_file():
            (model / path.name).write_bytes(path.read_bytes())
    state = load_file(model / "model.safetensors")
    save_file({f"other.{k}": v for k, v in state.items()}, model / "model.safetensors", metadata={"format": "pt"})
    for command in ("generate", "logps", "train"):
        code = main([command, "--model", str(model), "--data", str(workdir / "biased"), "--output",
                     str(tmp_path / command), "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "the checkpoint lacks" in err and "they would be random" in err, (command, err)


def test_load_config_file_reads_json_and_yaml(tmp_path):
    from napo.train.run import load_config_file

    (tmp_path / "a.json").write_text(json.dumps({"beta": 0.2}))
    (tmp_path / "b.yml").write_text("beta: 0.3\n")
    assert load_config_file(tmp_path / "a.json") == {"beta": 0.2}
    assert load_config_file(tmp_path / "b.yml") == {"beta": 0.3}


def test_train_with_a_library_the_checkpoint_needs_missing_exits_2(tmp_path, capsys, monkeypatch):
    """A processor or model that needs an uninstalled library (transformers raises ImportError naming it) is the
    user's to fix: one error line, not a traceback."""
    import napo.train.run

    def needs_a_library(*args, **kwargs):
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(napo.train.run, "train", needs_a_library)
    argv = ["train", "--model", str(tmp_path), "--data", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "napo train: error: Qwen2VLVideoProcessor requires the Torchvision" in err
