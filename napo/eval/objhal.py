"""Object HalBench: CHAIR over detailed descriptions of 300 COCO images.

Ground truth per image: the COCO 2014 instance categories and every COCO object named in its
reference captions, each mapped to its canonical name through the synonyms list. A description's
object mentions are found the same way: the lower-cased text tokenised and each token lemmatised
(NLTK), pairs of tokens merged where they form a two-word object ("hot dog", "home plate", "train
track", "baby <animal>" / "adult <animal>" -> the animal, "passenger jet/train" -> jet/train, "bow
tie" -> tie, "toilet seat" -> toilet, "wine glas" -> wine glass), "seat" dropped when "toilet" is
there, and the tokens that are in the synonyms list kept, each mapped to its canonical object. A
mention is hallucinated when its object is not in the image's ground truth; every mention counts
(repeats too).

- ``CHAIRs``: descriptions with a hallucinated mention / descriptions;
- ``CHAIRs_refine``: the same over descriptions with at least one mention;
- ``CHAIRi``: hallucinated mentions / mentions;
- ``recall``: per description, the distinct correctly mentioned objects, summed / ground-truth
  objects summed (the reference's ``obj_rec``); ``avg_words``: mean space-separated words.

Ratios are fractions (the paper prints them times 100); a ratio with a 0 denominator is 0 (the
reference raises). Descriptions have "Assistant:" removed and are stripped, as the reference reads
them. Generation as the authors' script (zhangzef/NaPO
``muffin/eval/muffin_vqa.py`` defaults): 3 beams sampled at temperature 0.2, up to 1024 new tokens.

Reference: zhangzef/NaPO ``eval/eval_gpt_obj_halbench.py`` (class ``CHAIR``, its ``caption_to_words``,
``get_annotations`` and ``compute_chair`` without the GPT object extraction), after RLAIF-V/RLAIF-V
``eval/eval_gpt_obj_halbench.py`` and Rohrbach et al.'s CHAIR. napo's implementation is its own.
"""

from __future__ import annotations

import base64
from pathlib import Path

from napo.eval.benchmark import (
    Benchmark,
    DataFormatError,
    Decoding,
    MissingDataError,
    item,
    metas,
    read_json,
    read_jsonl,
    read_text,
    require_files,
    require_inside,
    require_keys,
    require_types,
)
from napo.eval.nlp import TextTools, nltk_tools

__all__ = ["ChairScorer", "ObjectHalBench", "chair_metrics", "read_synonyms"]

ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
VEHICLES = ("jet", "train")
SPECIAL_PAIRS = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}
EXTRA_PAIRS = ("home plate", "train track")


def read_synonyms(text: str) -> list[list[str]]:
    """The synonyms list: one object per line, its names separated by ", ", the canonical one first."""
    return [[name.strip() for name in line.strip().split(", ")] for line in text.splitlines() if line.strip()]


class ChairScorer:
    """Maps text to COCO objects (see the module docstring) with ``tools`` (tokenize, lemmatize)."""

    def __init__(self, synonyms: list[list[str]], tools: TextTools) -> None:
        self.tools = tools
        self.canonical: dict[str, str] = {}
        for names in synonyms:
            for name in names:
                self.canonical[name] = names[0]  # a name on two lines keeps the later line's object
        pairs = {name: name for name in self.canonical if len(name.split(" ")) >= 2}
        pairs.update({name: name for name in EXTRA_PAIRS})
        for animal in ANIMALS:
            pairs[f"baby {animal}"] = animal
            pairs[f"adult {animal}"] = animal
        for vehicle in VEHICLES:
            pairs[f"passenger {vehicle}"] = vehicle
        pairs.update(SPECIAL_PAIRS)
        self.pairs = pairs

    def mentions(self, text: str) -> list[tuple[str, str]]:
        """(word, canonical object) for every object mention of ``text``, in order."""
        words = [self.tools.lemmatize(w) for w in self.tools.tokenize(text.lower())]
        merged, position = [], 0
        while position < len(words):
            pair = " ".join(words[position : position + 2])
            if pair in self.pairs:
                merged.append(self.pairs[pair])
                position += 2
            else:
                merged.append(words[position])
                position += 1
        if "toilet" in merged and "seat" in merged:
            merged = [w for w in merged if w != "seat"]
        return [(w, self.canonical[w]) for w in merged if w in self.canonical]

    def ground_truth(self, image_ids, instances: list[dict], captions: list[dict]) -> dict:
        """{image id: set of canonical objects} from COCO instances files and captions files (parsed JSON)."""
        truth: dict = {image_id: set() for image_id in image_ids}
        for data in instances:
            names = {category["id"]: category["name"] for category in data["categories"]}
            for annotation in data["annotations"]:
                if annotation["image_id"] in truth:
                    name = names[annotation["category_id"]]
                    if name not in self.canonical:
                        raise DataFormatError(f"objhal: the COCO category {name!r} is not in the synonyms list")
                    truth[annotation["image_id"]].add(self.canonical[name])
        for data in captions:
            for annotation in data["annotations"]:
                if annotation["image_id"] in truth:
                    truth[annotation["image_id"]].update(obj for _, obj in self.mentions(annotation["caption"]))
        return truth


def chair_metrics(descriptions: list[tuple[str, set]], scorer: ChairScorer) -> tuple[dict, list[dict]]:
    """(metrics, per-description results) for (description, ground-truth objects) pairs."""
    sentences = hallucinated_sentences = with_mentions = mentions = hallucinated = correct = truth_total = 0
    words_total = 0
    results = []
    for text, truth in descriptions:
        found = scorer.mentions(text)
        wrong = [(w, obj) for w, obj in found if obj not in truth]
        right = {obj for _, obj in found if obj in truth}
        sentences += 1
        hallucinated_sentences += bool(wrong)
        with_mentions += bool(found)
        mentions += len(found)
        hallucinated += len(wrong)
        correct += len(right)
        truth_total += len(truth)
        words_total += len(text.strip().split(" "))
        results.append(
            {
                "mentions": len(found),
                "hallucinated": len(wrong),
                "CHAIRs": int(bool(wrong)),
                "CHAIRi": len(wrong) / len(found) if found else 0.0,
                "hallucinated_objects": ", ".join(obj for _, obj in wrong),
                "mentioned_objects": ", ".join(obj for _, obj in found),
                "truth": ", ".join(sorted(truth)),
            }
        )

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    metrics = {
        "CHAIRs": ratio(hallucinated_sentences, sentences),
        "CHAIRs_refine": ratio(hallucinated_sentences, with_mentions),
        "CHAIRi": ratio(hallucinated, mentions),
        "recall": ratio(correct, truth_total),
        "avg_words": ratio(words_total, sentences),
        "descriptions": sentences,
        "descriptions_with_objects": with_mentions,
    }
    return metrics, results


COCO_FILES = ("instances_train2014.json", "instances_val2014.json", "captions_train2014.json", "captions_val2014.json")


class ObjectHalBench(Benchmark):
    """Object HalBench from ``<data_dir>/questions.jsonl`` (the 300 prompts: image_id, question and image, a
    base64 JPEG, as RLAIF-V distributes them, or image_path, relative to the data directory),
    ``<data_dir>/synonyms.txt`` and ``<data_dir>/annotations/`` with the four COCO 2014 files (instances and
    captions of train and val). ``tools``: the NLP pieces (default NLTK, checked at once)."""

    name = "objhal"
    title = "Object HalBench"
    headline = (("CHAIRs", "ObjHal CHAIRs", False), ("CHAIRi", "ObjHal CHAIRi", False))

    def __init__(self, data_dir: str | Path, tools: TextTools | None = None) -> None:
        self.data_dir = Path(data_dir)
        # zhangzef/NaPO muffin/eval/muffin_vqa.py with its defaults: 3 beams, 1024 new tokens, sampling at
        # temperature 0.2 (do_sample is on whenever the temperature is above 0).
        self.decoding = Decoding(max_new_tokens=1024, num_beams=3, temperature=0.2)
        questions = self.data_dir / "questions.jsonl"
        synonyms = self.data_dir / "synonyms.txt"
        coco = [self.data_dir / "annotations" / name for name in COCO_FILES]
        require_files(self.name, [questions, synonyms, *coco], hint="see the README, Evaluation data: Object HalBench")
        self.questions = read_jsonl(questions, self.name)
        for number, row in enumerate(self.questions, start=1):
            require_keys(row, ("image_id", "question"), f"{questions} line {number}", self.name)
            kinds = {"image_id": "int", "question": "text", "image": "text", "image_path": "text"}
            require_types(row, kinds, f"{questions} line {number}", self.name)
            if "image" not in row:
                require_inside(row["image_path"], f"{questions} line {number}", self.name, str(self.data_dir))
            if "image" not in row and "image_path" not in row:
                raise DataFormatError(f"{self.name}: {questions} line {number} has neither image nor image_path")
        missing = [
            str(self.data_dir / r["image_path"])
            for r in self.questions
            if "image" not in r and not (self.data_dir / r["image_path"]).is_file()
        ]
        if missing:
            raise MissingDataError(self.name, missing)
        self.scorer = ChairScorer(read_synonyms(read_text(synonyms, self.name)), tools or nltk_tools())
        self._coco = coco
        self._truth: dict | None = None

    def ground_truth(self) -> dict:
        """{image id: objects}; the COCO files are large (hundreds of MB), so they are read once, when scoring."""
        if self._truth is None:
            loaded = [read_json(path, self.name) for path in self._coco]
            for path, data in zip(self._coco, loaded, strict=True):
                if not isinstance(data, dict) or "annotations" not in data:
                    raise DataFormatError(f"{self.name}: {path} is not a COCO annotations file")
            ids = {int(r["image_id"]) for r in self.questions}
            self._truth = self.scorer.ground_truth(ids, loaded[:2], loaded[2:])
        return self._truth

    def items(self) -> list[dict]:
        rows = []
        for number, row in enumerate(self.questions):
            image = base64.b64decode(row["image"]) if "image" in row else row["image_path"]
            rows.append(item(f"{number:04d}", image, row["question"], image_id=int(row["image_id"])))
        if len({type(r["image"]) for r in rows}) > 1:  # one column type: read the paths into bytes
            for r in rows:
                if isinstance(r["image"], str):
                    r["image"] = (self.data_dir / r["image"]).read_bytes()
        return rows

    def score(self, answers):
        import pandas as pd

        truth = self.ground_truth()
        texts = [(answer or "").replace("Assistant:", "").strip() for answer in answers["answer"]]
        ids = [meta["image_id"] for meta in metas(answers)]
        metrics, results = chair_metrics([(t, truth[i]) for t, i in zip(texts, ids, strict=True)], self.scorer)
        frame = pd.DataFrame(results)
        frame.insert(0, "image_id", ids)
        frame.insert(0, "idx", list(answers["idx"]))
        frame["answer"] = texts
        return metrics, frame
