"""POPE: polling-based object probing ("Is there a <object> in the image?", yes or no).

Answers are read as LLaVA's evaluation reads them: only the text before the first full stop, commas
dropped, split on spaces; "no" when a word is exactly "No", "no" or "not", "yes" otherwise. With "yes"
the positive class: accuracy, precision, recall, F1 and the yes-ratio (share of "yes" predictions),
per POPE file (its category: adversarial, popular, random) and over all items. A ratio whose
denominator is 0 is reported as 0 (the reference raises). Generation as LLaVA-1.5's POPE run: greedy,
1 beam, 128 new tokens, the question followed by "Answer the question using a single word or phrase."

Reference: haotian-liu/LLaVA ``llava/eval/eval_pope.py`` (parsing and metrics) and
``scripts/v1_5/eval/pope.sh``; the files are POPE's (RUCAIBox/POPE ``output/coco/coco_pope_*.json``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from napo.eval.benchmark import (
    Benchmark,
    Decoding,
    MissingDataError,
    item,
    metas,
    read_jsonl,
    require_inside,
    require_keys,
    require_types,
)

__all__ = ["PopeBench", "parse_yes_no", "pope_metrics"]

SUFFIX = "\nAnswer the question using a single word or phrase."


def parse_yes_no(response: str | None) -> str:
    """ "yes" or "no" as LLaVA's POPE evaluation decides (see the module docstring)."""
    text = response or ""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no ``predictions`` against ``labels`` (a label
    other than "no" counts as yes, as the reference)."""
    pred = [p != "no" for p in predictions]
    gold = [label != "no" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    tn = sum(not p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(not p and g for p, g in zip(pred, gold, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    total = len(pred)
    return {
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "F1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(pred) / total if total else 0.0,
        "items": total,
    }


class PopeBench(Benchmark):
    """POPE from ``<data_dir>/coco_pope_<category>.json`` (JSON lines: question_id, image, text, label) and
    the COCO val2014 images they name under ``<data_dir>/images/``. Any ``*.json``/``*.jsonl`` file there
    is read as one category, named after the file."""

    name = "pope"
    title = "POPE"
    headline = (("F1", "POPE F1", True), ("accuracy", "POPE Acc", True), ("yes_ratio", "POPE yes", False))

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.decoding = Decoding(max_new_tokens=128, num_beams=1)
        if not self.data_dir.is_dir():
            raise MissingDataError(
                self.name,
                [str(self.data_dir / "coco_pope_random.json")],
                hint="download POPE's question files and the COCO val2014 images",
            )
        files = sorted(p for p in self.data_dir.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise MissingDataError(
                self.name,
                [str(self.data_dir / "coco_pope_random.json")],
                hint="no POPE question file (coco_pope_<category>.json) found",
            )
        self.questions = []
        for path in files:
            category = path.stem.removeprefix("coco_pope_")
            for number, row in enumerate(read_jsonl(path, self.name), start=1):
                where = f"{path} line {number}"
                require_keys(row, ("question_id", "image", "text", "label"), where, self.name)
                require_types(row, {"question_id": "id", "image": "text", "text": "text", "label": "text"}, where,
                              self.name)  # fmt: skip
                require_inside(row["image"], where, self.name, str(self.data_dir / "images"))
                self.questions.append((category, row))
        odd = [row["label"] for _, row in self.questions if row["label"] not in ("yes", "no")]
        if odd:
            warnings.warn(
                f"pope: {len(odd)} label(s) are neither 'yes' nor 'no' (e.g. {odd[0]!r}); they count as 'yes', as "
                "LLaVA's eval_pope.py counts them",
                UserWarning,
                stacklevel=2,
            )
        missing = sorted(
            {
                str(self.data_dir / "images" / row["image"])
                for _, row in self.questions
                if not (self.data_dir / "images" / row["image"]).is_file()
            }
        )
        if missing:
            raise MissingDataError(self.name, missing, hint="put the COCO val2014 images under images/")

    def items(self) -> list[dict]:
        return [
            item(
                f"{category}/{row['question_id']}",
                f"images/{row['image']}",
                row["text"] + SUFFIX,
                category=category,
                label=row["label"],
            )
            for category, row in self.questions
        ]

    def score(self, answers):
        import pandas as pd

        rows = [
            {
                "idx": idx,
                "category": meta["category"],
                "label": meta["label"],
                "answer": answer,
                "prediction": parse_yes_no(answer),
            }
            for idx, meta, answer in zip(answers["idx"], metas(answers), answers["answer"], strict=True)
        ]
        frame = pd.DataFrame(rows, columns=["idx", "category", "label", "answer", "prediction"])
        metrics = pope_metrics(frame["prediction"].tolist(), frame["label"].tolist())
        for category, group in frame.groupby("category", sort=True):
            for key, value in pope_metrics(group["prediction"].tolist(), group["label"].tolist()).items():
                metrics[f"{category}_{key}"] = value
        return metrics, frame
