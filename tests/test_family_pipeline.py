"""`napo logps`, `napo train` and `napo analyze --model` on the tiny checkpoint of every family: the processor's
per-image tensors (image_grid_thw, image_sizes, pixel_attention_mask, ...) and per-token types travel through napo's
collator unchanged, the cached reference log-probs are plain torch's on the model's own logits, and a two-step NaPO
run logs its terms and saves a model and processor that load back."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")

import pandas as pd  # noqa: E402

from napo.cli import main  # noqa: E402
from napo.data import make_sample_data  # noqa: E402
from napo.data.tiny_families import FAMILIES, make_tiny_family_model  # noqa: E402
from napo.models.loading import decode_image  # noqa: E402
from napo.models.processors import load_processor  # noqa: E402
from napo.train.collator import NaPOVisionCollator, render_completions  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
COLUMNS = ["chosen", "rejected", "question_only", "image_only"]
TEXT_KEYS = {"input_ids", "attention_mask", "completion_mask"}
TYPED_KEYS = {"token_type_ids", "mm_token_type_ids"}  # per token: the prompt's from the processor, 0 in answers
# What each family's processor adds per image (tests/test_model_families.py checks the same against the processors).
IMAGE_KEYS = {
    "qwen2-vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "qwen2.5-vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "llava-next": {"pixel_values", "image_sizes"},
    "gemma3": {"pixel_values", "token_type_ids"},
    "idefics3": {"pixel_values", "pixel_attention_mask"},
}


# Tiny models gain nothing from threads; on a busy machine their spinning slowed these modules many times.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """4 sample rows (images of two sizes) with short language- and vision-biased answers written in."""
    root = tmp_path_factory.mktemp("families")
    make_sample_data(root / "sample.parquet", rows=4, seed=11)
    frame = pd.read_parquet(root / "sample.parquet")
    frame["question_only"] = ["It is green.", "Yes.", "Two cubes.", "A red ball."]
    frame["image_only"] = ["A red square.", "Blue shapes.", "A cone.", "Two shapes."]
    # The sample images are all 64x64: two rows get other sizes (and aspect ratios), so that tiles, grids and
    # crops differ between rows.
    for row, size in ((1, (90, 40)), (2, (36, 50))):
        image = decode_image(frame.at[row, "image"]).resize(size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        frame.at[row, "image"] = {"bytes": buffer.getvalue(), "path": None}
    (root / "biased").mkdir()
    frame.to_parquet(root / "biased" / "part-00000.parquet")
    return root


@pytest.fixture(scope="module")
def scored(workdir):
    """``scored(arch)``: the checkpoint, and ``napo logps``'s output on the biased rows (run once per family)."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(arch: str):
        if arch not in done:
            model = make_tiny_family_model(arch, workdir / arch / "model")
            output = workdir / arch / "scored"
            code = main(["logps", "--model", str(model), "--data", str(workdir / "biased"), "--output", str(output),
                         "--batch-size", "3", "--no-progress"])  # fmt: skip
            assert code == 0
            done[arch] = (model, output)
        return done[arch]

    return get


def rows(workdir: Path) -> list[dict]:
    frame = pd.read_parquet(workdir / "biased")
    return [{**row, "image": decode_image(row["image"])} for row in frame.to_dict("records")]


@pytest.mark.parametrize("arch", FAMILIES)
def test_collator_carries_the_processors_tensors_unchanged(workdir, arch, tmp_path):
    """Each per-image tensor of the batch is the processor's own on the rendered prompts (images repeated once per
    answer column); each row's prompt tokens and types are those the processor gives the prompt alone."""
    processor = load_processor(make_tiny_family_model(arch, tmp_path / "model"))
    examples = rows(workdir)[:2]
    assert examples[0]["image"].size != examples[1]["image"].size
    batch = NaPOVisionCollator(processor, columns=COLUMNS)(examples)
    assert IMAGE_KEYS[arch] <= set(batch)
    prompts = [render_completions(e, COLUMNS, processor, num_images=1)[0] for e in examples]
    tokenizer = processor.tokenizer
    add_bos = [bool(tokenizer.bos_token) and not p.startswith(tokenizer.bos_token) for p in prompts]
    together = processor(images=[[e["image"]] for e in examples] * len(COLUMNS), text=prompts * len(COLUMNS),
                         return_tensors="pt", padding=True, add_special_tokens=add_bos[0])  # fmt: skip
    for key in set(batch) - TEXT_KEYS - TYPED_KEYS - {k for k in batch if k.startswith("ref_")}:
        assert key in together, key
        assert batch[key].dtype == together[key].dtype, key
        torch.testing.assert_close(batch[key], together[key], rtol=0, atol=0, msg=key)
    for position in range(batch["input_ids"].shape[0]):
        example = position % len(examples)
        alone = processor(images=[examples[example]["image"]], text=[prompts[example]], return_tensors="pt",
                          add_special_tokens=add_bos[example])  # fmt: skip
        prompt_length = alone["input_ids"].shape[1]
        in_prompt = (batch["attention_mask"][position] == 1) & (batch["completion_mask"][position] == 0)
        assert int(in_prompt.sum()) == prompt_length and bool(in_prompt[:prompt_length].all())  # flushed left
        assert torch.equal(batch["input_ids"][position, :prompt_length], alone["input_ids"][0])
        for key in TYPED_KEYS & set(batch):
            assert torch.equal(batch[key][position, :prompt_length], alone[key][0]), key
            assert not batch[key][position, prompt_length:].any(), f"{key}: answers are text (type 0)"


def plain_torch_logps(model, processor, row: dict, column: str) -> tuple[float, float]:
    """One row and one answer alone, log_softmax over the model's own logits in double: no napo kernel."""
    batch = NaPOVisionCollator(processor, columns=(column,))([row])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        logits = model(**inputs).logits.double()
    token = torch.log_softmax(logits[0, :-1], -1).gather(1, batch["input_ids"][0, 1:, None]).squeeze(1)
    counted = batch["completion_mask"][0, 1:].bool()
    return token[counted].sum().item(), token[counted].mean().item()


@pytest.mark.parametrize("arch", FAMILIES)
def test_logps_are_plain_torchs_on_the_models_own_logits(workdir, scored, arch):
    from transformers import AutoModelForImageTextToText

    model_dir, output = scored(arch)
    frame = pd.read_parquet(output).sort_values("idx")
    assert len(frame) == 4
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = load_processor(model_dir)
    by_idx = {row["idx"]: row for row in rows(workdir)}
    for record in frame.to_dict("records"):
        for column in COLUMNS:
            expected_sum, expected_avg = plain_torch_logps(model, processor, by_idx[record["idx"]], column)
            assert record[f"ref_{column}_logps"] == pytest.approx(expected_sum, rel=1e-5), (record["idx"], column)
            assert record[f"ref_{column}_avg_logps"] == pytest.approx(expected_avg, rel=1e-5), (record["idx"], column)


@pytest.mark.parametrize("arch", FAMILIES)
def test_napo_train_runs_three_terms_and_saves_a_model_that_loads(scored, arch, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    model_dir, data = scored(arch)
    run = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(run), "--max-steps", "3",
                 "--batch-size", "2", "--logging-steps", "1", "--learning-rate", "1e-3", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert f"model saved to {run}" in capsys.readouterr().out
    history = [h for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3]
    for entry in history:
        assert torch.isfinite(torch.tensor(entry["loss"]))
        for term in ("original", "language", "vision"):
            assert f"napo/q_{term}" in entry and f"napo/weight_{term}" in entry
    # Step 1: the cached reference is the policy itself: no margin, q = 1 for the NaPO terms.
    assert abs(history[0]["napo/margin_language"]) < 1e-4 and history[0]["napo/q_language"] == 1.0
    assert history[-1]["napo/margin_original"] != 0.0  # step 1's learning rate is 0 (the 10% warmup)
    trained = AutoModelForImageTextToText.from_pretrained(run)
    assert type(trained).__name__ == type(AutoModelForImageTextToText.from_pretrained(model_dir)).__name__
    before, after = load_file(model_dir / "model.safetensors"), load_file(run / "model.safetensors")
    changed = [name for name in before if name in after and not torch.equal(before[name], after[name])]
    assert any("lm_head" in n or "embed_tokens" in n for n in changed), changed[:5]
    assert type(load_processor(run)) is type(load_processor(model_dir))


def test_analyze_scores_a_qwen_model(workdir, scored, tmp_path, capsys):
    """`napo analyze --model` on a non-LLaVA family: the chosen answers' log-probs it scores are napo logps'."""
    model_dir, data = scored("qwen2.5-vl")
    output = tmp_path / "report"
    code = main(["analyze", "--data", str(workdir / "biased"), "--model", str(model_dir), "--output", str(output),
                 "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(output / "margins.csv")
    assert sorted(set(table["term"])) == ["language", "original", "vision"] and len(table) == 12
    cached = pd.read_parquet(data).set_index("idx")
    for record in table.to_dict("records"):
        assert record["chosen_logps"] == pytest.approx(cached.loc[record["idx"], "ref_chosen_logps"], rel=1e-5)
    assert (output / "report.md").is_file()


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_checkpoint_restores_every_weight_of_the_family(arch, tmp_path):
    """Resuming reads a checkpoint back through from_pretrained (napo.train.checkpoint): on each family every
    parameter comes back, tied heads included, whatever layout save_pretrained wrote."""
    from transformers import AutoModelForImageTextToText

    from napo.train.checkpoint import restore_weights

    path = make_tiny_family_model(arch, tmp_path / "model")
    trained = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter))
    trained.save_pretrained(tmp_path / "checkpoint")
    fresh = AutoModelForImageTextToText.from_pretrained(path)
    restore_weights(fresh, tmp_path / "checkpoint")
    want, got = trained.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
