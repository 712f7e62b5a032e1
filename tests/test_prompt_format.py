"""The authors' LLaVA-1.5 prompt format (``llava_v1``) in generation, scoring and training: the tokens
match a sequence built by hand from the format's text (LLaVA's ``conv_llava_v1``: system sentence,
``USER: <image>\\n{question} ASSISTANT:``, each answer as `` {answer}</s>``)."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")

from PIL import Image
from transformers import AutoProcessor

from napo.data import make_sample_data, make_tiny_model
from napo.train import NaPOVisionCollator

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_v1")
    model = make_tiny_model(root / "model")
    data = make_sample_data(root / "sample.parquet", rows=4, seed=5)
    return model, data


def rows(data) -> list[dict]:
    frame = pd.read_parquet(data)
    frame["question_only"] = ["a prior answer " + str(i) for i in range(len(frame))]
    return frame.to_dict("records")


def test_collated_tokens_equal_the_hand_built_llava_v1_sequence(tiny):
    model_dir, data = tiny
    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    examples = rows(data)[:2]
    columns = ("chosen", "rejected", "question_only")
    batch = NaPOVisionCollator(processor, columns=columns, prompt_format="llava_v1")(examples)
    for k, column in enumerate(columns):
        for b, example in enumerate(examples):
            image = Image.open(io.BytesIO(example["image"]["bytes"])).convert("RGB")
            prompt = f"{SYSTEM} USER: <image>\n{example['question']} ASSISTANT:"
            prompt_ids = list(processor(text=[prompt], images=[image])["input_ids"][0])
            answer_ids = tokenizer(f" {example[column]}</s>", add_special_tokens=False)["input_ids"]
            row = k * len(examples) + b
            mask = batch["attention_mask"][row].bool()
            got = batch["input_ids"][row][mask].tolist()
            assert got == prompt_ids + answer_ids, (column, b)
            assert got[0] == tokenizer.bos_token_id and got[-1] == tokenizer.eos_token_id  # the </s> is scored
            scored = batch["input_ids"][row][batch["completion_mask"][row].bool()].tolist()
            assert scored == answer_ids


def test_generation_prompts_are_the_llava_v1_text(tiny, tmp_path, monkeypatch):
    import napo.data.generate as generate

    model_dir, data = tiny
    seen: list[str] = []

    def record(model, processor, prompts, images, settings):
        seen.extend(prompts)
        return ["an answer"] * len(prompts)

    monkeypatch.setattr(generate, "generate_answers", record)
    summary = generate.generate_biased(model_dir, data, tmp_path / "out", prompt_format="llava_v1", progress=False,
                                       max_new_tokens=4, num_beams=1, blank_images=True)  # fmt: skip
    assert summary.written == 4
    questions = pd.read_parquet(data)["question"].tolist()
    question_only = {f"{SYSTEM} USER: {q} ASSISTANT:" for q in questions}
    image_only = f"{SYSTEM} USER: <image>\n ASSISTANT:"
    with_blank = {f"{SYSTEM} USER: <image>\n{q} ASSISTANT:" for q in questions}
    assert set(seen) == question_only | {image_only} | with_blank
    assert seen.count(image_only) == 4
    # The same output asked again with the checkpoint's template is another run: refused, not mixed.
    with pytest.raises(ValueError, match="other settings"):
        generate.generate_biased(model_dir, data, tmp_path / "out", progress=False, max_new_tokens=4, num_beams=1,
                                 blank_images=True)  # fmt: skip


def test_the_default_template_is_unchanged_and_bad_formats_are_refused(tiny):
    from napo.data.prompts import check_prompt_format, user_prompt

    model_dir, _ = tiny
    processor = AutoProcessor.from_pretrained(model_dir)
    # The tiny model's template is llava-1.5 HF style: no system sentence.
    assert user_prompt(processor, "template", question="Q?", num_images=1) == "USER: <image>\nQ? ASSISTANT:"
    with pytest.raises(ValueError, match="prompt_format must be one of template, llava_v1"):
        check_prompt_format("vicuna")
    with pytest.raises(ValueError, match="renders RLAIF-V rows"):
        NaPOVisionCollator(processor, prompt_format="llava_v1")(
            [{"prompt": "p", "chosen": "a", "rejected": "b", "image": Image.new("RGB", (8, 8))}]
        )


def test_napo_config_and_text_data_refuse_what_llava_v1_cannot_render(tiny, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    from napo.train.trainer import NaPOConfig, NaPOTrainer

    with pytest.raises(ValueError, match="prompt_format must be one of"):
        NaPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, prompt_format="chatml")
    model_dir, _ = tiny
    processor = AutoProcessor.from_pretrained(model_dir)
    from transformers import AutoConfig

    LlamaForCausalLM(AutoConfig.from_pretrained(model_dir).text_config).save_pretrained(tmp_path / "llama")
    text_model = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    args = NaPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, prompt_format="llava_v1", report_to="none")
    rows = [{"prompt": "Q:", "chosen": " a", "rejected": " b"}] * 4
    with pytest.raises(ValueError, match="this dataset is text only"):
        NaPOTrainer(model=text_model, args=args, train_dataset=Dataset.from_list(rows),
                    processing_class=processor.tokenizer)  # fmt: skip


def test_generation_with_llava_v1_feeds_the_model_llavas_ids(tiny):
    """napo generate / napo eval tokenize llava_v1 prompts as the collator does: BOS by id, image chunks apart."""
    from napo.data.generate import GenerationSettings, generate_answers, load_model
    from napo.data.prompts import tokenize_prompts, user_prompt

    model_dir, data = tiny
    model, processor = load_model(model_dir, device="cpu")
    image = Image.open(io.BytesIO(rows(data)[0]["image"]["bytes"])).convert("RGB")
    prompts = [user_prompt(processor, "llava_v1", question=q, num_images=1) for q in ("What is it?", "Colors?")]
    seen = []
    generate = model.generate

    def record(**inputs):
        seen.append(inputs["input_ids"])
        return generate(**inputs)

    model.generate = record
    settings = GenerationSettings(max_new_tokens=2, num_beams=1, prompt_format="llava_v1")
    assert len(generate_answers(model, processor, prompts, [image, image], settings)) == 2
    expected = tokenize_prompts(processor, prompts, [image, image], "llava_v1")["input_ids"]
    assert torch.equal(seen[0], expected)
    for row in expected:
        assert row[row != processor.tokenizer.pad_token_id][0] == processor.tokenizer.bos_token_id
