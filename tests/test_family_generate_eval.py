"""napo make-tiny-model --arch, napo generate and napo eval on every family of napo.data.tiny_families: the biased
answers through each model's own chat template and processor (what the model is given is captured at
``model.generate``), mixed image sizes in one batch, one BOS, and ``llava_v1`` refused on every non-LLaVA-1.5
family before any row runs."""

from __future__ import annotations

import copy
import io
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

from test_eval_metrics import pope_dir  # noqa: E402, F401  (the fixture: a tiny POPE folder under tmp_path)

from napo.cli import main  # noqa: E402
from napo.data import generate_biased, load_model, make_sample_data  # noqa: E402
from napo.data.generate import GenerationSettings, generate_answers  # noqa: E402
from napo.data.prompts import check_prompt_format_for, user_prompt  # noqa: E402
from napo.data.tiny_families import FAMILIES  # noqa: E402

SHORT = {"max_new_tokens": 2, "num_beams": 1, "progress": False}

# Per family, from the real models' processors and templates (transformers' docs and the checkpoints' configs, as
# napo/data/tiny_families.py cites them): the model class, the family's name in napo's messages, the tokens that
# mark or stand for an image in the prompt, the one each image's positions hold, and the per-image tensors its
# processor gives beside pixel_values.
FAMILY = {
    "qwen2-vl": dict(
        model="Qwen2VLForConditionalGeneration",
        name="Qwen2-VL",
        image_tokens=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
        image_token="<|image_pad|>",
        per_image="image_grid_thw",
    ),
    "qwen2.5-vl": dict(
        model="Qwen2_5_VLForConditionalGeneration",
        name="Qwen2.5-VL",
        image_tokens=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
        image_token="<|image_pad|>",
        per_image="image_grid_thw",
    ),
    "llava-next": dict(
        model="LlavaNextForConditionalGeneration",
        name="LLaVA-NeXT",
        image_tokens=("<image>",),
        image_token="<image>",
        per_image="image_sizes",
    ),
    "gemma3": dict(
        model="Gemma3ForConditionalGeneration",
        name="Gemma 3",
        image_tokens=("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
        image_token="<image_soft_token>",
        per_image="token_type_ids",
    ),
    "idefics3": dict(
        model="Idefics3ForConditionalGeneration",
        name="Idefics3",
        image_tokens=("<fake_token_around_image>", "<image>", "<global-img>"),
        image_token="<image>",
        per_image="pixel_attention_mask",
    ),
}
assert set(FAMILY) == set(FAMILIES)

# The sample set's rows get images of four sizes (width, height): one batch mixes sizes and aspect ratios.
SIZES = [(64, 64), (96, 40), (40, 88), (120, 90)]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Four rows of napo's sample set, their images resized to :data:`SIZES`."""
    root = tmp_path_factory.mktemp("sample")
    table = pq.read_table(make_sample_data(root / "plain.parquet", rows=len(SIZES), seed=0))
    rows = table.to_pylist()
    for row, size in zip(rows, SIZES, strict=True):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize(size).save(buffer, format="PNG")
        row["image"] = {"bytes": buffer.getvalue(), "path": None}
    path = root / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(arch)``: ``(path, model, processor)``, written once per module by ``napo make-tiny-model --arch``
    and loaded by napo's load_model."""
    built: dict = {}

    def get(arch: str):
        if arch not in built:
            path = tmp_path_factory.mktemp("models") / arch
            assert main(["make-tiny-model", str(path), "--arch", arch]) == 0
            built[arch] = (path, *load_model(path, device="cpu"))
        return built[arch]

    return get


@pytest.fixture(params=FAMILIES)
def family(request, checkpoint):
    return request.param, *checkpoint(request.param)


class Recorder:
    """Wraps ``model.generate`` (through monkeypatch) and keeps the inputs of every call."""

    def __init__(self, model, monkeypatch):
        self.calls: list[dict] = []
        original = model.generate

        def generate(**inputs):
            self.calls.append({k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            return original(**inputs)

        monkeypatch.setattr(model, "generate", generate)


def prompt_rows(call: dict) -> list[list[int]]:
    """Each prompt's ids without the left padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(call["input_ids"], call["attention_mask"], strict=True)]


def marker_ids(processor, arch: str) -> set[int]:
    ids = processor.tokenizer.convert_tokens_to_ids(list(FAMILY[arch]["image_tokens"]))
    assert None not in ids and processor.tokenizer.unk_token_id not in ids
    return set(ids)


# ---------------------------------------------------------------- make-tiny-model --arch


def test_make_tiny_model_arch_writes_each_family(family):
    arch, path, model, processor = family  # written through the CLI by the fixture
    assert type(model).__name__ == FAMILY[arch]["model"]
    assert (path / "chat_template.jinja").is_file()
    assert processor.chat_template


def test_make_tiny_model_default_is_llava_and_pretrain_needs_it(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "llava")]) == 0
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["model_type"] == "llava"
    with pytest.raises(SystemExit) as info:
        main(["make-tiny-model", str(tmp_path / "g"), "--arch", "gemma3", "--pretrain"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--pretrain" in err and "--arch llava" in err, err
    assert not (tmp_path / "g").exists()
    with pytest.raises(SystemExit) as info:
        main(["make-tiny-model", str(tmp_path / "x"), "--arch", "llava-2"])
    assert info.value.code == 2 and "qwen2.5-vl" in capsys.readouterr().err


# ---------------------------------------------------------------- generate


def test_generate_gives_each_family_the_biased_prompts(family, sample, tmp_path, monkeypatch):
    """question_only: the question through the template, no image and no image token; image_only: the image (every
    row's own size, its per-image tensors with it) and none of the question; the blank-image columns: both."""
    arch, path, model, processor = family
    recorder = Recorder(model, monkeypatch)
    options = dict(batch_size=len(SIZES), loaded=(model, processor), blank_images=True)
    summary = generate_biased(path, sample, tmp_path / "out", **options, **SHORT)
    assert (summary.written, summary.failed) == (len(SIZES), 0)
    written = pq.read_table(tmp_path / "out").to_pylist()
    columns = ("question_only", "image_only", "question_only_white", "question_only_black")
    assert all(isinstance(row[c], str) for row in written for c in columns)

    assert len(recorder.calls) == len(columns)  # one batch per column
    question_call, image_call, *blank_calls = recorder.calls
    rows = {row["idx"]: row for row in pq.read_table(sample).to_pylist()}
    markers = marker_ids(processor, arch)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(FAMILY[arch]["image_token"])

    assert not {"pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask"} & set(question_call)
    questions = sorted(row["question"] for row in rows.values())
    seen = []
    for ids in prompt_rows(question_call):
        assert not markers & set(ids), f"{arch}: an image token in a question-only prompt"
        text = tokenizer.decode(ids, skip_special_tokens=False)
        seen.append(next(q for q in questions if q in text))
    assert sorted(seen) == questions

    assert image_call["pixel_values"].shape[0] >= len(SIZES)
    assert FAMILY[arch]["per_image"] in image_call
    for ids in prompt_rows(image_call):
        assert image_id in ids, f"{arch}: no image token in an image-only prompt"
        text = tokenizer.decode(ids, skip_special_tokens=False)
        assert not any(q in text for q in questions), f"{arch}: the question in an image-only prompt: {text!r}"
    # The per-image tensors are each row's own: the image sizes differ, so do they.
    if "image_sizes" in image_call:
        assert sorted(map(tuple, image_call["image_sizes"].tolist())) == sorted((h, w) for w, h in SIZES)
    if "image_grid_thw" in image_call:
        assert len({tuple(g) for g in image_call["image_grid_thw"].tolist()}) == len(SIZES)
    if arch == "gemma3":  # each image becomes the same count of soft tokens, typed 1
        types = image_call["token_type_ids"]
        assert torch.equal(types.bool(), image_call["input_ids"] == image_id)
    for call in blank_calls:  # the question with a white or black image of the row's size
        assert "pixel_values" in call
        texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_rows(call)]
        assert all(image_id in ids for ids in prompt_rows(call))
        assert sorted(next(q for q in questions if q in text) for text in texts) == questions


def test_each_row_answers_as_it_does_alone(family, sample, tmp_path):
    """Left padding and mixed image sizes in one batch change no answer: the per-image tensors stay with their rows."""
    _, path, model, processor = family
    answers = {}
    for batch_size in (len(SIZES), 1):
        out = tmp_path / f"batch{batch_size}"
        generate_biased(
            path, sample, out, batch_size=batch_size, loaded=(model, processor), **{**SHORT, "max_new_tokens": 3}
        )
        answers[batch_size] = sorted(
            (row["idx"], row["question_only"], row["image_only"]) for row in pq.read_table(out).to_pylist()
        )
    assert answers[len(SIZES)] == answers[1]


@pytest.mark.parametrize("arch", ["gemma3", "idefics3"])
def test_one_bos_when_the_tokenizer_adds_one_and_the_template_writes_it(checkpoint, arch, monkeypatch):
    """The released Gemma 3 and Idefics3 (Llama 3) tokenizers put BOS before a text (add_bos_token; ollama/ollama#15252
    notes Gemma 4 was the first Gemma to turn it off) and their chat templates write it as well: the prompt napo
    generates from starts with one BOS, not two (before, the processor was called with its default special tokens)."""
    from tokenizers import processors

    _, model, processor = checkpoint(arch)
    processor = copy.deepcopy(processor)
    tokenizer = processor.tokenizer
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    assert tokenizer("a")["input_ids"][0] == bos_id  # the tokenizer now adds BOS, as the released one
    recorder = Recorder(model, monkeypatch)
    settings = GenerationSettings(max_new_tokens=1, num_beams=1)
    image = Image.new("RGB", (50, 30), (200, 20, 20))
    for question, images in (("What color is it?", None), (None, [image])):
        prompt = user_prompt(processor, "template", question=question, num_images=0 if images is None else 1)
        assert prompt.startswith(bos)
        generate_answers(model, processor, [prompt], images, settings)
        (ids,) = prompt_rows(recorder.calls[-1])
        assert ids[0] == bos_id and ids.count(bos_id) == 1, ids[:4]


# ---------------------------------------------------------------- eval


def test_eval_answers_and_scores_each_family(family, pope_dir, tmp_path):  # noqa: F811
    from napo.eval import read_answers

    _, path, _, _ = family
    argv = ["eval", "--model", str(path), "--benchmark", "shapes,pope", "--data-dir", str(pope_dir.parent),
            "--shapes-scenarios", "2", "--output", str(tmp_path / "eval"), "--max-new-tokens", "2",
            "--num-beams", "1", "--batch-size", "8", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "shapes" in report and "pope" in report and path.name in report
    for benchmark, items in (("shapes", 2 * 13), ("pope", 8)):
        answers = read_answers(tmp_path / "eval" / "answers" / path.name / benchmark)
        assert len(answers.frame) == items and not answers.errors, (benchmark, answers.errors)
        assert answers.frame["answer"].map(type).eq(str).all()
        metrics = json.loads((tmp_path / "eval" / benchmark / "metrics.json").read_text())
        assert path.name in json.dumps(metrics)


# ---------------------------------------------------------------- llava_v1 on another family


def test_llava_v1_is_refused_on_every_other_family_by_the_function(family):
    """What every stage calls (napo logps and train through their collator: user_prompt, tokenize_prompts)."""
    from napo.data.prompts import tokenize_prompts
    from napo.train.collator import NaPOVisionCollator

    arch, _, _, processor = family
    message = rf"{FAMILY[arch]['name']}.*--prompt-format template"
    assert check_prompt_format_for(processor, "template") == "template"
    with pytest.raises(ValueError, match=message):
        check_prompt_format_for(processor, "llava_v1")
    with pytest.raises(ValueError, match=message):
        user_prompt(processor, "llava_v1", question="What is it?", num_images=1)
    with pytest.raises(ValueError, match=message):
        tokenize_prompts(processor, ["What is it?"], None, "llava_v1")
    row = dict(idx=0, image=Image.new("RGB", (40, 40)), question="What is it?", chosen="A cube.", rejected="A dog.")
    with pytest.raises(ValueError, match=message):
        NaPOVisionCollator(processor, columns=("chosen", "rejected"), prompt_format="llava_v1")([row])


def test_llava_v1_stays_allowed_on_llava_15(tmp_path):
    from napo.data import make_tiny_model
    from napo.models.processors import load_processor

    processor = load_processor(make_tiny_model(tmp_path / "llava"))
    assert check_prompt_format_for(processor, "llava_v1") == "llava_v1"
    assert "USER: " in user_prompt(processor, "llava_v1", question="What is it?", num_images=1)


@pytest.mark.parametrize("command", ["generate", "logps", "train", "eval"])
def test_llava_v1_on_another_family_exits_2_before_any_row(checkpoint, sample, command, tmp_path, capsys):
    """Every stage's command refuses it before its first row (with default decoding a generate or eval that ran
    anyway would take minutes: 1024 new tokens, 3 beams)."""
    arch = "qwen2.5-vl"
    path, _, _ = checkpoint(arch)
    out = tmp_path / "out"
    if command == "eval":
        argv = ["eval", "--model", str(path), "--benchmark", "shapes", "--shapes-scenarios", "1", "--output", str(out)]
    else:
        argv = [command, "--model", str(path), "--data", str(sample), "--output", str(out)]
    assert main([*argv, "--prompt-format", "llava_v1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"napo {command}: error:" in err and FAMILY[arch]["name"] in err and "--prompt-format template" in err, err
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("*.json")), "a row ran, or a run was recorded"
