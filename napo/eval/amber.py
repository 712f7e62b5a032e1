"""AMBER, generative task: CHAIR, Cover, Hal and Cog over "Describe this image." answers.

For each answer: its nouns (NLTK tokenised and POS-tagged, tags starting with NN, each lemmatised with
WordNet) that are AMBER object words (a key of the relation file or one of its associated words). Per
noun, in order:

1. a global safe word: ignored;
2. equal to a truth object or one of its associated words: covers that truth object (the first match
   in the order associated words of each truth object, then the truth objects themselves); next noun;
3. equal to a hallucination-target word (same order): that target is hit;
4. the first hallucination-target word whose similarity with the noun exceeds the threshold (spaCy
   vectors, > 0.8) is hit;
5. the first truth word similar beyond the threshold covers its truth object; otherwise the noun is
   a hallucinated object.

Summed over answers, starting from the values of AMBER's ``metrics.txt`` (0 scores, 0.001
denominators, so that an empty run divides by no zero): ``CHAIR`` = hallucinated nouns / nouns,
``Cover`` = covered truth objects / truth objects, ``Hal`` = 1 - answers without a hallucinated noun /
answers, ``Cog`` = hit hallucination targets / targets. Fractions (AMBER prints them times 100,
rounded to 0.1). Generation as the authors' script (zhangzef/NaPO
``muffin/eval/muffin_vqa.py`` defaults): 3 beams sampled at temperature 0.2, up to 1024 new tokens.

Reference: junyangwang0410/AMBER ``inference.py`` (``extract_nouns``, ``check_synonyms_word``, the
generative branch of ``main``) and zhangzef/NaPO ``eval/eval_amber.py``. napo's implementation is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from napo.eval.benchmark import (
    Benchmark,
    DataFormatError,
    Decoding,
    MissingDataError,
    item,
    metas,
    read_json,
    read_text,
    require_files,
    require_inside,
    require_keys,
    require_types,
)
from napo.eval.nlp import Similarity, TextTools, nltk_tools, spacy_similarity

__all__ = ["AmberBench", "AmberScorer", "extract_nouns", "read_metric_starts"]

THRESHOLD = 0.8


def extract_nouns(text: str, tools: TextTools) -> list[str]:
    """The lemmatised words of ``text`` whose Penn tag starts with NN."""
    tagged = tools.pos_tag(tools.tokenize(text))
    return [tools.lemmatize(word) for word, tag in tagged if tag.startswith("NN")]


def read_metric_starts(text: str) -> dict[str, float]:
    """AMBER's ``metrics.txt``: ``name=value`` lines, the counters' starting values (read as numbers, not
    evaluated as code)."""
    starts = {}
    for line in text.splitlines():
        parts = line.strip().split("=")
        if len(parts) == 2:
            try:
                starts[parts[0].strip()] = float(parts[1].strip())
            except ValueError:
                raise DataFormatError(f"amber: metrics.txt line {line!r} is not name=number") from None
    return starts


@dataclass
class AmberScorer:
    """AMBER's generative scoring with its relation file, global safe words and metric starting values."""

    association: dict[str, list[str]]
    safe_words: list[str]
    starts: dict[str, float]
    tools: TextTools
    similarity: Similarity
    threshold: float = THRESHOLD

    def __post_init__(self) -> None:
        self.object_words = set(self.association) | {w for words in self.association.values() for w in words}

    def _owners(self, objects: list[str]) -> list[tuple[str, int]]:
        """(word, index of the object it stands for): every object's associated words, then the objects."""
        return [(w, i) for i, obj in enumerate(objects) for w in self.association[obj]] + [
            (obj, i) for i, obj in enumerate(objects)
        ]

    def _similar(self, noun: str, owners: list[tuple[str, int]]) -> int | None:
        for word, owner in owners:
            if self.similarity(noun, word) > self.threshold:
                return owner
        return None

    def judge(self, response: str, truth: list[str], hallu: list[str]) -> dict:
        """One answer: its candidate nouns, which truth objects it covers, which targets it hits, which
        nouns are hallucinated."""
        nouns = [n for n in extract_nouns(response, self.tools) if n in self.object_words]
        safe, targets = self._owners(truth), self._owners(hallu)
        safe_first = {w: owner for w, owner in reversed(safe)}  # word -> its first owner
        target_first = {w: owner for w, owner in reversed(targets)}
        covered, hit, hallucinated = [False] * len(truth), [False] * len(hallu), []
        for noun in nouns:
            if noun in self.safe_words:
                continue
            if noun in safe_first:
                covered[safe_first[noun]] = True
                continue
            if noun in target_first:
                hit[target_first[noun]] = True
            owner = self._similar(noun, targets)
            if owner is not None:
                hit[owner] = True
            owner = self._similar(noun, safe)
            if owner is not None:
                covered[owner] = True
                continue
            hallucinated.append(noun)
        return {"nouns": nouns, "covered": covered, "hit": hit, "hallucinated": hallucinated}

    def metrics(self, judged: list[dict]) -> dict:
        s = dict(self.starts)
        for result in judged:
            s["chair_score"] += len(result["hallucinated"])
            s["chair_num"] += len(result["nouns"])  # global safe words count too, never as hallucinated
            s["safe_cover_score"] += sum(result["covered"])
            s["safe_cover_num"] += len(result["covered"])
            s["hallu_cover_score"] += sum(result["hit"])
            s["hallu_cover_num"] += len(result["hit"])
            s["non_hallu_score"] += not result["hallucinated"]
            s["non_hallu_num"] += 1
        return {
            "CHAIR": s["chair_score"] / s["chair_num"],
            "Cover": s["safe_cover_score"] / s["safe_cover_num"],
            "Hal": 1 - s["non_hallu_score"] / s["non_hallu_num"],
            "Cog": s["hallu_cover_score"] / s["hallu_cover_num"],
            "answers": len(judged),
        }


GENERATIVE_STARTS = (
    "chair_score",
    "chair_num",
    "safe_cover_score",
    "safe_cover_num",
    "hallu_cover_score",
    "hallu_cover_num",
    "non_hallu_score",
    "non_hallu_num",
)


class AmberBench(Benchmark):
    """AMBER's generative task from the user's copy of the AMBER repository's ``data/`` (annotations.json,
    relation.json, safe_words.txt, metrics.txt, query/query_generative.json) under ``<data_dir>/data/`` and
    its images under ``<data_dir>/image/`` (AMBER_<id>.jpg). ``tools`` (NLTK with a tagger) and
    ``similarity`` (spaCy en_core_web_lg) default to the real libraries, checked at once."""

    name = "amber"
    title = "AMBER (generative)"
    headline = (
        ("CHAIR", "AMBER CHAIR", False),
        ("Cover", "AMBER Cover", True),
        ("Hal", "AMBER Hal", False),
        ("Cog", "AMBER Cog", False),
    )

    def __init__(
        self, data_dir: str | Path, tools: TextTools | None = None, similarity: Similarity | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        # zhangzef/NaPO muffin/eval/muffin_vqa.py with its defaults: 3 beams, 1024 new tokens, sampling at
        # temperature 0.2 (do_sample is on whenever the temperature is above 0).
        self.decoding = Decoding(max_new_tokens=1024, num_beams=3, temperature=0.2)
        data = self.data_dir / "data"
        files = {name: data / name for name in ("annotations.json", "relation.json", "safe_words.txt", "metrics.txt")}
        files["queries"] = data / "query" / "query_generative.json"
        require_files(self.name, list(files.values()), hint="copy the data/ folder of the AMBER repository")
        self.annotations = read_json(files["annotations.json"], self.name)
        association = read_json(files["relation.json"], self.name)
        self.queries = read_json(files["queries"], self.name)
        if not isinstance(self.annotations, list) or not isinstance(self.queries, list):
            raise DataFormatError(f"{self.name}: annotations.json and query_generative.json must hold JSON lists")
        for number, query in enumerate(self.queries):
            where = f"{files['queries']} entry {number}"
            require_keys(query, ("id", "image", "query"), where, self.name)
            require_types(query, {"id": "int", "image": "text", "query": "text"}, where, self.name)
            require_inside(query["image"], where, self.name, str(self.data_dir / "image"))
            annotation = self._annotation(query["id"])
            unknown = [w for w in [*annotation["truth"], *annotation["hallu"]] if w not in association]
            if unknown:
                raise DataFormatError(
                    f"{self.name}: the objects {unknown} of item {query['id']} are not in relation.json"
                )
        missing = [
            str(self.data_dir / "image" / q["image"])
            for q in self.queries
            if not (self.data_dir / "image" / q["image"]).is_file()
        ]
        if missing:
            raise MissingDataError(self.name, missing, hint="download AMBER's images into image/")
        starts = read_metric_starts(read_text(files["metrics.txt"], self.name))
        absent = [k for k in GENERATIVE_STARTS if k not in starts]
        if absent:
            raise DataFormatError(f"{self.name}: metrics.txt lacks {', '.join(absent)}")
        # Lines as the reference reads them: only the newline removed.
        safe_words = [
            line.split("\n")[0] for line in read_text(files["safe_words.txt"], self.name).splitlines(keepends=True)
        ]
        self.scorer = AmberScorer(
            association, safe_words, starts, tools or nltk_tools(need_tagger=True), similarity or spacy_similarity()
        )

    def _annotation(self, query_id: int) -> dict:
        # AMBER looks an answer's annotation up by position (id - 1); the id there must agree.
        position = int(query_id) - 1
        entry = self.annotations[position] if 0 <= position < len(self.annotations) else None
        if not isinstance(entry, dict) or entry.get("id") != query_id:
            raise DataFormatError(f"{self.name}: annotations.json entry {position} is not item {query_id}")
        annotation = self.annotations[position]
        where = f"{self.data_dir / 'data' / 'annotations.json'} item {query_id}"
        require_keys(annotation, ("type", "truth", "hallu"), where, self.name)
        require_types(annotation, {"type": "string", "truth": "strings", "hallu": "strings"}, where, self.name)
        if annotation["type"] != "generative":
            raise DataFormatError(f"{self.name}: item {query_id} is {annotation['type']}, not generative")
        return annotation

    def items(self) -> list[dict]:
        return [item(f"{int(q['id']):05d}", f"image/{q['image']}", q["query"], id=int(q["id"])) for q in self.queries]

    def score(self, answers):
        import pandas as pd

        judged, rows = [], []
        for idx, meta, answer in zip(answers["idx"], metas(answers), answers["answer"], strict=True):
            annotation = self._annotation(meta["id"])
            result = self.scorer.judge(answer or "", annotation["truth"], annotation["hallu"])
            judged.append(result)
            rows.append(
                {
                    "idx": idx,
                    "id": meta["id"],
                    "nouns": ", ".join(result["nouns"]),
                    "hallucinated": ", ".join(result["hallucinated"]),
                    "covered": sum(result["covered"]),
                    "truth": len(result["covered"]),
                    "hit": sum(result["hit"]),
                    "targets": len(result["hit"]),
                    "answer": answer,
                }
            )
        return self.scorer.metrics(judged), pd.DataFrame(rows)
