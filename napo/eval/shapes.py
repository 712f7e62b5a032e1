"""``shapes``: the built-in offline benchmark, drawn like the sample set, with exact ground truth.

The sample set's language prior is "a shape is red" (its rejected answers say so whatever the image).
Every scenario draws one shape in another colour: a world where that prior is wrong. Three kinds of
question measure how far the model follows the prior instead of the picture:

- **VLind pairs** (scored by :func:`napo.eval.vlind.score_instances`, the same pipeline as VLind-Bench):
  a: "the <shape> is red" by common sense, on a factual (red) image; b: is there a <shape> / another
  shape in the counterfactual image; c: the context "in this picture the <shape> is <colour>" with the
  counterfactual image; d: the counterfactual statement on each of two counterfactual images, no
  context. CK, VP, CB and LP as in VLind-Bench.
- **colour questions**: "What color is the <shape> in the image?" on the counterfactual image
  (``color_accuracy``: the first colour named is the drawn one) and on a blank white image
  (``blank_prior_rate``: the share of blank-image answers that name the prior colour first, an
  answer the image cannot have given).
- **descriptions**: "Describe the image." on a picture of 1 to 3 shapes; every shape word of the
  answer is an object mention, hallucinated when no such shape is drawn. CHAIR-style: ``CHAIRs``
  (share of descriptions with a hallucinated shape), ``CHAIRi`` (hallucinated mentions / mentions)
  and ``recall`` (drawn shapes mentioned / drawn shapes).

Deterministic for a seed; nothing is downloaded. ``kinds`` keeps some of the four kinds (``vlind``, ``color``,
``blank``, ``describe``): a model never taught to answer True/False (napo's pretrained tiny LLaVA) scores 0 on the
VLind pairs whatever it sees, and they are 8 of a scenario's 11+ prompts. A subset draws the same pictures.
"""

from __future__ import annotations

import io
import json
import random

from napo.data.grammar import COLORS, PRIOR_COLOR, SHAPES, first_color, shape_mentions  # the world's grammar
from napo.eval.benchmark import Benchmark, Decoding, item, metas
from napo.eval.vlind import collect_instances, instance_questions, pair_items, score_instances

__all__ = ["KINDS", "ShapesBench", "shape_mentions"]

KINDS = ("vlind", "color", "blank", "describe")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _scene(shapes: list[tuple[str, str]], rng: random.Random) -> bytes:
    from napo.data.sample import draw_scene

    return _png(draw_scene(shapes, rng))


class ShapesBench(Benchmark):
    """``scenarios`` counterfactual scenarios (10 items each); ``seed`` fixes every drawing."""

    name = "shapes"
    title = "shapes (built-in)"
    headline = (
        ("CB", "shapes CB", True),
        ("LP", "shapes LP", True),
        ("color_accuracy", "shapes colour acc.", True),
        ("blank_prior_rate", "shapes blank prior", False),
        ("CHAIRs", "shapes CHAIRs", False),
        ("CHAIRi", "shapes CHAIRi", False),
    )

    def __init__(
        self, scenarios: int = 12, seed: int = 0, decoding: Decoding | None = None, kinds: tuple[str, ...] = KINDS
    ) -> None:
        from napo.data.inputs import check_int

        self.scenarios = check_int("scenarios", scenarios, 1)
        kinds = tuple(kinds)
        unknown = [kind for kind in kinds if kind not in KINDS]
        if not kinds or unknown or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct names among {', '.join(KINDS)}, got {', '.join(kinds) or 'none'}")
        self.kinds = kinds
        self.seed = seed
        self.data_dir = None
        self.decoding = decoding or Decoding(max_new_tokens=32, num_beams=1)

    def items(self) -> list[dict]:
        from PIL import Image

        from napo.data.sample import draw_image

        rng = random.Random(self.seed)
        blank = _png(Image.new("RGB", (64, 64), (255, 255, 255)))
        rows: list[dict] = []
        for number in range(self.scenarios):
            shape = rng.choice(SHAPES)
            color = rng.choice(sorted(c for c in COLORS if c != PRIOR_COLOR))
            other = rng.choice([s for s in SHAPES if s != shape])
            factual = _png(draw_image(shape, PRIOR_COLOR, rng))
            counterfactual = {image_id: _png(draw_image(shape, color, rng)) for image_id in ("0", "1")}
            votes = {"0": 3, "1": 3}  # drawn, not generated: every image is a good one
            instance = {
                "aggregated_human_label_good_images": votes,
                "true_statement": f"The {shape} is {color}.",
                "false_statement": f"The {shape} is {PRIOR_COLOR}.",
                "existent_noun": f"a {shape}",
                "non-existent_noun": f"a {other}",
                "context": f"In this picture the {shape} is {color}.",
            }
            questions = instance_questions(instance, counterfactual.__getitem__, factual, list(votes))
            prefix = f"{number:04d}"
            rows += pair_items(prefix, questions, kind="vlind", instance=number, concept="color", votes=votes)
            question = f"What color is the {shape} in the image?"
            rows.append(item(f"{prefix}/color", counterfactual["0"], question, kind="color", truth=color))
            rows.append(item(f"{prefix}/blank", blank, question, kind="blank", prior=PRIOR_COLOR))
            drawn = [(s, rng.choice(sorted(COLORS))) for s in rng.sample(SHAPES, rng.randint(1, 3))]
            truth = sorted({s for s, _ in drawn})
            rows.append(
                item(f"{prefix}/describe", _scene(drawn, rng), "Describe the image.", kind="describe", truth=truth)
            )
        return [row for row in rows if json.loads(row["meta"])["kind"] in self.kinds]

    def score(self, answers):
        import pandas as pd

        parsed = metas(answers)
        metrics = {}
        if "vlind" in self.kinds:
            pairs = answers[[meta["kind"] == "vlind" for meta in parsed]]
            metrics = score_instances(collect_instances(pairs))[0]
        per_item = []
        color_hits, blank_prior, chair_s, mentions, hallucinated, covered, drawn = [], [], [], 0, 0, 0, 0
        for meta, row in zip(parsed, answers.itertuples(index=False), strict=True):
            result = {"idx": row.idx, "kind": meta["kind"], "answer": row.answer}
            if meta["kind"] == "color":
                result["correct"] = int(first_color(row.answer) == meta["truth"])
                color_hits.append(result["correct"])
            elif meta["kind"] == "blank":
                result["prior"] = int(first_color(row.answer) == meta["prior"])
                blank_prior.append(result["prior"])
            elif meta["kind"] == "describe":
                found = shape_mentions(row.answer)
                wrong = [s for s in found if s not in meta["truth"]]
                mentions += len(found)
                hallucinated += len(wrong)
                covered += len(set(found) & set(meta["truth"]))
                drawn += len(meta["truth"])
                chair_s.append(int(bool(wrong)))
                result.update(mentions=len(found), hallucinated=len(wrong), truth=",".join(meta["truth"]))
            else:
                result["part"] = meta["part"]
            per_item.append(result)

        def mean(values: list[int]) -> float:
            return sum(values) / len(values) if values else 0.0

        if "color" in self.kinds:
            metrics["color_accuracy"] = mean(color_hits)
        if "blank" in self.kinds:
            metrics["blank_prior_rate"] = mean(blank_prior)
        if "describe" in self.kinds:
            metrics.update(
                CHAIRs=mean(chair_s),
                CHAIRi=hallucinated / mentions if mentions else 0.0,
                recall=covered / drawn if drawn else 0.0,
            )
        return metrics, pd.DataFrame(per_item)
