"""Batches of K completions per prompt: chosen, rejected and the biased answers, in one forward.

A DPO batch stacks ``[chosen; rejected]``; a NaPO batch stacks ``[chosen; rejected; question_only;
image_only]`` (any ``columns``), every completion under the same full prompt (image and question).
The layout is TRL's (prompt left-padded with its images, completions right-padded, then flushed
left so no row starts with padding), so with ``columns=("chosen", "rejected")`` these collators
give what TRL's ``DataCollatorForVisionPreference`` / ``DataCollatorForPreference`` give, but for
two things: an answer the template ends with the tokenizer's end-of-sequence token and whitespace
(LLaVA's ``</s> ``, Qwen-VL's ``<|im_end|>\n``, Idefics3's ``<end_of_utterance>\n``) ends at that
token, where generation stops; and a template that writes no BOS (LLaVA, LLaVA-NeXT) gets the
tokenizer's, as the processor adds it at inference (tests/test_trl_vlm_harness.py compares them).
The same collator drives ``napo logps`` and training, so cached reference log-probs are computed
on exactly the sequences the policy sees.

Example rows are accepted in three shapes:

- RLAIF-V(-Bias) rows: ``image`` (PIL, ``{"bytes", "path"}`` or bytes) and ``question``; the
  prompt is the model's chat template on the image and the question, each answer an assistant turn.
- TRL conversational rows: ``prompt`` and completions as lists of chat messages (``image`` /
  ``images`` optional).
- TRL standard rows: ``prompt`` and completions as plain strings, used as they are.

Reference log-probs travel with the rows as ``ref_<column>_logps`` and ``ref_<column>_avg_logps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from napo.data.prompts import (
    answer_text,
    check_prompt_format,
    llava_v1_answer_ids,
    llava_v1_unsupervised,
    tokenize_prompts,
    user_prompt,
)

__all__ = [
    "NaPOTextCollator",
    "NaPOVisionCollator",
    "flush_left",
    "reference_columns",
    "render_completions",
]


def reference_columns(column: str) -> tuple[str, str]:
    """The names of the cached reference log-prob columns of one completion column."""
    return f"ref_{column}_logps", f"ref_{column}_avg_logps"


def flush_left(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rolls each row left until its first nonzero ``mask`` entry is in column 0, then drops the
    trailing columns that are zero in every row. Returns ``(mask, *tensors)`` rolled alike."""
    width = mask.shape[1]
    shift = mask.argmax(dim=1, keepdim=True)
    index = (torch.arange(width, device=mask.device).unsqueeze(0) + shift) % width
    rolled = [mask.gather(1, index), *(t.gather(1, index) for t in tensors)]
    used = rolled[0].sum(dim=0) != 0
    keep = int(used.nonzero().max()) + 1 if bool(used.any()) else 0
    return tuple(t[:, :keep] for t in rolled)


def _pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def _reference_tensors(examples: list[dict[str, Any]], columns: Sequence[str]) -> dict[str, torch.Tensor]:
    """The cached reference columns, as float32 [B] tensors: those no example has are left out (the reference
    model scores them); a value that is null, NaN or infinite in some example is an error naming it (a null
    column would otherwise read as absent, and a non-finite one trains with a NaN weight and a 0 loss)."""
    out: dict[str, torch.Tensor] = {}
    for column in columns:
        for name in reference_columns(column):
            values = [example.get(name) for example in examples]
            if all(value is None for value in values):
                continue
            bad = [
                example.get("idx", position)
                for position, (example, value) in enumerate(zip(examples, values, strict=True))
                if not isinstance(value, (int, float)) or not math.isfinite(value)
            ]
            if bad:
                raise ValueError(
                    f"the cached reference log-prob {name!r} is null, NaN or infinite in the rows idx="
                    f"{', '.join(map(str, bad[:5]))}; score them again (napo logps --overwrite) or drop those rows"
                )
            out[name] = torch.tensor([float(value) for value in values], dtype=torch.float32)
    return out


def _as_messages(value: Any, role: str, column: str) -> list[dict[str, Any]]:
    """A completion or prompt as structured chat messages (string contents become text parts)."""
    if isinstance(value, str):
        return [{"role": role, "content": [{"type": "text", "text": value}]}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise TypeError(f"column {column!r} must hold a string or a list of chat messages, got {type(value).__name__}")
    messages = []
    for message in value:
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        messages.append({**message, "content": content})
    return messages


def _with_image_slots(messages: list[dict[str, Any]], num_images: int) -> list[dict[str, Any]]:
    """Puts one image part per image at the start of the first user turn, unless the messages place them."""
    placed = sum(1 for m in messages for part in m["content"] if part.get("type") == "image")
    if placed or not num_images:
        return messages
    out = [dict(m) for m in messages]
    for message in out:
        if message["role"] == "user":
            message["content"] = [{"type": "image"}] * num_images + list(message["content"])
            break
    return out


def _common_prefix(texts: Sequence[str]) -> str:
    first = texts[0]
    length = len(first)
    for text in texts[1:]:
        length = min(length, len(text))
        for i in range(length):
            if first[i] != text[i]:
                length = i
                break
    return first[:length]


def render_completions(
    example: dict[str, Any],
    columns: Sequence[str],
    processing_class: Any,
    num_images: int = 0,
    prompt_format: str = "template",
) -> tuple[str, list[str]]:
    """``(prompt, [completion per column])`` as text, rendered with the chat template where the row is
    conversational (or RLAIF-V, whose ``question`` becomes the user turn). As in TRL, the prompt is the
    longest common prefix of the rendered prompt and every rendered prompt + completion. With
    ``prompt_format="llava_v1"`` (RLAIF-V rows only) the authors' LLaVA-1.5 format instead: see
    :mod:`napo.data.prompts`."""
    if "prompt" not in example and "question" not in example:
        raise KeyError("each example needs a 'prompt' (TRL format) or a 'question' (RLAIF-V format)")
    for column in columns:
        if example.get(column) is None:
            raise ValueError(f"column {column!r} is missing or null in an example (idx={example.get('idx', '?')})")
    if check_prompt_format(prompt_format) != "template":
        if "prompt" in example or not isinstance(example.get("question"), str) or not example["question"].strip():
            raise ValueError(
                f"prompt_format={prompt_format!r} renders RLAIF-V rows (a non-empty 'question' and an image), not "
                f"TRL 'prompt' rows (idx={example.get('idx', '?')}); use prompt_format='template' for those"
            )
        for column in columns:
            if not isinstance(example[column], str):
                raise TypeError(f"column {column!r} must hold strings, got {type(example[column]).__name__}")
        # As text; the collator tokenizes it as LLaVA does (llava_v1_prompt_ids: the tokenizer's BOS first).
        prompt = user_prompt(processing_class, prompt_format, question=example["question"], num_images=num_images)
        return prompt, [answer_text(processing_class, example[column]) for column in columns]
    if "prompt" in example and isinstance(example["prompt"], str):
        for column in columns:
            if not isinstance(example[column], str):
                raise TypeError(
                    f"column {column!r} must hold strings when 'prompt' does, got {type(example[column]).__name__}"
                )
        return example["prompt"], [example[column] for column in columns]
    if "prompt" in example:
        prompt = _as_messages(example["prompt"], "user", "prompt")
    else:
        question = example["question"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"empty question (idx={example.get('idx', '?')})")
        prompt = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    prompt = _with_image_slots(prompt, num_images)
    continue_final = prompt[-1]["role"] == "assistant"
    prompt_text = processing_class.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=not continue_final, continue_final_message=continue_final
    )
    full = [
        processing_class.apply_chat_template(prompt + _as_messages(example[c], "assistant", c), tokenize=False)
        for c in columns
    ]
    prefix = _common_prefix([prompt_text, *full])
    eos = getattr(getattr(processing_class, "tokenizer", processing_class), "eos_token", None)
    return prefix, [
        _ends_with_eos(text[len(prefix) :], _plain_answer(example[c]), eos)
        for c, text in zip(columns, full, strict=True)
    ]


def _plain_answer(value: Any) -> str | None:
    """The answer's text when the completion is one plain text (an RLAIF-V answer, or one assistant message
    with one text part), else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        content = value[0].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list) and len(content) == 1 and content[0].get("type") == "text":
            return content[0].get("text")
    return None


def _ends_with_eos(completion: str, answer: str | None, eos: str | None) -> str:
    """A rendered completion that ends where the model learned answers end: with the end-of-sequence token.

    llava-hf's LLaVA-1.5 template writes each answer followed by a space and no ``</s>``; scored as it is,
    every answer's last supervised token is a ``▁`` the model never saw there, and the ``</s>`` it did see is
    missing. When what the template writes after the answer is only whitespace, or the end-of-sequence token
    and whitespace, the completion becomes the answer then ``eos``. Other templates' end-of-turn markers
    (``<|im_end|>``, ``<end_of_turn>``...) are kept as they are."""
    if not eos or not answer or answer not in completion:
        return completion
    end = completion.rindex(answer) + len(answer)
    suffix = completion[end:].strip()
    if suffix in ("", eos):
        return completion[:end] + eos
    return completion


def _images_of(example: dict[str, Any]) -> list:
    from napo.data.store import RowError
    from napo.images import rgb_image
    from napo.models.loading import decode_image

    raw = example.get("images")
    if raw is None:
        raw = [] if example.get("image") is None else [example["image"]]
    images = []
    for value in raw:
        if hasattr(value, "convert") and hasattr(value, "size"):  # already a PIL image: the same decoding rules
            images.append(rgb_image(value))
            continue
        try:
            images.append(decode_image(value))
        except RowError as error:
            raise ValueError(f"example idx={example.get('idx', '?')}: {error}") from error
    return images


@dataclass
class NaPOVisionCollator:
    """Tokenizes and batches on the fly (images are too costly to preprocess up front), as TRL does.

    Args:
        processor: the model's ``ProcessorMixin`` (tokenizer + image processor).
        columns: the completion columns, in batch order; ``("chosen", "rejected")`` is TRL's DPO batch.
        max_length: truncate every sequence (prompt + completion) to this many tokens.
        prompt_format: ``template`` (the processor's chat template) or ``llava_v1`` (:mod:`napo.data.prompts`).

    Returns a dict with ``input_ids``, ``attention_mask``, ``completion_mask`` (``[K*B, T]``, rows grouped
    by column: all chosen, then all rejected, ...), the processor's image tensors (``pixel_values`` ...,
    images repeated K times) and the cached ``ref_<column>_logps`` / ``_avg_logps`` ``[B]`` when every row has them.
    """

    processor: Any
    columns: Sequence[str] = ("chosen", "rejected")
    max_length: int | None = None
    prompt_format: str = "template"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        columns = tuple(self.columns)
        images = [_images_of(example) for example in examples]
        rendered = [
            render_completions(example, columns, self.processor, len(pictures), self.prompt_format)
            for example, pictures in zip(examples, images, strict=True)
        ]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._check_rows(examples, images, rendered, tokenizer)
        repeats = len(columns)
        prompts = [prompt for prompt, _ in rendered] * repeats
        completions = [texts[k] for k in range(repeats) for _, texts in rendered]
        all_images = images * repeats
        has_images = any(all_images)
        # Without special tokens: the chat template already wrote BOS; llava_v1 puts the tokenizer's BOS.
        processed = tokenize_prompts(self.processor, prompts, all_images if has_images else None, self.prompt_format)
        if self.prompt_format == "llava_v1":
            answers = [example[column] for column in columns for example in examples]
            completion_ids = [llava_v1_answer_ids(self.processor, answer) for answer in answers]
        else:
            completion_ids = tokenizer(text=completions, add_special_tokens=False)["input_ids"]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        completion = _pad_right(completion_ids, pad_id)
        completion_attention = _pad_right([[1] * len(ids) for ids in completion_ids], 0)
        prompt_attention = processed["attention_mask"]
        input_ids = torch.cat((processed["input_ids"], completion), dim=1)
        attention_mask = torch.cat((prompt_attention, completion_attention), dim=1)
        completion_mask = torch.cat((torch.zeros_like(prompt_attention), completion_attention), dim=1)
        # Gemma / Qwen-VL per-token types: the completions are plain text (type 0).
        extra = {
            key: torch.cat((processed[key], torch.zeros_like(completion)), dim=1)
            for key in ("token_type_ids", "mm_token_type_ids")
            if key in processed
        }
        names = list(extra)
        attention_mask, input_ids, completion_mask, *typed = flush_left(
            attention_mask, input_ids, completion_mask, *extra.values()
        )
        extra = dict(zip(names, typed, strict=True))
        if self.max_length is not None:
            input_ids, attention_mask, completion_mask = (
                t[:, : self.max_length] for t in (input_ids, attention_mask, completion_mask)
            )
            extra = {k: v[:, : self.max_length] for k, v in extra.items()}
        output = dict(processed)
        output.update(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask, **extra)
        output.update(_reference_tensors(examples, columns))
        return output

    def _check_rows(self, examples: list[dict], images: list[list], rendered: list, tokenizer: Any) -> None:
        """Refuses, naming the rows, what would train on something else than the row says: an image token
        written as text (one more image position than the row has images: the model's forward fails, or
        worse), and under ``llava_v1`` the rows the authors' ``preprocess_v1`` supervises none of."""
        image_token = getattr(self.processor, "image_token", None) or getattr(tokenizer, "image_token", None)
        refused: list[str] = []
        for example, pictures, (prompt, texts) in zip(examples, images, rendered, strict=True):
            where = f"idx={example.get('idx', '?')}"
            if image_token and (prompt.count(image_token) > len(pictures) or any(image_token in t for t in texts)):
                refused.append(f"{where}: a literal {image_token!r} in its text")
                continue
            if self.prompt_format == "llava_v1":
                for column in self.columns:
                    reason = llava_v1_unsupervised(example["question"], example[column], tokenizer.eos_token or "")
                    if reason:
                        refused.append(f"{where}, column {column!r}: {reason}")
                        break
        if refused:
            raise ValueError(
                f"{len(refused)} of {len(examples)} rows in this batch cannot be trained on as they are "
                f"({'; '.join(refused[:5])}{'; ...' if len(refused) > 5 else ''}). LLaVA's preprocess_v1 "
                "supervises none of such a row; remove or fix these rows in the data (napo refuses them rather "
                "than score a different sequence)"
            )


@dataclass
class NaPOTextCollator:
    """Batches pre-tokenized text rows (``prompt_ids`` and one ``<column>_ids`` per completion column,
    as the trainer's dataset preparation writes them), right-padded: TRL's text DPO batch, K-way.

    Args:
        pad_token_id: the padding id.
        columns: the completion columns, in batch order.
        max_length: truncate each prompt + completion to this many tokens.
        truncation_mode: ``"keep_start"`` or ``"keep_end"``.
    """

    pad_token_id: int
    columns: Sequence[str] = ("chosen", "rejected")
    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def __post_init__(self) -> None:
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        sequences, masks = [], []
        for column in self.columns:
            key = f"{column}_ids"
            for example in examples:
                if key not in example:
                    raise KeyError(f"the example lacks {key!r}: was the dataset prepared for column {column!r}?")
                prompt, answer = list(example["prompt_ids"]), list(example[key])
                ids, mask = prompt + answer, [0] * len(prompt) + [1] * len(answer)
                if self.max_length is not None:
                    keep = slice(None, self.max_length) if self.truncation_mode == "keep_start" else None
                    if keep is None:
                        keep = slice(-self.max_length, None)
                    ids, mask = ids[keep], mask[keep]
                sequences.append(ids)
                masks.append(mask)
        output = {
            "input_ids": _pad_right(sequences, self.pad_token_id),
            "attention_mask": _pad_right([[1] * len(s) for s in sequences], 0),
            "completion_mask": _pad_right(masks, 0),
        }
        output.update(_reference_tensors(examples, self.columns))
        return output
