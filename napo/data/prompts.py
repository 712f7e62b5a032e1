"""Prompt formats: how a question, its image placeholders and an answer become the text a model sees.

``template`` (the default) is the checkpoint's own chat template (``processor.apply_chat_template``).
``llava_v1`` is the original LLaVA-1.5 conversation format the NaPO authors generated and scored
every answer with (zhangzef/NaPO: ``--conv-mode llava_v1`` in ``muffin/eval/llava15_gen_bias_data.py``;
the format itself is LLaVA's ``conv_llava_v1``, separator style "two"): a system sentence, then
``USER: <image>\\n{question} ASSISTANT:``, and each answer as `` {answer}</s>``, the end-of-sequence
token scored with it. HF llava-1.5 checkpoints carry a template without the system sentence, so a
reproduction that must see the authors' tokens selects ``llava_v1`` in ``napo generate``,
``napo logps``, ``napo train``, ``napo eval`` and ``NaPOConfig(prompt_format=...)`` alike.

``llava_v1`` is LLaVA-1.5's format and nothing else's: on another family (LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
Gemma 3, Idefics3 / SmolVLM, ...) it would write turns that model was never trained on, so
:func:`check_prompt_format_for` refuses it there, naming the family and ``--prompt-format template``. The stages
call it before their first row; :func:`user_prompt` and :func:`tokenize_prompts` call it too.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = [
    "LLAVA_V1_SYSTEM",
    "PROMPT_FORMATS",
    "SEQUENCE_VERSION",
    "answer_text",
    "check_checkpoint_prompt_format",
    "check_prompt_format",
    "check_prompt_format_for",
    "describe_prompt_format",
    "llava_v1_answer_ids",
    "llava_v1_prompt_ids",
    "llava_v1_unsupervised",
    "model_family",
    "sentencepiece_backend",
    "text_ids",
    "tokenize_prompts",
    "user_prompt",
]

PROMPT_FORMATS = ("template", "llava_v1")

# How napo turns rows into token ids, recorded with cached reference log-probs so that values computed on
# other sequences are scored again. 2: LLaVA's own ids for llava_v1; BOS and </s> on the template path.
SEQUENCE_VERSION = 2

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def check_prompt_format(prompt_format: Any) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    return prompt_format


# The processor classes of the families napo knows, by the family's name (the first class of a processor's MRO
# found here names it: napo's Qwen processors without the video part subclass Qwen's). llava_v1 is LLaVA-1.5's.
FAMILY_NAMES = {
    "LlavaProcessor": "LLaVA-1.5",
    "LlavaNextProcessor": "LLaVA-NeXT",
    "LlavaOnevisionProcessor": "LLaVA-OneVision",
    "Qwen2_5_VLProcessor": "Qwen2.5-VL",
    "Qwen2VLProcessor": "Qwen2-VL",
    "Gemma3Processor": "Gemma 3",
    "SmolVLMProcessor": "SmolVLM",
    "Idefics3Processor": "Idefics3 / SmolVLM",
}
LLAVA_V1_FAMILY = "LLaVA-1.5"


def model_family(processor: Any) -> str:
    """The model family a processor belongs to (:data:`FAMILY_NAMES`), else its class name."""
    for cls in type(processor).__mro__:
        if cls.__name__ in FAMILY_NAMES:
            return FAMILY_NAMES[cls.__name__]
    return type(processor).__name__


def check_prompt_format_for(processor: Any, prompt_format: Any) -> str:
    """``prompt_format``, checked against the checkpoint whose ``processor`` is given: ``llava_v1`` is refused on
    anything but a LLaVA-1.5 processor (its turns, ``USER: <image>\\n... ASSISTANT:``, are not what another
    family was trained on), with one error naming the family and the option that works."""
    if check_prompt_format(prompt_format) == "llava_v1" and model_family(processor) != LLAVA_V1_FAMILY:
        family = model_family(processor)
        raise ValueError(
            f"prompt format llava_v1 is LLaVA-1.5's conversation format; this checkpoint is {family} "
            f"({type(processor).__name__}), which was not trained on it: use --prompt-format template "
            "(prompt_format='template', the checkpoint's own chat template)"
        )
    return prompt_format


def check_checkpoint_prompt_format(model: Any, prompt_format: Any, processor: Any = None) -> str:
    """:func:`check_prompt_format_for` the checkpoint ``model`` (a directory or hub id): against ``processor`` when
    the caller has it loaded, else against the checkpoint's, loaded only when ``prompt_format`` is not
    ``template``. What a stage calls before it loads the model or runs a row."""
    if processor is None and check_prompt_format(prompt_format) != "template":
        from napo.models.processors import load_processor

        processor = load_processor(model)
    return prompt_format if processor is None else check_prompt_format_for(processor, prompt_format)


def describe_prompt_format(prompt_format: str) -> str:
    """One line saying what sequences a prompt format gives (napo generate, logps and train print it once)."""
    if check_prompt_format(prompt_format) == "llava_v1":
        return (
            "prompt format llava_v1: the authors' LLaVA-1.5 conversation (system sentence, USER: <image>\\n... "
            "ASSISTANT:, answers ending with </s>), tokenized as LLaVA's code does"
        )
    return (
        "prompt format template: the checkpoint's chat template, with the tokenizer's BOS and </s> where the template "
        "writes none; --prompt-format llava_v1 gives the authors' LLaVA-1.5 sequences"
    )


def _image_token(processor: Any) -> str:
    token = getattr(processor, "image_token", None) or getattr(processor.tokenizer, "image_token", None)
    if not token:
        raise ValueError("prompt_format='llava_v1' needs a processor with an image token (a LLaVA-family processor)")
    return token


def user_prompt(processor: Any, prompt_format: str, *, question: str | None, num_images: int) -> str:
    """The prompt up to where the answer starts: one user turn of ``num_images`` images then ``question``
    (either may be absent: the biased prompts), ending with the generation prompt."""
    if check_prompt_format_for(processor, prompt_format) == "llava_v1":
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


# ------------------------------------------------------------------ llava_v1 token ids
#
# LLaVA tokenizes a conversation with ``tokenizer_image_token`` (haotian-liu/LLaVA, llava/mm_utils.py at
# 0f2e2150730e6b3ee37491ad6899a2ce69579a50): the text is cut at each ``<image>``, every chunk is tokenized on
# its own by the slow sentencepiece tokenizer (so each chunk gets sentencepiece's dummy-prefix ``▁``), the
# chunks are joined by one image index each, and only the first chunk keeps its BOS. ``preprocess_v1``
# (llava/train/train.py at 0034661529f5cbadb50aaaaa72fe4ff046048378) supervises from the first token after
# ``ASSISTANT:`` through the closing ``</s>``. Writing ``"<s>"`` as text and tokenizing the whole prompt at
# once gives other ids with transformers 5's LLaMA tokenizers (no ``▁`` after a special token when the
# checkpoint says ``legacy: false``), and their BPE merges runs of spaces that sentencepiece keeps apart.

_SENTENCEPIECE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> copy or None


def _is_sentencepiece(tokenizer: Any) -> bool:
    """Whether the tokenizer writes sentencepiece's ``▁`` pieces (LLaMA, Vicuna, Mistral) rather than bytes."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a b", add_special_tokens=False)["input_ids"])
    return any(str(piece).startswith("\u2581") for piece in pieces)


def sentencepiece_backend(tokenizer: Any) -> Any:
    """A copy of a fast sentencepiece-BPE tokenizer's backend that encodes as sentencepiece does, or None.

    sentencepiece merges by piece score and gives whitespace-only pieces (``▁▁``, ``▁▁▁``...) the lowest
    score, so ``"▁▁There"`` becomes ``▁ ▁There``; transformers' conversion ranks merges by piece id, which
    puts ``▁ ▁`` first (``▁▁ There``). The copy ranks the merges that make a whitespace-only piece last, and
    adds no prefix itself (no normalizer, ``Metaspace`` without prepending: :func:`text_ids` writes the
    dummy prefix where sentencepiece does, whatever the checkpoint's ``legacy`` flag)."""
    if tokenizer in _SENTENCEPIECE_COPIES:
        return _SENTENCEPIECE_COPIES[tokenizer]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    copy = None
    if backend is not None and _is_sentencepiece(tokenizer):
        import json

        from tokenizers import Tokenizer, pre_tokenizers

        state = json.loads(backend.to_str())
        model = state.get("model", {})
        if model.get("type") == "BPE":
            merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]

            def blank(pair: list[str]) -> bool:
                return set("".join(pair)) == {"\u2581"}

            model["merges"] = [m for m in merges if not blank(m)] + [m for m in merges if blank(m)]
            state["normalizer"] = None
            state["post_processor"] = None
            copy = Tokenizer.from_str(json.dumps(state))
            copy.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    _SENTENCEPIECE_COPIES[tokenizer] = copy
    return copy


def text_ids(tokenizer: Any, texts: list[str], *, dummy_prefix: bool) -> list[list[int]]:
    """``texts`` as the authors' slow sentencepiece tokenizer encodes them, without special tokens:
    ``dummy_prefix`` for the start of a chunk (sentencepiece's leading ``▁``, even before a space), not for
    a continuation such as an answer after ``ASSISTANT:``. Other tokenizers encode the text as it is."""
    backend = sentencepiece_backend(tokenizer)
    if backend is None:
        return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else [] for t in texts]
    prefixed = [(" " + t if dummy_prefix else t) if t else "" for t in texts]
    encoded = backend.encode_batch(prefixed, add_special_tokens=False)
    return [list(e.ids) if t else [] for e, t in zip(encoded, texts, strict=True)]


def llava_v1_prompt_ids(processor: Any, prompt: str) -> list[int]:
    """A ``llava_v1`` prompt (:func:`user_prompt`) as LLaVA's ``tokenizer_image_token`` makes it: the
    tokenizer's BOS, then each ``<image>``-separated chunk tokenized on its own, one image id between
    chunks (the processor expands it to the image's positions)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = _image_token(processor)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    for k, chunk in enumerate(text_ids(tokenizer, prompt.split(image_token), dummy_prefix=True)):
        if k:
            ids.append(image_id)
        ids.extend(chunk)
    return ids


def llava_v1_answer_ids(processor: Any, answer: str) -> list[int]:
    """An answer as ``llava_v1`` supervises it after ``ASSISTANT:``: `` {answer}`` then ``</s>``."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return [*text_ids(tokenizer, [" " + answer], dummy_prefix=False)[0], tokenizer.eos_token_id]


def llava_v1_unsupervised(question: str | None, answer: str, eos_token: str) -> str | None:
    """Why LLaVA's ``preprocess_v1`` would supervise none of this row (it masks the whole row when its own
    round split disagrees with the tokens), or None: an empty answer (``conv_llava_v1`` then writes no
    ``</s>``), an end-of-sequence text inside the row, or `` ASSISTANT: `` other than the one separator."""
    if answer == "":
        return "an empty answer"
    text = f"{question or ''} ASSISTANT: {answer}"
    if eos_token and eos_token in text:
        return f"a literal {eos_token!r}"
    if text.count(" ASSISTANT: ") != 1:
        return "a literal ' ASSISTANT: '"
    return None


def tokenize_prompts(processor: Any, prompts: list[str], images: list | None, prompt_format: str) -> dict:
    """The processor's left-padded batch for ``prompts`` (text from :func:`user_prompt`) and their images, with
    ``llava_v1`` prompts' ids replaced by :func:`llava_v1_prompt_ids` (each image id expanded to as many
    positions as the processor gave that image). ``template`` prompts go through the processor unchanged
    (the chat template wrote its own BOS, if any)."""
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    # A template that writes no BOS (llava-hf's LLaVA-1.5 one) gets the tokenizer's, as generation's prompts
    # do (the tokenizer adds it there) and as the model was trained; llava_v1 puts it by id below.
    bos = tokenizer.bos_token
    template_bos = (
        check_prompt_format_for(processor, prompt_format) == "template"
        and bool(bos)
        and not any(prompt.startswith(bos) for prompt in prompts)
        and _adds_bos(tokenizer)
    )
    processed = processor(
        images=images or None,
        text=prompts,
        padding=True,
        padding_side="left",
        return_tensors="pt",
        add_special_tokens=template_bos,
    )
    if prompt_format == "template":
        return processed
    image_id = tokenizer.convert_tokens_to_ids(_image_token(processor))
    rows = []
    for prompt, expanded, mask in zip(prompts, processed["input_ids"], processed["attention_mask"], strict=True):
        runs = _runs(expanded[mask.bool()].tolist(), image_id)
        ids = []
        for token in llava_v1_prompt_ids(processor, prompt):
            ids.extend([image_id] * runs.pop(0) if token == image_id else [token])
        rows.append(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in rows)
    out = dict(processed)
    out["input_ids"] = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in rows], dtype=torch.long)
    out["attention_mask"] = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows])
    if "mm_token_type_ids" in out:
        out["mm_token_type_ids"] = (out["input_ids"] == image_id).long()
    if "token_type_ids" in out:
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return out


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's special tokens are a BOS before the text and nothing else."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return special == [tokenizer.bos_token_id, *plain]


def _runs(ids: list[int], image_id: int) -> list[int]:
    """The lengths of the runs of ``image_id`` in ``ids``, in order (one run per image)."""
    runs: list[int] = []
    previous = None
    for token in ids:
        if token == image_id:
            if previous == image_id:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = token
    return runs
