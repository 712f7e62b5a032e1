"""The benchmark metrics on tiny hand-made fixtures, every expected value worked out by hand here.

No model and no NLP data are needed: NLTK and spaCy are replaced by small stubs (with one test that
uses the real NLTK when its data is present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("PIL")

from napo.eval.benchmark import DataFormatError, MissingDataError  # noqa: E402
from napo.eval.pope import PopeBench, parse_yes_no, pope_metrics  # noqa: E402
from napo.eval.vlind import InstanceAnswers, VLindBench, parse_true_false, score_instances  # noqa: E402


def _jpeg(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path, format="JPEG")


def _answer(bench, answer_of) -> pd.DataFrame:
    """The benchmark's items with ``answer_of(idx, meta)`` as each answer."""
    frame = pd.DataFrame(bench.items())
    frame["answer"] = [answer_of(i, json.loads(m)) for i, m in zip(frame["idx"], frame["meta"], strict=True)]
    return frame


# ---------------------------------------------------------------- VLind-Bench


@pytest.mark.parametrize(
    ("response", "parsed"),
    [
        ("True", "True"),
        ("False.", "False"),
        ("The statement is true, given the image", "True"),
        ("false\ntrue", "False"),
        ("TRUE!", "NA"),  # "true!" is not exactly "true"
        ("untrue", "NA"),
        ("Yes", "NA"),
        (None, "NA"),
    ],
)
def test_vlind_answer_parsing(response, parsed):
    assert parse_true_false(response) == parsed


VLIND = [
    {"concept": "sun", "context_id": 0, "context": "the sun is purple", "factual_context": "the sun is yellow",
     "true_statement": "The sun is purple.", "false_statement": "The sun is yellow.", "existent_noun": "a sun",
     "non-existent_noun": "a cat", "aggregated_human_label_good_images": {"0": 3, "1": 2, "2": 1}},
    {"concept": "sun", "context_id": 1, "context": "the sun is square", "factual_context": "the sun is round",
     "true_statement": "The sun is square.", "false_statement": "The sun is round.", "existent_noun": "a sun",
     "non-existent_noun": "a dog", "aggregated_human_label_good_images": {"0": 2}},
    {"concept": "tree", "context_id": 0, "context": "trees are blue", "factual_context": "trees are green",
     "true_statement": "The tree is blue.", "false_statement": "The tree is green.", "existent_noun": "a tree",
     "non-existent_noun": "a car", "aggregated_human_label_good_images": {"0": 0, "4": 2, "5": 3}},
]  # fmt: skip

# Per instance: a, b, c pairs and d pairs per good image, as the model answered them.
VLIND_ANSWERS = [
    {"a": ("True", "False"), "b": ("True", "False"), "c": ("True", "False"),
     "d": {"0": ("True", "False"), "1": ("True", "True")}},
    {"a": ("True", "True"), "b": ("True", "False"), "c": ("True", "False"), "d": {"0": ("True", "False")}},
    {"a": ("True", "False"), "b": ("NA", "False"), "c": ("True", "False"),
     "d": {"4": ("True", "False"), "5": ("True", "False")}},
]  # fmt: skip


def _vlind_instances(style_votes=None):
    return [
        InstanceAnswers(i["concept"], i["aggregated_human_label_good_images"], a["a"], a["b"], a["c"], a["d"])
        for i, a in zip(VLIND, VLIND_ANSWERS, strict=True)
    ]


def test_vlind_scores_by_hand():
    metrics, kept = score_instances(_vlind_instances())
    # Good images (>= 2 votes): 2, 1 and 2. a passes: 1st, 3rd. b passes: 1st, 2nd. c (raw) passes: all three;
    # c with a: 1st and 3rd. b and c: 1st only. d shares: 1/2, 1, 1; with b and c: 1/2, 0, 0.
    assert metrics["instances"] == 3 and metrics["images"] == 5
    assert metrics["CK"] == pytest.approx(2 / 3)
    assert metrics["VP"] == pytest.approx(2 / 3)
    assert metrics["CB"] == pytest.approx(2 / 2)
    assert metrics["LP"] == pytest.approx(0.5 / 1)
    assert metrics["LP_micro"] == pytest.approx(1 / 2)  # 1 good image passed of the 2 of b-and-c instances
    assert metrics["c_raw"] == pytest.approx(3 / 3)
    assert metrics["d_raw"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert [k["bc_pass"] for k in kept] == [1, 0, 0]


def test_vlind_vote_filter_and_style():
    # Photorealistic images are ids 0-3: the tree instance (good images 4 and 5) is left out.
    metrics, _ = score_instances(_vlind_instances(), style="photorealistic")
    assert metrics["instances"] == 2 and metrics["CK"] == pytest.approx(1 / 2) and metrics["LP"] == 0.5
    # With 3 votes needed, the second instance (2 votes) has no good image and is left out.
    metrics, _ = score_instances(_vlind_instances(), vote_threshold=3)
    assert metrics["instances"] == 2 and metrics["images"] == 2


@pytest.fixture
def vlind_dir(tmp_path) -> Path:
    root = tmp_path / "vlind"
    root.mkdir()
    (root / "data.json").write_text(json.dumps(VLIND))
    for instance in VLIND:
        where = f"{instance['concept']}/{instance['context_id']}"
        _jpeg(root / f"images/factual/{where}_{instance['factual_context']}/0.jpg")
        for image_id in instance["aggregated_human_label_good_images"]:
            _jpeg(root / f"images/counterfactual/{where}_{instance['context']}/{image_id}.jpg")
    return root


def test_vlind_benchmark_items_and_scoring_from_answers(vlind_dir):
    bench = VLindBench(vlind_dir)
    items = bench.items()
    assert len(items) == (6 + 4) + (6 + 2) + (6 + 4)  # a, b, c pairs + a d pair per good image
    by_idx = {i["idx"]: i for i in items}
    # b and c use the best-voted image (tree: image 5, 3 votes); a the factual image.
    assert by_idx["00002/b1"]["image"] == "images/counterfactual/tree/0_trees are blue/5.jpg"
    assert by_idx["00002/a1"]["image"] == "images/factual/tree/0_trees are green/0.jpg"
    assert by_idx["00000/a1"]["question"] == (
        "Statement: The sun is yellow.\nBased on common sense, is the given statement true or false? "
        "Only respond in True or False."
    )
    assert by_idx["00002/b2"]["question"].startswith("Statement: There is a car in the given image.\n")
    assert by_idx["00002/c1"]["question"].startswith("Context: trees are blue\nStatement: The tree is blue.\n")
    assert bench.decoding.num_beams == 3 and bench.decoding.max_new_tokens == 64

    def answer(idx, meta):
        instance = VLIND_ANSWERS[meta["instance"]]
        part = meta["part"]
        if part.startswith("d"):
            first, second = instance["d"][part.split(":")[1]]
        else:
            first, second = instance[part[0]]
        return (first if part[1] == "1" else second) + "."

    metrics, per_instance = bench.score(_answer(bench, answer))
    expected, _ = score_instances(_vlind_instances())
    assert metrics == pytest.approx(expected) and len(per_instance) == 3


def test_vlind_missing_images_are_listed(vlind_dir):
    (vlind_dir / "images/counterfactual/tree/0_trees are blue/5.jpg").unlink()
    with pytest.raises(MissingDataError) as error:
        VLindBench(vlind_dir)
    assert error.value.missing == [str(vlind_dir / "images/counterfactual/tree/0_trees are blue/5.jpg")]
    (vlind_dir / "data.json").write_text(json.dumps([{"concept": "x"}]))
    with pytest.raises(DataFormatError, match="lacks the field"):
        VLindBench(vlind_dir)


# ---------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a cat", "no"),
        ("Nope", "yes"),  # only the exact words No, no and not say no
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("NO", "yes"),
        ("no, there isn't", "no"),
    ],
)
def test_pope_answer_parsing(answer, parsed):
    assert parse_yes_no(answer) == parsed


@pytest.fixture
def pope_dir(tmp_path) -> Path:
    root = tmp_path / "pope"
    random_rows = [(1, "a.jpg", "yes"), (2, "a.jpg", "yes"), (3, "b.jpg", "yes"), (4, "b.jpg", "no"),
                   (5, "a.jpg", "no"), (6, "b.jpg", "no")]  # fmt: skip
    adversarial = [(1, "a.jpg", "no"), (2, "b.jpg", "yes")]
    for name, rows in (("coco_pope_random.json", random_rows), ("coco_pope_adversarial.json", adversarial)):
        lines = [json.dumps({"question_id": q, "image": image, "text": f"Is there a thing {q}?", "label": label})
                 for q, image, label in rows]  # fmt: skip
        root.mkdir(exist_ok=True)
        (root / name).write_text("\n".join(lines) + "\n")
    _jpeg(root / "images/a.jpg")
    _jpeg(root / "images/b.jpg")
    return root


def test_pope_metrics_by_hand(pope_dir):
    bench = PopeBench(pope_dir)
    random_answers = {1: "Yes, there is a dog.", 2: "No.", 3: "There is not a cat", 4: "Nope", 5: "no",
                      6: "No, there isn't. Yes really."}  # fmt: skip
    adversarial_answers = {1: "No", 2: "Yes"}

    def answer(idx, meta):
        number = int(idx.split("/")[1])
        return (random_answers if meta["category"] == "random" else adversarial_answers)[number]

    frame = _answer(bench, answer)
    assert frame["question"].iloc[0].endswith("?\nAnswer the question using a single word or phrase.")
    metrics, per_item = bench.score(frame)
    # random: predictions yes, no, no, yes, no, no against yes, yes, yes, no, no, no: TP 1, FN 2, FP 1, TN 2.
    assert metrics["random_accuracy"] == pytest.approx(3 / 6)
    assert metrics["random_precision"] == pytest.approx(1 / 2)
    assert metrics["random_recall"] == pytest.approx(1 / 3)
    assert metrics["random_F1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert metrics["random_yes_ratio"] == pytest.approx(2 / 6)
    assert metrics["adversarial_accuracy"] == 1.0
    # all 8: TP 2, FN 2, FP 1, TN 3.
    assert metrics["accuracy"] == pytest.approx(5 / 8) and metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 4) and metrics["F1"] == pytest.approx(4 / 7)
    assert metrics["yes_ratio"] == pytest.approx(3 / 8) and metrics["items"] == 8
    assert len(per_item) == 8


def test_pope_zero_denominators_give_zero_and_missing_images_are_listed(pope_dir):
    assert pope_metrics(["no", "no"], ["no", "no"])["precision"] == 0.0
    (pope_dir / "images/b.jpg").unlink()
    with pytest.raises(MissingDataError) as error:
        PopeBench(pope_dir)
    assert error.value.missing == [str(pope_dir / "images/b.jpg")]
