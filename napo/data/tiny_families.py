"""Tiny random checkpoints of the vision-language families people align today, built offline.

Like :mod:`napo.data.tiny` (the tiny LLaVA-1.5), each builder makes a random model a few MB large from
a config, a byte-level BPE tokenizer trained with ``tokenizers`` on the sample set's grammar plus the
family's special tokens, the family's PIL image processor and a chat template written in the
structure of the real model's, and saves everything with ``save_pretrained`` so the real loading code
(``AutoModelForImageTextToText.from_pretrained``, ``AutoProcessor.from_pretrained``) is what runs on it.

Families (:data:`FAMILIES`):

- ``qwen2-vl``, ``qwen2.5-vl``: dynamic-resolution patches (``image_grid_thw``), M-RoPE, ChatML turns.
- ``llava-next``: any-resolution tiling (``image_sizes``), Mistral ``[INST]`` turns.
- ``gemma3``: SigLIP + pooled soft tokens, ``token_type_ids``, Gemma turns, tied embeddings.
- ``idefics3``: SmolVLM / Idefics3 image splitting into a grid of crops (``pixel_attention_mask``).

No torchvision: the image processors are the ``*ImageProcessorPil`` classes. Qwen2-VL's and Qwen2.5-VL's
processors take a video processor, which needs torchvision, and ``AutoProcessor`` cannot load them
without it; :func:`napo.models.processors.load_processor` then builds the same processor without the video part
from the same files (:func:`napo.models.processors.image_only_processor_class`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "make_tiny_family_model"]

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "llava-next", "gemma3", "idefics3")

# Text model sizes shared by every family: a few MB of float32 weights.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2

# ---------------------------------------------------------------------------------------------------------------
# Chat templates. Each follows the structure of the real model's template (where the image goes, the system
# prompt, the generation prompt, how a turn ends); the source is named above each.

# Qwen2-VL-2B-Instruct / Qwen2.5-VL-3B-Instruct chat_template.json (the same template for both), as rendered in
# transformers' Qwen2-VL integration tests ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
# <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What ...<|im_end|>\n<|im_start|>assistant\n"):
# a default system turn, each image in place among the text parts, every turn closed by <|im_end|>\n, no BOS.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json: "[INST] " then the turn's images ("<image>\n" each), then
# its text, then " [/INST]"; an answer is " {text}</s> ". No generation prompt (the user turn ends with [/INST]);
# the template writes no BOS: the tokenizer adds <s>.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + eos_token + ' ' }}"
    "{% endif %}"
    "{% endfor %}"
)

# google/gemma-3-4b-it's template, in the form transformers' tests/models/gemma3/test_processing_gemma3.py
# (huggingface/transformers@033522b1258853e6fbb389b1f646aa5361aca958) carries: BOS first, a system message folded
# into the first user turn, "assistant" renamed "model", each image as <start_of_image> in place (the processor
# expands it), text trimmed, every turn closed by <end_of_turn>\n, generation prompt "<start_of_turn>model\n".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# HuggingFaceM4/Idefics3-8B-Llama3 (and SmolVLM), as transformers' tests/models/idefics3/test_processing_idefics3.py
# (huggingface/transformers@000c8eae5ab53d70bc0ee1cbe3600f78b380ed4a) renders it: "<|begin_of_text|>User: What do
# these images show?<image><image><end_of_utterance>\nAssistant: ...<end_of_utterance>\n...Assistant:". The role
# capitalised, then ":" (a turn that starts with an image) or ": ", the parts in order, <end_of_utterance>\n.
IDEFICS3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{{ '<end_of_utterance>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str, add_bos: bool, extra: dict[str, str]):
    """A byte-level BPE trained on the sample set's grammar (as the tiny LLaVA's), with ``specials`` first.

    ``add_bos``: the tokenizer puts ``bos`` before a text when asked for special tokens (Llama / Mistral style);
    otherwise the chat template writes it (Gemma, Idefics3) or there is none (Qwen)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from napo.data.tiny import train_sample_bpe

    tokenizer = train_sample_bpe(specials, 512 + len(specials))
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        padding_side="left",  # decoder-only generation pads on the left
        extra_special_tokens=extra,
    )


def _ids(tokenizer, *tokens: str) -> list[int]:
    """The ids of special ``tokens``, each of which the tiny vocabulary must hold as one token."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    missing = [t for t, i in zip(tokens, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise RuntimeError(f"the tiny tokenizer lacks the special tokens {missing}")
    return ids


def _text_kwargs(tokenizer) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# ---------------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL


def _qwen_processor(arch: str):
    from transformers import Qwen2VLImageProcessorPil

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    # Qwen's tokenizer has no BOS; <|im_end|> ends an answer (the Instruct checkpoints' eos_token), and
    # <|endoftext|> pads.
    tokenizer = _tokenizer(
        specials,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        add_bos=False,
        extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    # 14-pixel patches merged 2x2 into one token, as the real models; images resized to between 2x2 and 4x4
    # tokens (min/max pixels) so that tiny inputs stay tiny.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    from napo.models.processors import image_only_processor_class

    cls = image_only_processor_class("Qwen2VLProcessor" if arch == "qwen2-vl" else "Qwen2_5_VLProcessor")
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_VL_TEMPLATE)


def _qwen_model(arch: str, processor):
    tokenizer = processor.tokenizer
    image_id, video_id, start_id, end_id = _ids(
        tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    text = dict(
        _text_kwargs(tokenizer),
        # Qwen's embedding and LM head have more rows than the tokenizer has tokens (151936 for 151657 in
        # Qwen2-VL): padded to a multiple of 64 here too, so the head's softmax runs over rows no token uses.
        vocab_size=-(-len(tokenizer) // 64) * 64,
        # M-RoPE: the rotary half of each head (head_dim 16 -> 8) split over time, height and width.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    ids = dict(image_token_id=image_id, video_token_id=video_id, vision_start_token_id=start_id)
    ids["vision_end_token_id"] = end_id
    if arch == "qwen2-vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=2, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=14)
        # Qwen2-VL-2B-Instruct ties its embeddings; the tiny one does too.
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
        return Qwen2VLForConditionalGeneration, config
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=HIDDEN,
        patch_size=14,
        window_size=56,
        fullatt_block_indexes=[1],  # window attention in block 0, full attention in block 1
    )
    # Qwen2.5-VL-7B does not tie its embeddings (the 3B does): the tiny one covers the untied Qwen head.
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    return Qwen2_5_VLForConditionalGeneration, config


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT

LLAVA_NEXT_TILE, LLAVA_NEXT_PATCH = 32, 8
# Any-resolution: an image is resized to the best of these (height, width) canvases, cut into 32x32 tiles, and
# the tiles follow a 32x32 overview of the whole image (the real models use 336 tiles and canvases up to 672x672).
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _llava_next_processor():
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = _tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        add_bos=True,
        extra={"image_token": "<image>"},
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": LLAVA_NEXT_TILE},
        crop_size={"height": LLAVA_NEXT_TILE, "width": LLAVA_NEXT_TILE},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_NEXT_PATCH,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_NEXT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def _llava_next_model(processor):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=LLAVA_NEXT_TILE,
        patch_size=LLAVA_NEXT_PATCH,
        projection_dim=32,
    )
    text = MistralConfig(**_text_kwargs(tokenizer), sliding_window=None)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=_ids(tokenizer, "<image>")[0],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,  # llava-v1.6's: the penultimate CLIP layer
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=(LLAVA_NEXT_TILE // LLAVA_NEXT_PATCH) ** 2,
        tie_word_embeddings=False,
    )
    return LlavaNextForConditionalGeneration, config


# ---------------------------------------------------------------------------------------------------------------
# Gemma 3

GEMMA3_IMAGE, GEMMA3_PATCH, GEMMA3_TOKENS = 32, 8, 4  # 4x4 patches average-pooled to 2x2 soft tokens


def _gemma3_processor():
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = _tokenizer(
        [
            *("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            *("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        ],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        add_bos=False,  # the template writes <bos>
        extra={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": GEMMA3_IMAGE, "width": GEMMA3_IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=GEMMA3_TOKENS,
    )


def _gemma3_model(processor):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = processor.tokenizer
    boi, eoi, soft = _ids(tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    text = dict(
        _text_kwargs(tokenizer),
        head_dim=HIDDEN // HEADS,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=HIDDEN // HEADS,
        final_logit_softcapping=None,  # as google/gemma-3-*-it (Gemma 2 soft-capped its logits; Gemma 3 does not)
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=GEMMA3_IMAGE,
        patch_size=GEMMA3_PATCH,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=GEMMA3_TOKENS,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=soft,
        tie_word_embeddings=True,
    )
    return Gemma3ForConditionalGeneration, config


# ---------------------------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM

IDEFICS3_TILE, IDEFICS3_PATCH, IDEFICS3_SCALE = 32, 8, 2  # 4x4 patches, pixel-shuffled by 2: 4 tokens per crop


def _idefics3_processor():
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    grid = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    tokenizer = _tokenizer(
        [
            *("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"),
            *("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"),
            *grid,
        ],
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",  # SmolVLM-Instruct's eos_token: answers end with <end_of_utterance>
        pad="<|finetune_right_pad_id|>",
        add_bos=False,  # the template writes <|begin_of_text|>
        extra={"image_token": "<image>"},
    )
    # An image longer than one crop is resized to at most 64 pixels a side and split into 32x32 crops (a grid
    # of up to 2x2), followed by the whole image resized to one crop (the real models: 364 crops, 1456 a side).
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": 2 * IDEFICS3_TILE},
        max_image_size={"longest_edge": IDEFICS3_TILE},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(IDEFICS3_TILE // IDEFICS3_PATCH) ** 2 // IDEFICS3_SCALE**2,
        chat_template=IDEFICS3_TEMPLATE,
    )


def _idefics3_model(processor):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig

    tokenizer = processor.tokenizer
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IDEFICS3_TILE,
        patch_size=IDEFICS3_PATCH,
    )
    text = LlamaConfig(**_text_kwargs(tokenizer))
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=_ids(tokenizer, "<image>")[0],
        scale_factor=IDEFICS3_SCALE,
        tie_word_embeddings=False,
    )
    return Idefics3ForConditionalGeneration, config


# ---------------------------------------------------------------------------------------------------------------


def _build(arch: str):
    if arch in ("qwen2-vl", "qwen2.5-vl"):
        processor = _qwen_processor(arch)
        return processor, *_qwen_model(arch, processor)
    if arch == "llava-next":
        processor = _llava_next_processor()
        return processor, *_llava_next_model(processor)
    if arch == "gemma3":
        processor = _gemma3_processor()
        return processor, *_gemma3_model(processor)
    processor = _idefics3_processor()
    return processor, *_idefics3_model(processor)


def make_tiny_family_model(arch: str, path: str | Path, seed: int = 0) -> Path:
    """Builds a tiny random checkpoint of the family ``arch`` (one of :data:`FAMILIES`) and saves the model and
    its processor (tokenizer, image processor, chat template) to ``path`` (created if needed). The same
    ``arch`` and ``seed`` give the same weights. Returns ``path``."""
    from napo.data.tiny import seeded_model

    if arch not in FAMILIES:
        raise ValueError(f"unknown model family {arch!r}; choose one of {', '.join(FAMILIES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor, model_class, config = _build(arch)
    model = seeded_model(model_class, config, processor.tokenizer, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
