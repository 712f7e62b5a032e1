"""The tiny checkpoints of napo.data.tiny_families: each family builds, saves, reloads through the Auto classes,
renders napo's three prompts (image + question, question only, image only) with its own chat template, runs its
processor on a real PIL image, the forward, generate, answer log-probs, and its LM head is what napo's fused head
computes (a linear map of the backbone's last hidden states, nothing after it)."""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from napo.data.tiny_families import FAMILIES, make_tiny_family_model  # noqa: E402
from napo.logps import fused_linear_sequence_logps, sequence_logps  # noqa: E402
from napo.models.processors import load_processor  # noqa: E402

QUESTION, ANSWER = "What color is the cube?", "The cube is red."

# What each family's real checkpoint renders, from the sources named in napo/data/tiny_families.py (not from the
# tiny templates): prompt with image + question, question only, image only; the suffix an answer turn ends with.
EXPECTED = {
    "qwen2-vl": dict(
        model="Qwen2VLForConditionalGeneration",
        both="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What color is the cube?<|im_end|>\n<|im_start|>assistant\n",
        question="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "What color is the cube?<|im_end|>\n<|im_start|>assistant\n",
        image="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n",
        answer_end="The cube is red.<|im_end|>\n",
        image_keys={"pixel_values", "image_grid_thw", "mm_token_type_ids"},
        tied=True,
        padded_vocab=True,
    ),
    "llava-next": dict(
        model="LlavaNextForConditionalGeneration",
        both="[INST] <image>\nWhat color is the cube? [/INST]",
        question="[INST] What color is the cube? [/INST]",
        image="[INST] <image>\n [/INST]",
        answer_end=" The cube is red.</s> ",
        image_keys={"pixel_values", "image_sizes"},
        tied=False,
        padded_vocab=False,
    ),
    "gemma3": dict(
        model="Gemma3ForConditionalGeneration",
        both="<bos><start_of_turn>user\n<start_of_image>What color is the cube?<end_of_turn>\n<start_of_turn>model\n",
        question="<bos><start_of_turn>user\nWhat color is the cube?<end_of_turn>\n<start_of_turn>model\n",
        image="<bos><start_of_turn>user\n<start_of_image><end_of_turn>\n<start_of_turn>model\n",
        answer_end="The cube is red.<end_of_turn>\n",
        image_keys={"pixel_values", "token_type_ids"},
        tied=True,
        padded_vocab=False,
    ),
    "idefics3": dict(
        model="Idefics3ForConditionalGeneration",
        both="<|begin_of_text|>User:<image>What color is the cube?<end_of_utterance>\nAssistant:",
        question="<|begin_of_text|>User: What color is the cube?<end_of_utterance>\nAssistant:",
        image="<|begin_of_text|>User:<image><end_of_utterance>\nAssistant:",
        answer_end="Assistant: The cube is red.<end_of_utterance>\n",
        image_keys={"pixel_values", "pixel_attention_mask"},
        tied=False,
        padded_vocab=False,
    ),
}
# Qwen2.5-VL renders as Qwen2-VL; its tiny checkpoint leaves the head untied (as Qwen2.5-VL-7B).
EXPECTED["qwen2.5-vl"] = dict(EXPECTED["qwen2-vl"], model="Qwen2_5_VLForConditionalGeneration", tied=False)
assert set(EXPECTED) == set(FAMILIES)


def picture(width: int = 70, height: int = 45) -> Image.Image:
    """A red square on a blue background: an RGB image of a size no family's grid divides evenly."""
    image = Image.new("RGB", (width, height), (20, 40, 200))
    image.paste((220, 30, 30), (width // 4, height // 4, width // 2, height // 2))
    return image


def turn(image: bool, question: bool) -> list[dict]:
    content = ([{"type": "image"}] if image else []) + ([{"type": "text", "text": QUESTION}] if question else [])
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(arch)``: ``(arch, path, processor, model)``, each family built and reloaded once per module."""
    from transformers import AutoModelForImageTextToText

    built: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in built:
            path = make_tiny_family_model(arch, tmp_path_factory.mktemp("families") / arch)
            model = AutoModelForImageTextToText.from_pretrained(path).eval()
            built[arch] = (arch, path, load_processor(path), model)
        return built[arch]

    return get


@pytest.fixture(params=FAMILIES)
def family(request, checkpoint):
    return checkpoint(request.param)


def encode(processor, messages: list[dict], images: list | None, answer: str | None = None):
    """The processor's batch for one prompt (and an answer after it): ``(inputs, answer_length)``. The tokenizer's
    BOS is added only where the template writes none (LLaVA-NeXT's), as generation and napo's collator do."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokenizer = processor.tokenizer
    add_bos = bool(tokenizer.bos_token) and not prompt.startswith(tokenizer.bos_token)
    inputs = processor(images=images, text=[prompt], return_tensors="pt", add_special_tokens=add_bos)
    if answer is None:
        return inputs, 0
    full = processor.apply_chat_template(
        [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False
    )
    assert full.startswith(prompt), (prompt, full)
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False, return_tensors="pt")["input_ids"]
    inputs["input_ids"] = torch.cat((inputs["input_ids"], answer_ids), dim=1)
    inputs["attention_mask"] = torch.cat((inputs["attention_mask"], torch.ones_like(answer_ids)), dim=1)
    for key in ("token_type_ids", "mm_token_type_ids"):  # the answer is text: type 0
        if key in inputs:
            inputs[key] = torch.cat((inputs[key], torch.zeros_like(answer_ids)), dim=1)
    return inputs, answer_ids.shape[1]


def answer_labels(inputs, answer_length: int) -> torch.Tensor:
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -answer_length:] = inputs["input_ids"][:, -answer_length:]
    return labels


def test_checkpoint_is_tiny_saved_whole_and_reloads(family):
    arch, path, processor, model = family
    size = sum(file.stat().st_size for file in path.iterdir())
    assert size < 5_000_000, f"{arch}: {size} bytes"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in path.iterdir()
    }
    assert type(model).__name__ == EXPECTED[arch]["model"]
    assert processor.chat_template, "the chat template travels with the checkpoint"
    # Every special token of the template is one token of the vocabulary, not spelled out in bytes.
    for marker in ("<|im_end|>", "<end_of_turn>", "<end_of_utterance>", "</s>"):
        if marker in EXPECTED[arch]["answer_end"]:
            assert len(processor.tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1


def test_same_seed_same_weights(family, tmp_path):
    from safetensors.torch import load_file

    arch, path, _, _ = family
    first = load_file(path / "model.safetensors")
    again = load_file(make_tiny_family_model(arch, tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(make_tiny_family_model(arch, tmp_path / "other", seed=1) / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("prompt", ["both", "question", "image"])
def test_chat_template_renders_napos_prompts_as_the_real_model(family, prompt):
    arch, _, processor, _ = family
    messages = turn(image=prompt != "question", question=prompt != "image")
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == EXPECTED[arch][prompt]
    full = processor.apply_chat_template(
        [*messages, {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}], tokenize=False
    )
    assert full.endswith(EXPECTED[arch]["answer_end"])


@pytest.mark.parametrize("prompt", ["both", "question", "image"])
def test_processor_forward_generate_and_answer_logps(family, prompt):
    arch, _, processor, model = family
    with_image = prompt != "question"
    messages = turn(image=with_image, question=prompt != "image")
    inputs, answer_length = encode(processor, messages, [picture()] if with_image else None, ANSWER)
    extra = set(inputs) - {"input_ids", "attention_mask"}
    if with_image:
        assert extra == EXPECTED[arch]["image_keys"]
    else:
        assert "pixel_values" not in extra
    with torch.no_grad():
        outputs = model(**inputs, labels=answer_labels(inputs, answer_length))
    vocab = model.get_output_embeddings().weight.shape[0]
    assert outputs.logits.shape == (1, inputs["input_ids"].shape[1], vocab)
    assert torch.isfinite(outputs.logits).all()
    # The answer's log-prob by napo's token kernel (it shifts the labels itself), against the model's own mean
    # cross-entropy over the same tokens.
    logps, avg = sequence_logps(outputs.logits, answer_labels(inputs, answer_length))
    assert torch.allclose(-avg, outputs.loss, atol=1e-5), (avg, outputs.loss)
    assert torch.allclose(logps, avg * answer_length, atol=1e-4)

    prompt_only, _ = encode(processor, messages, [picture()] if with_image else None)
    generated = [
        model.generate(**prompt_only, max_new_tokens=3, do_sample=False)[:, prompt_only["input_ids"].shape[1] :]
        for _ in range(2)
    ]
    assert 1 <= generated[0].shape[1] <= 3
    assert torch.equal(generated[0], generated[1]), "greedy decoding of a fixed model is deterministic"


def test_lm_head_is_a_plain_linear_map_of_the_last_hidden_state(family):
    """What napo's fused head must reproduce: logits = hidden @ W.T, W = get_output_embeddings().weight (tied to the
    input embedding or not, with padded rows or not), hidden = base_model(...).last_hidden_state, and nothing after
    (no soft-capping or scaling)."""
    from napo.train.lm_head import _fused_head_applies, add_napo_lm_head

    arch, _, processor, model = family
    inputs, answer_length = encode(processor, turn(image=True, question=True), [picture()], ANSWER)
    labels = answer_labels(inputs, answer_length)
    head = model.get_output_embeddings()
    assert head is model.lm_head and head.bias is None
    embedding = model.get_input_embeddings().weight
    assert (head.weight.data_ptr() == embedding.data_ptr()) is EXPECTED[arch]["tied"]
    assert (head.weight.shape[0] > len(processor.tokenizer)) is EXPECTED[arch]["padded_vocab"]
    assert model.base_model is model.model
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state
        logits = model(**inputs).logits
        torch.testing.assert_close(logits, hidden @ head.weight.T, rtol=1e-5, atol=1e-5)
        if not EXPECTED[arch]["tied"]:  # the check can fail: the input embedding is not this head
            assert not torch.allclose(logits, hidden @ embedding.T, atol=1e-3)
        expected = sequence_logps(logits, labels)
        fused = fused_linear_sequence_logps(hidden, head.weight, labels)
        for got, want in zip(fused, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # napo's patched forward takes the fused path on every family, and gives the same numbers.
        assert _fused_head_applies(model)
        patched = add_napo_lm_head(copy.deepcopy(model))
        through_napo = patched(**inputs, labels=labels, napo_logps=True)
        torch.testing.assert_close(through_napo.logps, expected[0], rtol=1e-5, atol=1e-5)


def test_rows_batched_with_padding_score_as_alone(family):
    """napo's collator batches rows with different images (and rows without one) left-padded: each row's logits
    at its last position are those it has alone."""
    arch, _, processor, model = family
    rows = [
        (turn(image=True, question=True), [picture()]),
        (turn(image=True, question=True), [picture(30, 90)]),
        (turn(image=False, question=True), []),
    ]
    prompts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in rows]
    add_bos = arch == "llava-next"  # the one template without BOS
    batch = processor(
        images=[images for _, images in rows],
        text=prompts,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=add_bos,
    )
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for row, (messages, images) in enumerate(rows):
            alone, _ = encode(processor, messages, images or None)
            torch.testing.assert_close(batched[row], model(**alone).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_gemma3_vlm_applies_no_logit_softcapping_even_when_its_text_config_sets_one(checkpoint):
    """Gemma3ForConditionalGeneration's forward is lm_head(hidden) whatever text_config.final_logit_softcapping says
    (only the text-only Gemma3ForCausalLM applies it), so a fused head must not apply it either."""
    _, _, processor, model = checkpoint("gemma3")
    capped = copy.deepcopy(model)
    capped.config.get_text_config().final_logit_softcapping = 1.0
    inputs, _ = encode(processor, turn(image=True, question=True), [picture()])
    with torch.no_grad():
        torch.testing.assert_close(capped(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_processors_load_without_torchvision(checkpoint, arch, tmp_path):
    _, path, processor, _ = checkpoint(arch)
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    real = "Qwen2VLProcessor" if arch == "qwen2-vl" else "Qwen2_5_VLProcessor"
    # Saved as the real processor, with its video part, also when a loaded processor is saved again (a trainer's
    # checkpoint): AutoProcessor loads it where torchvision exists.
    processor.save_pretrained(tmp_path)
    for directory in (path, tmp_path):
        saved = json.loads((directory / "processor_config.json").read_text())
        assert saved["processor_class"] == real
        assert saved["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
        assert json.loads((directory / "tokenizer_config.json").read_text())["processor_class"] == real
    assert type(load_processor(tmp_path)) is type(processor)
    if is_torchvision_available():
        assert type(processor).__name__ == real
        return
    with pytest.raises(ImportError, match=r"(?i)torchvision"):
        AutoProcessor.from_pretrained(path)
    assert isinstance(processor, getattr(__import__("transformers"), real))
    assert not hasattr(processor, "video_processor") or processor.video_processor is None


def test_unknown_family_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"qwen2\.5-vl.*idefics3"):
        make_tiny_family_model("llava-2", tmp_path)


def test_napos_collator_batches_every_family_and_the_fused_head_agrees(family):
    """napo's NaPO batch (chosen, rejected and the two biased answers under one full prompt, two rows with images
    of different sizes) runs through each family's forward; napo's fused head gives the log-probs of the model's own
    logits, and each row scores as it does in a batch of its own (the per-image tensors stay with their rows)."""
    from napo.train.collator import NaPOVisionCollator
    from napo.train.lm_head import add_napo_lm_head

    arch, _, processor, model = family
    rows = [
        dict(idx=0, image=picture(), question=QUESTION, chosen=ANSWER, rejected="The cube is blue."),
        dict(idx=1, image=picture(30, 90), question="Is there a dog?", chosen="No.", rejected="Yes, a dog."),
    ]
    for row in rows:
        row.update(question_only="It is green.", image_only="A red square.")
    collator = NaPOVisionCollator(processor, columns=("chosen", "rejected", "question_only", "image_only"))
    patched = add_napo_lm_head(copy.deepcopy(model))

    def score(examples):
        batch = collator(examples)
        assert EXPECTED[arch]["image_keys"] <= set(batch)
        labels = batch["input_ids"].masked_fill(batch.pop("completion_mask") == 0, -100)
        inputs = {k: v for k, v in batch.items() if not k.startswith("ref_")}
        with torch.no_grad():
            own = sequence_logps(model(**inputs).logits, labels)[0]
            fused = patched(**inputs, labels=labels, napo_logps=True).logps
        torch.testing.assert_close(fused, own, rtol=1e-5, atol=1e-5)
        return own

    together = score(rows).reshape(4, 2)  # rows grouped by column: all chosen, then all rejected, ...
    for position, row in enumerate(rows):
        torch.testing.assert_close(together[:, position], score([row]), rtol=1e-4, atol=1e-4)
