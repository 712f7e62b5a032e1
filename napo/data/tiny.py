"""A tiny random LLaVA built offline: the embedded default model for demos and tests.

Tiny CLIP vision tower + tiny Llama, a byte-level BPE tokenizer trained with the `tokenizers`
library on the sample set's grammar, a CLIP image processor constructed by hand and a
llava-1.5-style chat template ("USER: <image>\\n{question} ASSISTANT:"). Everything is saved with
`save_pretrained` so the real loading code (`LlavaForConditionalGeneration.from_pretrained`,
`AutoProcessor.from_pretrained`) is what runs on it. Its answers are random but deterministic.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE, PATCH_SIZE = 32, 8

# llava-1.5's conversation format: images first in a turn, then its text; the assistant turn ends with EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def train_sample_bpe(specials: list[str], vocab_size: int, unk_token: str | None = None):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on the sample set's grammar, ``specials`` first: the
    tokenizer of every tiny checkpoint napo builds (this LLaVA and :mod:`napo.data.tiny_families`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from napo.data.sample import sample_corpus

    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sample_corpus() * 4, trainer)
    return tokenizer


def seeded_model(model_class, config, tokenizer, seed: int):
    """``model_class(config)`` initialised from ``seed`` without touching the caller's random state, its generation
    config given the tokenizer's pad, BOS and EOS ids."""
    import torch

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_class(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_sample_bpe(["<unk>", "<s>", "</s>", "<pad>", "<image>"], vocab_size, unk_token="<unk>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",  # decoder-only generation pads on the left
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor():
    from transformers import LlavaProcessor

    try:  # transformers 5 names the PIL backend explicitly; older releases have one class
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    image_processor = ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def build_model(processor, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    return seeded_model(LlavaForConditionalGeneration, config, tokenizer, seed)


def make_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Builds the tiny LLaVA and its processor and saves both to ``path`` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    model = build_model(processor, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
