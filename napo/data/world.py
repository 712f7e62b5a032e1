"""The sample world, and the tiny LLaVA pretrained on it with a language prior built in.

The world is the sample set's: shapes (circle, square, triangle) in six colours, one per picture or
up to three in a scene, and three kinds of turn about them: "What color is the <shape> in the image?",
"What shape is drawn in this picture?" and a description ("Describe the image.", or the image with no
question at all). Its **language prior** is made by construction, as a real one is made by skewed data:

- half of the world's shapes are red (``prior_share``) and circles are the commonest shape, so the
  colour and shape questions seen *without* an image (``text_only_share``; answered with the world's
  odds) teach a text-only guess of "red" and "circle";
- a share of the colour answers (``lazy_share``) were written without looking: they name the prior
  colour whatever the picture shows (the way a VLM's instruction data over-represents the common answer);
- optionally (``absent_share``, 0 by default) some colour questions ask about a shape the picture lacks (a blank
  picture, or another shape drawn), answered "There is no <shape> in the image." unless written lazily.

The world speaks one register ("The square in the image is red.", "The picture shows an orange circle."); the sample
set can be written in another (``make_sample_data(..., writer="other")``), as a real preference set is written by other
models than the one trained.

Pretraining follows LLaVA's recipe at toy scale, deterministic for a seed, in well under a minute on
two CPU cores: the vision tower is first trained alone to recognise colour and shape (a linear probe
on its patch features, as CLIP is pretrained before LLaVA sees it), then the whole model is trained on
the world's turns (next-token loss on the answers). The model that comes out sees colours well (asked
for a description it names the drawn colour), yet *asked about the colour* it often answers the prior
instead: a language bias, the one NaPO's language-biased answers are meant to remove. Its
``question_only`` answers are then fluent and biased ("The square in the image is red."), and its
``image_only`` answers describe the picture. :func:`measure_prior` measures all of this on a fixed probe
set; the numbers are written beside the weights in ``napo_world.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from napo.data.grammar import COLORS, PRIOR_COLOR, PRIOR_SHAPE, SHAPES, article, first_color
from napo.data.sample import draw_image, draw_scene

__all__ = [
    "WorldRecipe",
    "cached_pretrained_model",
    "describe",
    "measure_prior",
    "pretrain_tiny_model",
    "weights_hash",
    "world_turns",
    "write_pretrained_model",
]

MANIFEST = "napo_world.json"
RECIPE_VERSION = 2  # bump when the world or the training changes what a recipe produces


@dataclass(frozen=True)
class WorldRecipe:
    """What the pretrained tiny LLaVA is trained on and how; equal recipes and seeds give equal weights."""

    prior_share: float = 0.5  # share of the world's shapes drawn in the prior colour (red)
    lazy_share: float = 0.35  # share of with-image colour answers that name the prior colour whatever is drawn
    text_only_share: float = 0.15  # colour and shape questions seen without an image
    # share of with-image colour questions about a shape the picture does not have (half blank, half another shape),
    # answered "There is no <shape> in the image." (or, lazily, with the prior colour as any colour answer may be)
    absent_share: float = 0.0
    turns: int = 6000  # training turns (question, image, answer) drawn from the world
    vision_steps: int = 300  # vision tower alone: colour and shape classification
    vision_batch_size: int = 64
    vision_learning_rate: float = 3e-3
    steps: int = 300  # the whole model on the turns
    batch_size: int = 32
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("prior_share", "lazy_share", "text_only_share", "absent_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("turns", "vision_batch_size", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vision_steps < 0:
            raise ValueError(f"vision_steps must be >= 0, got {self.vision_steps}")

    def key(self, seed: int) -> str:
        """A short hash of the recipe, its version and the seed: the cache entry's name."""
        text = json.dumps({"version": RECIPE_VERSION, "seed": seed, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def describe(shapes: list[tuple[str, str]]) -> str:
    """The world's description of a picture: "The picture shows a red circle and a blue square."."""
    parts = [f"{article(color)} {color} {shape}" for shape, color in shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"The picture shows {listed}."


def _world_color(rng: random.Random, recipe: WorldRecipe) -> str:
    if rng.random() < recipe.prior_share:
        return PRIOR_COLOR
    return rng.choice([c for c in sorted(COLORS) if c != PRIOR_COLOR])


def _world_shape(rng: random.Random) -> str:
    return PRIOR_SHAPE if rng.random() < 0.4 else rng.choice([s for s in SHAPES if s != PRIOR_SHAPE])


def world_turns(count: int, seed: int = 0, recipe: WorldRecipe | None = None) -> list[dict[str, Any]]:
    """``count`` training turns: {"image": PIL image or None, "question": str or None, "answer": str}.

    Half are colour questions, a quarter shape questions, a quarter descriptions (half of those with no
    question: what the vision-biased prompt looks like)."""
    recipe = recipe or WorldRecipe()
    rng = random.Random(seed)
    turns = []
    for _ in range(count):
        kind, shape, color = rng.random(), _world_shape(rng), _world_color(rng, recipe)
        if kind < 0.5:
            question = f"What color is the {shape} in the image?"
            if rng.random() < recipe.text_only_share:
                turns.append({"image": None, "question": question, "answer": _color_answer(shape, color)})
                continue
            said = PRIOR_COLOR if rng.random() < recipe.lazy_share else color
            if recipe.absent_share and rng.random() < recipe.absent_share:
                turns.append(_absent_turn(rng, shape, color, said == PRIOR_COLOR))
                continue
            turns.append(
                {"image": draw_image(shape, color, rng), "question": question, "answer": _color_answer(shape, said)}
            )
        elif kind < 0.75:
            question = "What shape is drawn in this picture?"
            image = None if rng.random() < recipe.text_only_share else draw_image(shape, color, rng)
            turns.append({"image": image, "question": question, "answer": describe([(shape, color)])})
        else:
            drawn = [(s, _world_color(rng, recipe)) for s in rng.sample(SHAPES, rng.randint(1, 3))]
            question = "Describe the image." if rng.random() < 0.5 else None
            turns.append({"image": draw_scene(drawn, rng), "question": question, "answer": describe(drawn)})
    return turns


def _absent_turn(rng: random.Random, drawn: str, color: str, lazy: bool) -> dict[str, Any]:
    """A colour question about a shape the picture lacks: a blank picture or one of another shape."""
    from PIL import Image

    asked = rng.choice([s for s in SHAPES if s != drawn])
    image = Image.new("RGB", (64, 64), (255, 255, 255)) if rng.random() < 0.5 else draw_image(drawn, color, rng)
    answer = _color_answer(asked, PRIOR_COLOR) if lazy else f"There is no {asked} in the image."
    return {"image": image, "question": f"What color is the {asked} in the image?", "answer": answer}


def _color_answer(shape: str, color: str) -> str:
    return f"The {shape} in the image is {color}."


# ---------------------------------------------------------------- pretraining


def _encode(processor, turn: dict) -> tuple[list[int], list[int], Any]:
    """(input ids, labels with the prompt masked, pixel values or None): the prompt through the processor
    (image tokens expanded, BOS added) and the answer as the chat template ends an assistant turn."""
    from napo.data.prompts import user_prompt

    num_images = 0 if turn["image"] is None else 1
    prompt = user_prompt(processor, "template", question=turn["question"], num_images=num_images)
    content = [{"type": "image"}] * num_images
    if turn["question"] is not None:
        content.append({"type": "text", "text": turn["question"]})
    full = processor.apply_chat_template(
        [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]},
        ]
    )
    if not full.startswith(prompt):  # the template renders a turn's prompt as its own prefix
        raise RuntimeError(f"the chat template does not extend the generation prompt: {prompt!r} / {full!r}")
    images = None if turn["image"] is None else [turn["image"]]
    encoded = processor(text=[prompt], images=images, return_tensors="pt")
    prompt_ids = encoded["input_ids"][0].tolist()
    answer_ids = processor.tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    pixels = encoded["pixel_values"][0] if images else None
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids, pixels


def _batches(encoded: list, batch_size: int, rng: random.Random, pad_id: int):
    """Endless batches (ids, labels, attention mask, pixel values or None), right-padded; turns of similar
    length are batched together (sorted inside windows of 16 batches) so that padding stays small."""
    import torch

    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        window = batch_size * 16
        groups = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(encoded[i][0]))
            groups += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        rng.shuffle(groups)
        for group in groups:
            rows = [encoded[i] for i in group]
            width = max(len(ids) for ids, _, _ in rows)
            ids = torch.full((len(rows), width), pad_id)
            labels = torch.full((len(rows), width), -100)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for k, (row_ids, row_labels, _) in enumerate(rows):
                ids[k, : len(row_ids)] = torch.tensor(row_ids)
                labels[k, : len(row_labels)] = torch.tensor(row_labels)
                mask[k, : len(row_ids)] = 1
            pixels = [p for _, _, p in rows if p is not None]
            yield ids, labels, mask, (torch.stack(pixels) if pixels else None)


def _vision_tower(model):
    inner = getattr(model, "model", model)
    return getattr(inner, "vision_tower", None) or model.vision_tower


def _pretrain_vision(model, processor, recipe: WorldRecipe, rng: random.Random, log) -> None:
    """The vision tower alone learns colour and shape: linear probes on its mean patch feature (the layer
    LLaVA reads), trained with cross-entropy on freshly drawn single-shape pictures."""
    import torch
    import torch.nn.functional as F

    tower = _vision_tower(model)
    layer = model.config.vision_feature_layer
    width = tower.config.hidden_size
    colors = sorted(COLORS)
    color_head, shape_head = torch.nn.Linear(width, len(colors)), torch.nn.Linear(width, len(SHAPES))
    parameters = [*tower.parameters(), *color_head.parameters(), *shape_head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.vision_learning_rate, weight_decay=0.0)
    for step in range(recipe.vision_steps):
        drawn = [(rng.choice(SHAPES), rng.choice(colors)) for _ in range(recipe.vision_batch_size)]
        pictures = [draw_image(shape, color, rng) for shape, color in drawn]
        pixels = processor.image_processor(pictures, return_tensors="pt")["pixel_values"]
        features = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:].mean(dim=1)
        color_logits, shape_logits = color_head(features), shape_head(features)
        color_target = torch.tensor([colors.index(c) for _, c in drawn])
        shape_target = torch.tensor([SHAPES.index(s) for s, _ in drawn])
        loss = F.cross_entropy(color_logits, color_target) + F.cross_entropy(shape_logits, shape_target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == recipe.vision_steps - 1:
            log(
                f"vision tower: {recipe.vision_steps} steps, loss {loss.item():.3f}, colour accuracy "
                f"{(color_logits.argmax(1) == color_target).float().mean().item():.2f}, shape accuracy "
                f"{(shape_logits.argmax(1) == shape_target).float().mean().item():.2f} (last batch)"
            )


def _pretrain_model(model, processor, recipe: WorldRecipe, rng: random.Random, seed: int, log) -> float:
    import torch

    encoded = [_encode(processor, turn) for turn in world_turns(recipe.turns, seed=seed, recipe=recipe)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.learning_rate, total_steps=recipe.steps, pct_start=0.1
    )
    batches = _batches(encoded, recipe.batch_size, rng, processor.tokenizer.pad_token_id)
    loss = torch.tensor(float("nan"))
    for _ in range(recipe.steps):
        ids, labels, mask, pixels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    log(f"whole model: {recipe.steps} steps of {recipe.batch_size} turns, last loss {loss.item():.3f}")
    return loss.item()


def weights_hash(model) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes and bytes), in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pretrain_tiny_model(
    path: str | Path, seed: int = 0, recipe: WorldRecipe | None = None, progress: bool = True, probes: int = 60
) -> Path:
    """Builds the tiny LLaVA (:mod:`napo.data.tiny`), pretrains it on the world and saves it to ``path``
    with ``save_pretrained``, beside ``napo_world.json`` (recipe, seed, weights hash, the measured prior).

    Deterministic: the same recipe and seed give the same weights on the same machine and torch build
    (the caller's random state is left as it was). ``probes``: the size of :func:`measure_prior`'s probe set."""
    import torch

    from napo.data.tiny import build_model, build_processor

    recipe = recipe or WorldRecipe()
    path = Path(path)

    def log(message: str) -> None:
        if progress:
            print(f"  pretraining: {message}", flush=True)

    start = time.perf_counter()
    processor = build_processor()
    model = build_model(processor, seed=seed)
    rng = random.Random(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the probes' initial weights
        model.train()
        _pretrain_vision(model, processor, recipe, rng, log)
        _pretrain_model(model, processor, recipe, rng, seed, log)
    model.eval()
    seconds = time.perf_counter() - start
    prior = measure_prior((model, processor), probes=probes, recipe=recipe)
    log(", ".join(f"{k} {v:.2f}" for k, v in prior.items()))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    manifest = {
        "recipe": asdict(recipe),
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "weights_sha256": weights_hash(model),
        "prior": prior,
        "pretraining_seconds": round(seconds, 2),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def default_cache_dir() -> Path:
    """``$NAPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/napo``, else ``~/.cache/napo``."""
    if os.environ.get("NAPO_CACHE_DIR"):
        return Path(os.environ["NAPO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "napo"


def cached_pretrained_model(
    cache_dir: str | Path | None = None, seed: int = 0, recipe: WorldRecipe | None = None, progress: bool = True
) -> Path:
    """The pretrained tiny LLaVA for ``seed`` and ``recipe`` from the cache, pretrained into it first when
    absent (written to a temporary folder and renamed, so an interrupted run leaves no half model)."""
    recipe = recipe or WorldRecipe()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"tiny-llava-world-{recipe.key(seed)}"
    if (target / MANIFEST).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".pretraining-", dir=cache))
    try:
        pretrain_tiny_model(scratch, seed=seed, recipe=recipe, progress=progress)
        try:
            scratch.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def write_pretrained_model(
    path: str | Path, seed: int = 0, progress: bool = True, recipe: WorldRecipe | None = None
) -> Path:
    """The cached pretrained tiny LLaVA for ``seed`` and ``recipe`` (pretrained first when the cache lacks it) copied
    to ``path``; a copy already there is replaced only when it is another model."""
    path = Path(path)
    cached = cached_pretrained_model(seed=seed, recipe=recipe, progress=progress)
    wanted = (cached / MANIFEST).read_text()
    if (path / MANIFEST).is_file() and (path / MANIFEST).read_text() == wanted:
        return path
    if path.exists() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise FileExistsError(f"{path} exists and is not a pretrained tiny LLaVA: choose an empty or new directory")
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(cached, path)
    return path


# ---------------------------------------------------------------- measuring the prior


def measure_prior(
    model: Any, probes: int = 60, seed: int = 1234, batch_size: int = 32, recipe: WorldRecipe | None = None
) -> dict[str, float]:
    """How the model answers a fixed probe set of colour questions, each about one shape drawn in a colour
    other than the prior's (so that the prior answer is always wrong):

    - ``with_image_accuracy``: with the picture, the share whose first colour word is the drawn one;
    - ``with_image_prior``: with the picture, the share that names the prior colour instead;
    - ``question_only_prior``: the question without the picture, the share that names the prior colour;
    - ``image_only_names_color``: the picture without the question, the share that names the drawn colour;
    - ``world_accuracy``: with the picture, over pictures drawn with the world's odds (``recipe``'s: half red by
      default).

    ``model``: a checkpoint directory, or a ``(model, processor)`` pair. Greedy decoding, 24 new tokens.
    """
    from napo.data.generate import GenerationSettings, generate_answers
    from napo.data.prompts import user_prompt
    from napo.models.loading import load_model

    model, processor = load_model(model, device="cpu") if isinstance(model, (str, Path)) else model
    rng = random.Random(seed)
    others = [c for c in sorted(COLORS) if c != PRIOR_COLOR]
    drawn = [(rng.choice(SHAPES), rng.choice(others)) for _ in range(probes)]
    world = [(rng.choice(SHAPES), _world_color(rng, recipe or WorldRecipe())) for _ in range(probes)]
    settings = GenerationSettings(max_new_tokens=24, num_beams=1)

    def answers(items, pictures, with_image: bool, with_question: bool) -> list[str]:
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            prompts = [
                user_prompt(
                    processor,
                    "template",
                    question=f"What color is the {shape} in the image?" if with_question else None,
                    num_images=int(with_image),
                )
                for shape, _ in chunk
            ]
            images = pictures[start : start + batch_size] if with_image else None
            out += generate_answers(model, processor, prompts, images, settings)
        return out

    def share(texts: list[str], colors: list[str]) -> float:
        return sum(first_color(t) == c for t, c in zip(texts, colors, strict=True)) / len(texts)

    truth = [color for _, color in drawn]
    pictures = [draw_image(shape, color, rng) for shape, color in drawn]
    world_pictures = [draw_image(shape, color, rng) for shape, color in world]
    with_image = answers(drawn, pictures, True, True)
    return {
        "with_image_accuracy": share(with_image, truth),
        "with_image_prior": share(with_image, [PRIOR_COLOR] * probes),
        "question_only_prior": share(answers(drawn, None, False, True), [PRIOR_COLOR] * probes),
        "image_only_names_color": share(answers(drawn, pictures, True, False), truth),
        "world_accuracy": share(answers(world, world_pictures, True, True), [color for _, color in world]),
    }
