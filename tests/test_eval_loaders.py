"""Every benchmark loader refuses a field of the wrong type (null, number, list, NaN) with an error naming the
file and the row (issue 23, defect 1: a TypeError traceback from the loader or the scorer before)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("pandas")
pytest.importorskip("PIL")

from test_eval_chair import STUB_TOOLS, amber_dir, objhal_dir, stub_similarity  # noqa: F401
from test_eval_metrics import pope_dir, vlind_dir  # noqa: F401
from test_eval_mmhal import mmhal_dir  # noqa: F401

from napo.eval.benchmark import DataFormatError


def _load(name: str, root: Path):
    from napo.eval.amber import AmberBench
    from napo.eval.mmhal import MMHalBench
    from napo.eval.objhal import ObjectHalBench
    from napo.eval.pope import PopeBench
    from napo.eval.vlind import VLindBench

    makers = {
        "pope": lambda: PopeBench(root),
        "vlind": lambda: VLindBench(root),
        "objhal": lambda: ObjectHalBench(root, tools=STUB_TOOLS),
        "amber": lambda: AmberBench(root, tools=STUB_TOOLS, similarity=stub_similarity),
        "mmhal": lambda: MMHalBench(root, judge=lambda prompt: "Rating: 3"),
    }
    return makers[name]()


# (benchmark, file under its folder, JSON lines?, the row's words in the message, the fields to spoil)
CASES = [
    ("pope", "coco_pope_random.json", True, "line 1", ["text", "image", "label", "question_id"]),
    ("vlind", "data.json", False, "instance 0", ["true_statement", "concept", "aggregated_human_label_good_images"]),
    ("objhal", "questions.jsonl", True, "line 1", ["question", "image_id", "image"]),
    ("amber", "data/query/query_generative.json", False, "entry 0", ["query", "id", "image"]),
    ("amber", "data/annotations.json", False, "item 1", ["truth", "hallu"]),
    ("mmhal", "response_template.json", False, "record 0", ["question", "image_content", "gt_answer", "image_src"]),
]
BAD = {"null": None, "list": [1], "nan": math.nan, "object": {"a": 1}}


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
@pytest.mark.parametrize(("name", "file", "lines", "row", "fields"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_field_of_the_wrong_type_is_refused_naming_file_and_row(request, name, file, lines, row, fields, bad):
    root = request.getfixturevalue(f"{name}_dir")
    path = root / file
    for field in fields:
        text = path.read_text()
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
        spoiled = [dict(r) for r in records]
        spoiled[0][field] = BAD[bad]
        if field == "aggregated_human_label_good_images" and bad in ("nan", "object"):
            spoiled[0][field] = {"0": BAD[bad]}  # a NaN vote, an object for a vote
        path.write_text("\n".join(map(json.dumps, spoiled)) if lines else json.dumps(spoiled))
        try:
            with pytest.raises(DataFormatError) as error:
                _load(name, root)
            assert str(path) in str(error.value) and row in str(error.value) and field in str(error.value), field
        finally:
            path.write_text(text)


@pytest.mark.parametrize(("name", "file"), [("pope", "coco_pope_random.json"), ("objhal", "questions.jsonl")])
def test_a_json_line_that_is_not_an_object_is_refused(request, name, file):
    root = request.getfixturevalue(f"{name}_dir")
    (root / file).write_text("[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"line 1 is not a JSON object"):
        _load(name, root)


def test_an_instance_that_is_not_an_object_is_refused(request):
    root = request.getfixturevalue("vlind_dir")
    (root / "data.json").write_text("[3]")
    with pytest.raises(DataFormatError, match=r"data.json instance 0 is not a JSON object"):
        _load("vlind", root)


def test_pope_labels_other_than_yes_no_count_as_yes_with_one_warning(request):
    root = request.getfixturevalue("pope_dir")
    path = root / "coco_pope_random.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["label"], rows[3]["label"] = "Yes", "maybe"
    path.write_text("\n".join(map(json.dumps, rows)))
    with pytest.warns(UserWarning, match=r"2 label\(s\) are neither 'yes' nor 'no'") as caught:
        bench = _load("pope", root)
    assert len(caught) == 1
    labels = [json.loads(i["meta"])["label"] for i in bench.items() if i["idx"].startswith("random/")]
    assert labels[:4] == ["Yes", "yes", "yes", "maybe"]


@pytest.mark.parametrize("image", ["ABSOLUTE", "../a.jpg", "x/../../a.jpg"])
def test_an_image_path_that_is_absolute_or_climbs_out_is_refused_at_load(request, image):
    """Issue 23: an absolute image path passed the pre-check (the file existed), then failed item by item
    with the wrong reason."""
    root = request.getfixturevalue("pope_dir")
    path = root / "coco_pope_random.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["image"] = str(root / "images" / "a.jpg") if image == "ABSOLUTE" else image
    path.write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(DataFormatError, match=r"line 1: the image path .* must be relative to") as error:
        _load("pope", root)
    assert str(path) in str(error.value) and "--allow-outside-images" in str(error.value)


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_file_that_is_not_utf8_is_refused_naming_it(request, encoding):
    root = request.getfixturevalue("pope_dir")
    path = root / "coco_pope_random.json"
    path.write_bytes(path.read_text().replace("thing", "thïng").encode(encoding))
    with pytest.raises(DataFormatError, match="is not UTF-8 text") as error:
        _load("pope", root)
    assert str(path) in str(error.value)


def test_a_utf8_byte_order_mark_is_read(request):
    root = request.getfixturevalue("pope_dir")
    path = root / "coco_pope_random.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(_load("pope", root).items()) == 8
