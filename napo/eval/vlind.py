"""VLind-Bench: does the model read the image, or answer from its language prior?

Each instance is a counterfactual scene (a context such as "the sun is purple") with a statement true
in it and one true by common sense, and up to 12 generated counterfactual images voted on by people.
Four True/False pairs are asked, each passing only if the model says True to the first and False to
the second:

- **a, commonsense knowledge (CK)**: the factual image, "based on common sense" (the commonsense
  statement first);
- **b, visual perception (VP)**: the best-voted counterfactual image, "there is <object>" for an object
  in it and one not in it;
- **c, commonsense bias (CB)**: the counterfactual image and the context in text, the counterfactual
  statement first; counted only where a passed (CB = c-and-a passes / a passes);
- **d, language prior (LP)**: each counterfactual image with enough votes, no context; counted only
  where b and c passed (LP = mean over instances of the share of good images passed / b-and-c passes).

Only images with at least ``vote_threshold`` (2) human votes are used, and instances with none are
left out. Answers are parsed as the reference does: lower-cased, newlines to spaces, commas and full
stops dropped, split on spaces, and the first word that is exactly "true" or "false" decides ("NA"
when there is none). Generation: greedy, 3 beams, 64 new tokens.

Reference: zhangzef/NaPO ``muffin/eval/llava15_vlind.py`` (prompts, pairs, image choice, parsing) and
``muffin/eval/vlind_score_pipeline.py`` (the vote filter and the scores), after klee972/VLind-Bench
``eval/score_pipeline.py``. napo's implementation is its own; the prompt wording is the protocol's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napo.eval.benchmark import (
    Benchmark,
    DataFormatError,
    Decoding,
    MissingDataError,
    item,
    metas,
    read_json,
    require_files,
    require_inside,
    require_keys,
    require_types,
)

__all__ = ["VLindBench", "good_images", "parse_true_false", "score_instances"]

VOTE_THRESHOLD = 2
STYLES = {"photorealistic": range(0, 4), "illustration": range(4, 8), "cartoon": range(8, 12), "all": range(0, 12)}
INSTANCE_KEYS = (
    "concept",
    "context_id",
    "context",
    "factual_context",
    "true_statement",
    "false_statement",
    "existent_noun",
    "non-existent_noun",
    "aggregated_human_label_good_images",
)

# The protocol's questions (VLind-Bench's prompt types commonsense_TF, simple_TF, detailed_TF).
_TF = "is the given statement true or false?"
_ONLY = "Only respond in True or False."
_FORGET = "Forget real-world common sense and just follow the information provided in the"


def commonsense_prompt(statement: str) -> str:
    return f"Statement: {statement}\nBased on common sense, {_TF} {_ONLY}"


def object_prompt(noun: str) -> str:
    return f"Statement: There is {noun} in the given image.\nBased on the image, {_TF} {_ONLY}"


def context_prompt(context: str, statement: str) -> str:
    return f"Context: {context}\nStatement: {statement}\nBased on the context, {_TF} {_FORGET} context. {_ONLY}"


def image_prompt(statement: str) -> str:
    return f"Statement: {statement}\nBased on the image, {_TF} {_FORGET} image. {_ONLY}"


def parse_true_false(response: str | None) -> str:
    """ "True", "False" or "NA": the first space-separated word (after lower-casing, newlines to spaces and
    dropping commas and full stops) that is exactly "true" or "false". "True!" or "(true)" are not."""
    if response is None:
        return "NA"
    words = response.lower().replace("\n", " ").replace(",", "").replace(".", "").split(" ")
    for word in words:
        if word in ("true", "false"):
            return word.capitalize()
    return "NA"


def good_images(votes: dict, threshold: int = VOTE_THRESHOLD, style: str = "all") -> list[str]:
    """The image ids (strings "0".."11") with at least ``threshold`` votes, in the votes' order, among the
    ``style``'s ids (photorealistic 0-3, illustration 4-7, cartoon 8-11, all)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    allowed = {str(i) for i in STYLES[style]}
    return [image_id for image_id, vote in votes.items() if vote >= threshold and image_id in allowed]


def best_image(votes: dict) -> str:
    """The image id with the most votes (the first of equals, in the votes' order)."""
    return max(votes, key=lambda image_id: votes[image_id])


@dataclass(frozen=True)
class InstanceAnswers:
    """One instance's parsed answers: a/b/c pairs as (first, second), d as {image id: (first, second)}."""

    concept: str
    votes: dict
    a: tuple[str, str]
    b: tuple[str, str]
    c: tuple[str, str]
    d: dict


def _passes(pair: tuple[str, str]) -> bool:
    return pair == ("True", "False")


def score_instances(
    instances: Iterable[InstanceAnswers], vote_threshold: int = VOTE_THRESHOLD, style: str = "all"
) -> tuple[dict, list[dict]]:
    """(metrics, one result dict per instance kept) in the reference's definitions.

    Metrics: ``CK`` (a passes / instances), ``VP`` (b passes / instances), ``CB`` (c-and-a passes / a
    passes), ``LP`` (sum of each instance's share of good images passed with b and c / b-and-c passes),
    ``LP_micro`` (good images passed / good images of b-and-c instances), ``c_raw`` and ``d_raw`` (c
    passes and mean d shares over all instances, whatever a, b, c gave), ``instances``, ``images``.
    All ratios are fractions in [0, 1] (the reference prints them times 100); 0 where the denominator is 0.
    """
    totals = {
        "a": 0,
        "b": 0,
        "c": 0,
        "a_pass": 0,
        "c_pass": 0,
        "bc_pass": 0,
        "d_macro": 0.0,
        "d_pass_macro": 0.0,
        "d_pass_micro": 0,
        "bc_pass_micro": 0,
    }
    kept, images = [], 0
    for instance in instances:
        good = good_images(instance.votes, vote_threshold, style)
        if not good:
            continue
        images += len(good)
        a = _passes(instance.a)
        b = _passes(instance.b)
        c = _passes(instance.c)
        c_pass = c and a
        bc_pass = b and c_pass
        d = [_passes(instance.d.get(image_id, ("NA", "NA"))) for image_id in good]
        d_pass = [passed and bc_pass for passed in d]
        result = {
            "concept": instance.concept,
            "good_images": len(good),
            "a": int(a),
            "b": int(b),
            "c": int(c),
            "c_pass": int(c_pass),
            "bc_pass": int(bc_pass),
            "d_macro": sum(d) / len(good),
            "d_pass_macro": sum(d_pass) / len(good),
        }
        kept.append(result)
        for key in ("a", "b", "c", "c_pass", "bc_pass", "d_macro", "d_pass_macro"):
            totals[key] += result[key]
        totals["a_pass"] += int(a)
        totals["d_pass_micro"] += sum(d_pass)
        totals["bc_pass_micro"] += int(bc_pass) * len(good)

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator else 0.0

    n = len(kept)
    metrics = {
        "CK": ratio(totals["a_pass"], n),
        "VP": ratio(totals["b"], n),
        "CB": ratio(totals["c_pass"], totals["a_pass"]),
        "LP": ratio(totals["d_pass_macro"], totals["bc_pass"]),
        "LP_micro": ratio(totals["d_pass_micro"], totals["bc_pass_micro"]),
        "c_raw": ratio(totals["c"], n),
        "d_raw": ratio(totals["d_macro"], n),
        "instances": n,
        "images": images,
    }
    return metrics, kept


def pair_items(prefix: str, questions: dict[str, tuple[str, Any]], **meta: Any) -> list[dict]:
    """Items for named questions {part: (question, image)}; the part (a1, d2:3, ...) goes in the meta."""
    return [item(f"{prefix}/{part}", image, text, part=part, **meta) for part, (text, image) in questions.items()]


def instance_questions(instance: dict, cf_image: Callable[[str], Any], factual_image: Any, good: list[str]) -> dict:
    """{part: (question, image)} for one instance: the a, b, c pairs and one d pair per good image."""
    best = best_image(instance["aggregated_human_label_good_images"])
    true_s, false_s = instance["true_statement"], instance["false_statement"]
    questions = {
        "a1": (commonsense_prompt(false_s), factual_image),  # true by common sense: expects True
        "a2": (commonsense_prompt(true_s), factual_image),
        "b1": (object_prompt(instance["existent_noun"]), cf_image(best)),
        "b2": (object_prompt(instance["non-existent_noun"]), cf_image(best)),
        "c1": (context_prompt(instance["context"], true_s), cf_image(best)),
        "c2": (context_prompt(instance["context"], false_s), cf_image(best)),
    }
    for image_id in good:
        questions[f"d1:{image_id}"] = (image_prompt(true_s), cf_image(image_id))
        questions[f"d2:{image_id}"] = (image_prompt(false_s), cf_image(image_id))
    return questions


def collect_instances(answers, key: str = "instance") -> list[InstanceAnswers]:
    """Groups an answers table's rows by instance (meta[key]) back into :class:`InstanceAnswers`; a
    question with no answer (skipped) parses as "NA"."""
    grouped: dict[Any, dict] = {}
    for meta, answer in zip(metas(answers), answers["answer"], strict=True):
        entry = grouped.setdefault(meta[key], {"concept": meta["concept"], "votes": meta["votes"], "parts": {}})
        entry["parts"][meta["part"]] = parse_true_false(answer)
    instances = []
    for entry in grouped.values():
        parts = entry["parts"]

        def pair(name: str, parts: dict = parts) -> tuple[str, str]:
            return parts.get(f"{name}1", "NA"), parts.get(f"{name}2", "NA")

        d = {i: (parts.get(f"d1:{i}", "NA"), parts.get(f"d2:{i}", "NA")) for i in entry["votes"]}
        instances.append(InstanceAnswers(entry["concept"], entry["votes"], pair("a"), pair("b"), pair("c"), d))
    return instances


class VLindBench(Benchmark):
    """VLind-Bench from the user's copy: ``<data_dir>/data.json`` and ``<data_dir>/images/{counterfactual,
    factual}/<concept>/<context_id>_<context>/<image id>.jpg`` (the layout of the released dataset)."""

    name = "vlind"
    title = "VLind-Bench"
    headline = (("CB", "VLind CB", True), ("LP", "VLind LP", True))

    def __init__(self, data_dir: str | Path, vote_threshold: int = VOTE_THRESHOLD, style: str = "all") -> None:
        self.data_dir = Path(data_dir)
        self.vote_threshold = vote_threshold
        self.style = style
        self.decoding = Decoding(max_new_tokens=64, num_beams=3)
        good_images({}, vote_threshold, style)  # checks the style
        data = self.data_dir / "data.json"
        require_files(self.name, [data], hint="download VLind-Bench (see the README, Evaluation data)")
        self.instances = read_json(data, self.name)
        if not isinstance(self.instances, list):
            raise DataFormatError(f"{self.name}: {data} must hold a JSON list of instances")
        for number, instance in enumerate(self.instances):
            require_keys(instance, INSTANCE_KEYS, f"{data} instance {number}", self.name)
            kinds = {key: "text" for key in INSTANCE_KEYS}
            kinds |= {"context_id": "id", "aggregated_human_label_good_images": "votes"}
            require_types(instance, kinds, f"{data} instance {number}", self.name)
            for folder in self._folders(instance):
                require_inside(folder, f"{data} instance {number}", self.name, str(self.data_dir))
        missing = [str(self.data_dir / path) for path in self._image_paths() if not (self.data_dir / path).is_file()]
        if missing:
            raise MissingDataError(self.name, missing, hint="the images/ folder of VLind-Bench is incomplete")

    def _folders(self, instance: dict) -> tuple[str, str]:
        where = f"{instance['concept']}/{instance['context_id']}"
        return (
            f"images/counterfactual/{where}_{instance['context']}",
            f"images/factual/{where}_{instance['factual_context']}",
        )

    def _kept(self):
        # Generation uses every image with enough votes (as the reference): the style only filters the scores.
        for number, instance in enumerate(self.instances):
            good = good_images(instance["aggregated_human_label_good_images"], self.vote_threshold)
            if good:
                yield number, instance, good

    def _image_paths(self) -> list[str]:
        paths: list[str] = []
        for _, instance, good in self._kept():
            counterfactual, factual = self._folders(instance)
            best = best_image(instance["aggregated_human_label_good_images"])
            paths += [f"{factual}/0.jpg", *(f"{counterfactual}/{i}.jpg" for i in dict.fromkeys([best, *good]))]
        return list(dict.fromkeys(paths))

    def items(self) -> list[dict]:
        rows = []
        for number, instance, good in self._kept():
            counterfactual, factual = self._folders(instance)
            questions = instance_questions(
                instance, lambda image_id, folder=counterfactual: f"{folder}/{image_id}.jpg", f"{factual}/0.jpg", good
            )
            votes = instance["aggregated_human_label_good_images"]
            rows += pair_items(f"{number:05d}", questions, instance=number, concept=instance["concept"], votes=votes)
        return rows

    def score(self, answers):
        import pandas as pd

        metrics, kept = score_instances(collect_instances(answers), self.vote_threshold, self.style)
        return metrics, pd.DataFrame(kept)
