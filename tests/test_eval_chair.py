"""Object HalBench (CHAIR) and AMBER (generative) on tiny hand-made fixtures, expected values by hand.

NLTK and spaCy are replaced by small stubs; one test uses the real NLTK when its data is present."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("PIL")

from test_eval_metrics import _answer, _jpeg  # noqa: E402  the benchmark tests' shared helpers

from napo.eval.benchmark import DataFormatError, MissingDataError  # noqa: E402
from napo.eval.nlp import NlpUnavailable, TextTools  # noqa: E402

# ---------------------------------------------------------------- Object HalBench (CHAIR)

LEMMAS = {"puppies": "puppy", "chairs": "chair", "dogs": "dog", "eats": "eat"}
STUB_TOOLS = TextTools(
    tokenize=lambda text: re.findall(r"[a-z]+|[^\sa-z]", text),
    lemmatize=lambda word: LEMMAS.get(word, word),
    pos_tag=lambda words: [(w, "NN" if w in NOUNS else ("NNS" if w.endswith("s") else "DT")) for w in words],
)
NOUNS = {"puppy", "grass", "kitten", "floor", "tree", "car", "dog", "ground", "cat"}


def _coco(root: Path) -> None:
    annotations = root / "annotations"
    annotations.mkdir(parents=True)
    categories = [{"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}]

    def write(name, data):
        (annotations / name).write_text(json.dumps(data))

    write("instances_val2014.json", {"categories": categories, "annotations": [{"image_id": 1, "category_id": 18}]})
    write("instances_train2014.json",
          {"categories": categories, "annotations": [{"image_id": 2, "category_id": 62},
                                                     {"image_id": 3, "category_id": 18}]})  # fmt: skip
    write("captions_val2014.json", {"annotations": [{"image_id": 1, "caption": "A puppy on a seat."}]})
    write("captions_train2014.json", {"annotations": [{"image_id": 2, "caption": "Two chairs by a toilet seat."}]})


@pytest.fixture
def objhal_dir(tmp_path) -> Path:
    import base64
    import io

    from PIL import Image

    root = tmp_path / "objhal"
    root.mkdir()
    (root / "synonyms.txt").write_text("dog, puppy\nhot dog, frankfurter\nchair, seat, stool\n")
    _coco(root)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    image = base64.b64encode(buffer.getvalue()).decode()
    rows = [{"image_id": image_id, "question": "Describe the image in detail.", "image": image}
            for image_id in (1, 2, 1)]  # fmt: skip
    (root / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


OBJHAL_ANSWERS = [
    "Assistant: A dog eats a hot dog near puppies.",
    "A stool and a toilet seat.",
    "A toilet with a seat.",
]


def _objhal_expected() -> dict:
    """Worked by hand. Ground truth: image 1 = {dog (instances), dog (puppy), chair (seat) (captions)};
    image 2 = {chair (instances), chair (chairs; "toilet seat" is the toilet, not a COCO object)}.
    Answer 1 (image 1): dog, hot dog, dog (puppies) -> hot dog hallucinated; distinct correct {dog}.
    Answer 2 (image 2): chair (stool); "toilet seat" -> toilet, no object; distinct correct {chair}.
    Answer 3 (image 1): "seat" dropped beside "toilet" -> no mention."""
    return {
        "CHAIRs": 1 / 3,
        "CHAIRs_refine": 1 / 2,
        "CHAIRi": 1 / 4,
        "recall": (1 + 1 + 0) / (2 + 1 + 2),
        "avg_words": (8 + 6 + 5) / 3,  # "Assistant:" removed first
        "descriptions": 3,
        "descriptions_with_objects": 2,
    }


def test_object_halbench_chair_by_hand(objhal_dir):
    from napo.eval.objhal import ObjectHalBench

    bench = ObjectHalBench(objhal_dir, tools=STUB_TOOLS)
    assert bench.ground_truth() == {1: {"dog", "chair"}, 2: {"chair"}}
    frame = _answer(bench, lambda idx, meta: OBJHAL_ANSWERS[int(idx)])
    metrics, per_item = bench.score(frame)
    assert metrics == pytest.approx(_objhal_expected())
    assert per_item["hallucinated_objects"].tolist() == ["hot dog", "", ""]
    assert per_item["mentioned_objects"].tolist() == ["dog, hot dog, dog", "chair", ""]


def test_object_halbench_two_word_rules():
    from napo.eval.objhal import ChairScorer, read_synonyms

    scorer = ChairScorer(read_synonyms("dog, puppy\nbird\ntie, necktie\ntrain\nwine glass\n"), STUB_TOOLS)
    assert [obj for _, obj in scorer.mentions("a baby bird and an adult dog")] == ["bird", "dog"]
    assert [obj for _, obj in scorer.mentions("a bow tie on a passenger train")] == ["tie", "train"]
    assert [obj for _, obj in scorer.mentions("one wine glas")] == ["wine glass"]


def test_object_halbench_with_real_nltk(objhal_dir):
    from napo.eval.nlp import nltk_tools
    from napo.eval.objhal import ObjectHalBench

    try:
        tools = nltk_tools()
    except NlpUnavailable as error:
        pytest.skip(f"the real NLTK pipeline is not available here (napo never downloads its data): {error}")
    bench = ObjectHalBench(objhal_dir, tools=tools)
    metrics, _ = bench.score(_answer(bench, lambda idx, meta: OBJHAL_ANSWERS[int(idx)]))
    assert metrics == pytest.approx(_objhal_expected())


def test_absent_nltk_data_is_one_error_saying_where_to_point(tmp_path, monkeypatch):
    nltk = pytest.importorskip("nltk", reason="NLTK is not installed: its missing-data message cannot be checked")
    from napo.eval.nlp import nltk_tools

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # an empty data folder, whatever this machine has
    with pytest.raises(NlpUnavailable, match="NLTK_DATA") as error:
        nltk_tools(need_tagger=True)
    assert "punkt" in str(error.value) and "nltk.download(" not in str(error.value)


def test_object_halbench_missing_files_and_nltk_message(objhal_dir, monkeypatch):
    from napo.eval import nlp
    from napo.eval.objhal import ObjectHalBench

    (objhal_dir / "annotations" / "captions_train2014.json").unlink()
    (objhal_dir / "synonyms.txt").unlink()
    with pytest.raises(MissingDataError) as error:
        ObjectHalBench(objhal_dir, tools=STUB_TOOLS)
    assert sorted(error.value.missing) == sorted(
        [str(objhal_dir / "synonyms.txt"), str(objhal_dir / "annotations" / "captions_train2014.json")]
    )
    # Without NLTK importable, the default tools name what to install.
    monkeypatch.setitem(__import__("sys").modules, "nltk", None)
    with pytest.raises(NlpUnavailable, match="pip install nltk"):
        nlp.nltk_tools()


# ---------------------------------------------------------------- AMBER (generative)

RELATION = {"dog": ["puppy"], "grass": ["ground"], "ground": ["floor"], "cat": ["kitten"], "tree": [], "car": []}
METRICS_TXT = "\n".join(
    ["chair_num=0.001", "chair_score=0", "safe_cover_num=0.001", "safe_cover_score=0", "hallu_cover_num=0.001",
     "hallu_cover_score=0", "non_hallu_score=0", "non_hallu_num=0.001", "qa_correct_score=0"]
)  # fmt: skip
SIMILAR = {frozenset(("tree", "grass")): 0.85}


def stub_similarity(first: str, second: str) -> float:
    return 1.0 if first == second else SIMILAR.get(frozenset((first, second)), 0.1)


@pytest.fixture
def amber_dir(tmp_path) -> Path:
    root = tmp_path / "amber"
    data = root / "data"
    (data / "query").mkdir(parents=True)
    annotations = [{"id": 1, "type": "generative", "truth": ["dog", "grass"], "hallu": ["cat", "tree"]},
                   {"id": 2, "type": "generative", "truth": ["ground", "car"], "hallu": ["dog"]}]  # fmt: skip
    (data / "annotations.json").write_text(json.dumps(annotations))
    (data / "relation.json").write_text(json.dumps(RELATION))
    (data / "safe_words.txt").write_text("floor\n")
    (data / "metrics.txt").write_text(METRICS_TXT)
    queries = [{"id": i, "image": f"AMBER_{i}.jpg", "query": "Describe this image."} for i in (1, 2)]
    (data / "query" / "query_generative.json").write_text(json.dumps(queries))
    for i in (1, 2):
        _jpeg(root / "image" / f"AMBER_{i}.jpg")
    return root


AMBER_ANSWERS = {1: "A puppy on grass near kittens and a floor and a tree and a car.", 2: "A floor."}


def test_amber_generative_by_hand(amber_dir):
    from napo.eval.amber import AmberBench

    bench = AmberBench(amber_dir, tools=STUB_TOOLS, similarity=stub_similarity)
    LEMMAS["kittens"] = "kitten"
    try:
        metrics, per_item = bench.score(_answer(bench, lambda idx, meta: AMBER_ANSWERS[meta["id"]]))
    finally:
        del LEMMAS["kittens"]
    # Item 1 nouns: puppy (covers dog), grass (covers grass), kitten (hits cat, nothing safe is similar:
    # hallucinated), floor (global safe word: skipped), tree (hits tree; similar to grass, 0.85 > 0.8: not
    # hallucinated), car (an object word of neither list, similar to none: hallucinated).
    # Item 2 nouns: floor (global safe word, though it is ground's associated word: skipped).
    assert per_item["hallucinated"].tolist() == ["kitten, car", ""]
    assert metrics["CHAIR"] == pytest.approx(2 / (0.001 + 6 + 1))
    assert metrics["Cover"] == pytest.approx((2 + 0) / (0.001 + 2 + 2))
    assert metrics["Hal"] == pytest.approx(1 - 1 / (0.001 + 2))
    assert metrics["Cog"] == pytest.approx((2 + 0) / (0.001 + 2 + 1))


def test_amber_first_matching_owner_takes_the_coverage():
    from napo.eval.amber import AmberScorer

    scorer = AmberScorer(RELATION, [], {}, STUB_TOOLS, stub_similarity)
    # "ground" is grass's associated word before it is a truth object itself: it covers grass, not ground.
    judged = scorer.judge("ground", ["grass", "ground"], [])
    assert judged["covered"] == [True, False] and judged["hallucinated"] == []


def test_amber_checks_its_files(amber_dir):
    from napo.eval.amber import AmberBench

    (amber_dir / "image" / "AMBER_2.jpg").unlink()
    with pytest.raises(MissingDataError) as error:
        AmberBench(amber_dir, tools=STUB_TOOLS, similarity=stub_similarity)
    assert error.value.missing == [str(amber_dir / "image" / "AMBER_2.jpg")]
    _jpeg(amber_dir / "image" / "AMBER_2.jpg")
    (amber_dir / "data" / "relation.json").write_text(json.dumps({"dog": []}))
    with pytest.raises(DataFormatError, match=r"not in relation\.json"):
        AmberBench(amber_dir, tools=STUB_TOOLS, similarity=stub_similarity)


def _amber_by_position_lists(nouns, truth, hallu, relation, safe, similar):
    """AMBER's bookkeeping as its paper code keeps it, re-done here independently: one flat list of words per
    side (every object's related words, then the objects), a parallel list of owner positions ending in one
    slot per object, and the object slots marked through those positions."""

    def side(objects):
        words, slots = [], []
        for position, obj in enumerate(objects):
            words += relation[obj]
            slots += [position] * len(relation[obj])
        return words + list(objects), slots + [0] * len(objects)

    def mark(slots, objects, j):
        tail = len(slots) - len(objects)
        slots[slots[j] + tail if j < tail else j] = 1

    safe_words, safe_slots = side(truth)
    ha_words, ha_slots = side(hallu)
    flags = []
    for noun in nouns:
        flag = 0
        if noun in safe:
            flags.append(flag)
            continue
        if noun in safe_words:
            mark(safe_slots, truth, safe_words.index(noun))
            flags.append(flag)
            continue
        if noun in ha_words:
            mark(ha_slots, hallu, ha_words.index(noun))
        for j, word in enumerate(ha_words):
            if similar(noun, word) > 0.8:
                mark(ha_slots, hallu, j)
                break
        rescued = False
        for j, word in enumerate(safe_words):
            if similar(noun, word) > 0.8:
                mark(safe_slots, truth, j)
                rescued = True
                break
        flags.append(0 if rescued else 1)
    covered = safe_slots[len(safe_slots) - len(truth) :] if truth else []
    hit = ha_slots[len(ha_slots) - len(hallu) :] if hallu else []
    return sum(flags), len(flags), sum(covered), sum(hit)


def test_amber_agrees_with_an_independent_recount_on_random_inputs():
    import random

    from napo.eval.amber import AmberScorer

    rng = random.Random(1234)
    vocabulary = [f"w{i}" for i in range(12)]
    for _ in range(300):
        relation = {w: rng.sample(vocabulary, rng.randint(0, 3)) for w in vocabulary}
        safe = rng.sample(vocabulary, rng.randint(0, 2))
        close = {frozenset(rng.sample(vocabulary, 2)) for _ in range(6)}

        def similar(a, b, close=close):
            return 1.0 if a == b else (0.9 if frozenset((a, b)) in close else 0.2)

        nouns = [rng.choice(vocabulary) for _ in range(rng.randint(0, 8))]
        truth = [rng.choice(vocabulary) for _ in range(rng.randint(0, 4))]  # repeats happen, as in AMBER's files
        hallu = [rng.choice(vocabulary) for _ in range(rng.randint(0, 4))]
        tools = TextTools(tokenize=str.split, lemmatize=lambda w: w, pos_tag=lambda ws: [(w, "NN") for w in ws])
        judged = AmberScorer(relation, safe, {}, tools, similar).judge(" ".join(nouns), truth, hallu)
        ours = (len(judged["hallucinated"]), len(judged["nouns"]), sum(judged["covered"]), sum(judged["hit"]))
        assert ours == _amber_by_position_lists(nouns, truth, hallu, relation, safe, similar), (nouns, truth, hallu)
