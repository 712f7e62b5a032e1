"""Prompt formats: how a question, its image placeholders and an answer become the text a model sees.

``template`` (the default) is the checkpoint's own chat template (``processor.apply_chat_template``).
``llava_v1`` is the original LLaVA-1.5 conversation format the NaPO authors generated and scored
every answer with (zhangzef/NaPO: ``--conv-mode llava_v1`` in ``muffin/eval/llava15_gen_bias_data.py``;
the format itself is LLaVA's ``conv_llava_v1``, separator style "two"): a system sentence, then
``USER: <image>\\n{question} ASSISTANT:``, and each answer as `` {answer}</s>``, the end-of-sequence
token scored with it. HF llava-1.5 checkpoints carry a template without the system sentence, so a
reproduction that must see the authors' tokens selects ``llava_v1`` in ``napo generate``,
``napo logps``, ``napo train`` and ``NaPOConfig(prompt_format=...)`` alike.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLAVA_V1_SYSTEM", "PROMPT_FORMATS", "answer_text", "check_prompt_format", "user_prompt"]

PROMPT_FORMATS = ("template", "llava_v1")

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def check_prompt_format(prompt_format: Any) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    return prompt_format


def _image_token(processor: Any) -> str:
    token = getattr(processor, "image_token", None) or getattr(processor.tokenizer, "image_token", None)
    if not token:
        raise ValueError("prompt_format='llava_v1' needs a processor with an image token (a LLaVA-family processor)")
    return token


def user_prompt(processor: Any, prompt_format: str, *, question: str | None, num_images: int) -> str:
    """The prompt up to where the answer starts: one user turn of ``num_images`` images then ``question``
    (either may be absent: the biased prompts), ending with the generation prompt."""
    if check_prompt_format(prompt_format) == "llava_v1":
        images = (_image_token(processor) + "\n") * num_images
        return f"{LLAVA_V1_SYSTEM} USER: {images}{question or ''} ASSISTANT:"
    content: list[dict] = [{"type": "image"}] * num_images
    if question is not None:
        content = [*content, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def answer_text(processor: Any, answer: str) -> str:
    """An answer as ``llava_v1`` scores it after :func:`user_prompt`: a space, the answer, end of sequence."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return f" {answer}{tokenizer.eos_token}"
