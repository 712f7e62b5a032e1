"""The pretrained tiny LLaVA of the sample world: deterministic, loadable, and biased the way it is built to be.

Thresholds (the default recipe, seed 0, measured on this machine when written: with-image accuracy on non-red
shapes 0.52 with 0.48 naming red, question-only answers naming red 1.00, image-only answers naming the drawn
colour 0.78, with-image accuracy on the world's own pictures 0.85) are set below those values with room for
another CPU's rounding, and above what a model without the property scores (a random model: 0 everywhere).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict

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
    assert blind == [f"The {s} in the image is red." for s in shapes]
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
