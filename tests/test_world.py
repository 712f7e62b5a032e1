"""The pretrained tiny LLaVA of the sample world: deterministic, loadable, and biased the way it is built to be.

Thresholds (the default recipe, seed 0, measured on this machine when written, recipe version 2 with the 424-token
vocabulary: with-image accuracy on non-red shapes 0.75 with 0.25 naming red, question-only answers naming red 1.00,
image-only answers naming the drawn colour 1.00, with-image accuracy on the world's own pictures 0.92) are set below
those values with room for another CPU's rounding, and above what a model without the property scores (a random
model: 0 everywhere).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from napo.cli import main
from napo.data.world import (
    MANIFEST,
    WorldRecipe,
    cached_pretrained_model,
    describe,
    measure_prior,
    pretrain_tiny_model,
    weights_hash,
    world_turns,
)

SMALL = WorldRecipe(turns=64, vision_steps=3, vision_batch_size=8, steps=3, batch_size=8)


@pytest.fixture(scope="module")
def pretrained():
    return cached_pretrained_model(progress=False)  # the session's cache (conftest): built once


@pytest.fixture(scope="module")
def loaded(pretrained):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(pretrained).eval(), AutoProcessor.from_pretrained(pretrained)


def test_pretraining_is_deterministic_per_seed(tmp_path):
    from transformers import LlavaForConditionalGeneration

    hashes = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        path = pretrain_tiny_model(tmp_path / name, seed=seed, recipe=SMALL, progress=False, probes=4)
        manifest = json.loads((path / MANIFEST).read_text())
        reloaded = LlavaForConditionalGeneration.from_pretrained(path)
        assert weights_hash(reloaded) == manifest["weights_sha256"]  # what was saved is what was trained
        hashes[name] = manifest["weights_sha256"]
    assert hashes["a"] == hashes["b"] and hashes["a"] != hashes["c"]
    assert SMALL.key(3) != SMALL.key(4) and SMALL.key(3) != WorldRecipe().key(3)


def test_the_world_has_its_prior_in_its_data():
    turns = world_turns(3000, seed=0)
    colour = [t for t in turns if t["question"] and t["question"].startswith("What color")]
    blind = [t for t in colour if t["image"] is None]
    seen = [t for t in colour if t["image"] is not None]
    red = sum(t["answer"].endswith(" red.") for t in blind) / len(blind)
    assert 0.4 < red < 0.6  # text-only colour turns follow the world's odds: half red
    assert 0.6 < sum(t["answer"].endswith(" red.") for t in seen) / len(seen) < 0.75  # 0.5 + 0.35 * 0.5 red
    assert {t["image"] is None and t["question"] is None for t in turns} == {False}  # never neither
    assert describe([("circle", "orange"), ("square", "red")]) == "The picture shows an orange circle and a red square."


def test_pretrained_model_loads_and_has_the_prior(pretrained, loaded):
    manifest = json.loads((pretrained / MANIFEST).read_text())
    assert manifest["recipe"] == asdict(WorldRecipe())
    prior = measure_prior(loaded)
    assert prior == manifest["prior"]  # the measurement the manifest records, redone on the reloaded model
    assert prior["world_accuracy"] >= 0.7  # with the image it answers most colour questions right
    assert prior["question_only_prior"] >= 0.9  # without the image it falls back to the prior
    assert prior["image_only_names_color"] >= 0.6  # without the question it describes the picture
    assert prior["with_image_prior"] >= 0.2 and prior["with_image_accuracy"] >= 0.3  # biased even with the image


def test_biased_answers_are_sentences_that_follow_the_prior(loaded):
    import random

    from napo.data.generate import GenerationSettings, generate_answers
    from napo.data.prompts import user_prompt
    from napo.data.sample import draw_image

    model, processor = loaded
    rng = random.Random(7)
    shapes = ["circle", "square", "triangle", "square"]
    prompts = [user_prompt(processor, "template", question=f"What color is the {s} in the image?", num_images=0)
               for s in shapes]  # fmt: skip
    blind = generate_answers(model, processor, prompts, None, GenerationSettings(max_new_tokens=24, num_beams=3))
    # The prior's colour in the world's register. Which shape it names is the model's: since the 427-token vocabulary
    # (recipe version 2) the default model names the world's commonest shape, the circle, whatever the question asks.
    assert all(re.fullmatch(r"The (circle|square|triangle) in the image is red\.", b) for b in blind), blind
    pictures = [draw_image(s, c, rng) for s, c in (("circle", "blue"), ("triangle", "green"))]
    prompts = [user_prompt(processor, "template", question=None, num_images=1)] * 2
    described = generate_answers(model, processor, prompts, pictures, GenerationSettings(max_new_tokens=24))
    assert all(re.fullmatch(r"The picture shows an? [a-z]+ (circle|square|triangle)( and .*)?\.", d) for d in described)


def test_make_tiny_model_pretrain_writes_the_cached_model(pretrained, tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--pretrain"]) == 0
    assert "pretrained tiny LLaVA written to" in capsys.readouterr().out
    assert (tmp_path / "m" / MANIFEST).read_text() == (pretrained / MANIFEST).read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["make-tiny-model", str(tmp_path / "other"), "--pretrain"]) == 2  # never overwrites other files
    assert "is not a pretrained tiny LLaVA" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("field, value", [("prior_share", 1.5), ("steps", 0), ("vision_steps", -1)])
def test_bad_recipes_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        WorldRecipe(**{field: value})


def test_an_interrupted_pretraining_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    import napo.data.world as world

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(world, "measure_prior", interrupted)  # after training, before anything is saved
    with pytest.raises(KeyboardInterrupt):
        cached_pretrained_model(tmp_path, seed=5, recipe=SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []  # no half model, no scratch folder
    monkeypatch.undo()
    path = cached_pretrained_model(tmp_path, seed=5, recipe=SMALL, progress=False)
    assert path.name == f"tiny-llava-world-{SMALL.key(5)}" and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert cached_pretrained_model(tmp_path, seed=5, recipe=SMALL, progress=False) == path  # reused, not rebuilt


def test_the_grammar_writes_an_before_a_vowel():
    from napo.data.sample import sample_corpus, sample_rows

    texts = sample_corpus() + [r[k] for r in sample_rows(200, seed=1) for k in ("chosen", "rejected")]
    texts += [r[k] for r in sample_rows(200, seed=1, writer="other") for k in ("chosen", "rejected")]
    assert not [t for t in texts if re.search(r"\ba [aeiou]", t, re.IGNORECASE)]
    assert "The picture shows an orange circle." in sample_corpus()


def test_the_other_writer_speaks_another_register_with_one_phrasing_per_pair():
    from napo.data.sample import sample_rows
    from napo.data.tiny import build_tokenizer

    rows = sample_rows(300, seed=2, writer="other", with_truth=True)
    world = sample_rows(300, seed=2)
    own = re.compile(r"The (circle|square|triangle) in the image is [a-z]+\.|The picture shows .*")
    assert not [r["chosen"] for r in rows if own.fullmatch(r["chosen"])]  # never the model's own sentences
    assert all(own.fullmatch(r["chosen"]) or r["chosen"].startswith("It is a") for r in world)
    assert len({r["chosen"].split()[0] for r in rows}) >= 5  # several phrasings, short and long
    for row in rows:  # chosen and rejected differ in the content word (and its article) only
        differ = [(a, b) for a, b in zip(row["chosen"].split(), row["rejected"].split(), strict=True) if a != b]
        assert len([(a, b) for a, b in differ if a.lower() not in ("a", "an")]) == 1, row
    tokenizer = build_tokenizer()
    assert tokenizer.unk_token_id not in tokenizer(" ".join(r["chosen"] for r in rows))["input_ids"]


def test_the_other_writer_says_where_the_shape_is():
    import io

    from PIL import Image

    from napo.data.sample import region, sample_rows

    placed = [r for r in sample_rows(200, seed=3, writer="other", with_truth=True) if " in the " in r["chosen"]]
    assert len(placed) > 20
    for row in placed:
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        xs, ys = zip(*[(x, y) for x in range(64) for y in range(64) if min(image.getpixel((x, y))) < 200], strict=True)
        x, y = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2  # the drawn box's centre, within a pixel or two
        near = {region((x + dx) / 64, (y + dy) / 64) for dx in (-2, 0, 2) for dy in (-2, 0, 2)}
        assert [name for name in near if f" {name}" in row["chosen"]], (row["chosen"], near)


def test_rows_about_an_absent_shape_say_there_is_none():
    import io

    from PIL import Image

    from napo.data.sample import sample_rows

    rows = sample_rows(400, seed=4, writer="other", absent_share=0.2, with_truth=True)
    absent = [r for r in rows if r["truth"]["kind"] == "absent"]
    assert 0.12 < len(absent) / len(rows) < 0.28
    blank = [r for r in absent if r["truth"]["color"] is None]
    assert 0.3 < len(blank) / len(absent) < 0.7
    for row in absent:
        assert " no " in f" {row['chosen']} " and "red" in row["rejected"].lower()
        assert row["truth"]["shape"] in row["question"]
    white = Image.open(io.BytesIO(blank[0]["image"]["bytes"])).convert("RGB")
    assert white.getextrema() == ((255, 255), (255, 255), (255, 255))
    assert sample_rows(50, seed=4) == sample_rows(50, seed=4, absent_share=0.0)  # the default draw is unchanged
    with pytest.raises(ValueError, match="writer"):
        sample_rows(2, writer="me")


def test_the_world_can_ask_about_absent_shapes():
    turns = world_turns(2000, seed=0, recipe=WorldRecipe(absent_share=0.2))
    none = [t for t in turns if t["answer"].startswith("There is no")]
    assert none and all(t["image"] is not None and t["answer"].split()[3] in t["question"] for t in none)
    assert not [t for t in world_turns(2000, seed=0) if t["answer"].startswith("There is no")]


def test_noise_world_writer_quick_runs_the_whole_pipeline(tmp_path):
    """CI's smoke test of the experiment (benchmarks/noise_world_writer.py --quick): the pipeline, not the result."""
    script = Path(__file__).parents[1] / "benchmarks" / "noise_world_writer.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--work", str(tmp_path / "w"), "--cache", str(tmp_path / "c"),
         "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "p.png"),
         "--weights-plot", str(tmp_path / "w.png")],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    import pandas as pd

    runs = pd.read_csv(tmp_path / "r.csv")
    assert list(runs["method"]) == ["pretrained", "DPO, original pairs", "full method (paper)"]
    for column in ("language_right_anyway", "language_equal_text", "blank_prior_rate", "dlogp_language_wrong"):
        assert runs[column].iloc[1:].notna().all(), column
    steps = pd.read_csv(tmp_path / "r_steps.csv")
    assert {"napo/weight_language", "napo/q_vision"} <= set(steps.columns) and len(steps) >= 2
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "w.png").stat().st_size > 0
    assert "paired per seed" in out.stdout and "measured shares" in out.stdout


def test_right_anyway_labels_follow_the_drawn_truth():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from noise_world_writer import right_anyway

    colour = {"kind": "color", "shape": "square", "color": "red"}
    assert right_anyway("The square in the image is red.", colour)
    assert not right_anyway("The square in the image is blue.", colour)
    assert not right_anyway("The circle in the image is red.", colour)
    shape = {"kind": "shape", "shape": "circle", "color": "green"}
    assert right_anyway("It's a circle.", shape) and not right_anyway("The picture shows a red circle.", shape)
    absent = {"kind": "absent", "shape": "square", "color": None}
    assert right_anyway("There is no square in the image.", absent)
    assert not right_anyway("The square in the image is red.", absent)
