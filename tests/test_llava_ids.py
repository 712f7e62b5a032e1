"""napo's ``llava_v1`` token ids against LLaVA's own rules, with a real sentencepiece LLaMA-family tokenizer.

The tokenizer is the Mistral-7B v0.1 ``tokenizer.model.v1`` that the ``mistral-common`` wheel ships (the same
sentencepiece BPE algorithm and flags as LLaMA/Vicuna's, other ids), made into a llava-hf style processor
(``<image>`` = 32000, ``<pad>`` = 32001, CLIP 336/14: 576 image positions), saved and reloaded as ``napo
train`` loads one, with the checkpoint's ``legacy`` flag either way; transformers 5 builds its LLaMA
tokenizer differently for each. transformers 5.24 has no slow LLaMA tokenizer class any more; its generic
slow ``SentencePieceBackend`` is tested too.

The reference below is written from reading LLaVA's source (haotian-liu/LLaVA): ``conv_llava_v1`` in
llava/conversation.py at 053c284aee8995a0596fdda47b927a6d2a9b33cd (system sentence, separator " ", then
``</s>`` after the assistant's message; an empty message writes ``ROLE:`` and no separator),
``tokenizer_image_token`` in llava/mm_utils.py at 0f2e2150730e6b3ee37491ad6899a2ce69579a50 and
``preprocess_v1`` in llava/train/train.py at 0034661529f5cbadb50aaaaa72fe4ff046048378. The authors' slow
tokenizer is sentencepiece itself, used here directly.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("mistral_common")
pytest.importorskip("sentencepiece")

import mistral_common
import sentencepiece as spm
import torch
from PIL import Image

from napo.data.prompts import LLAVA_V1_SYSTEM, user_prompt
from napo.train import NaPOVisionCollator

MODEL_FILE = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
IMAGE_ID, PAD_ID, IGNORE = 32000, 32001, -100
IMAGE_POSITIONS = 576  # (336 / 14) ** 2

# llava-hf/llava-1.5-7b-hf's chat template (the `template` path's format): no system sentence, no BOS,
# each assistant text followed by a space.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# (question, answer): double spaces, empty-looking answers, digits, punctuation, emoji, CJK, byte fallback,
# long and multi-line answers, leading/trailing spaces.
SAMPLES = [
    ("What is in the image?", "A red car parked on the street."),
    ("Describe the scene.", " There is a tree."),
    ("How many dogs are there?", "3"),
    ("How many people?", "There are 12 people,  and 4 of them  sit."),
    ("Is it raining?", "No."),
    ("What color is the sky?", "Blue!!! (mostly)"),
    ("What does the sign say?", '"STOP" -- in capital letters; nothing else.'),
    ("Describe the emoji.", "A smiling face 🙂 and a heart ❤️."),
    ("这是什么", "这是一只猫。"),
    ("Translate: chat", "Le chat est sur la table — très mignon."),
    ("Any rare symbols?", "Yes: \u2603 \u0f3a \U0001f9ec and \u00e9\u00e8."),
    ("Describe it in detail.", " ".join(["The cat sits near the window and looks outside."] * 30)),
    ("List the objects.", "1. a cup\n2. a spoon\n3. a plate"),
    ("Two paragraphs?", "First paragraph.\n\nSecond paragraph."),
    ("Spaces   inside the question?", "Spaces   inside    the answer."),
    ("Trailing space?", "An answer with a trailing space "),
    ("Tabs?", "a\tb\t\tc"),
    ("Numbers?", "3.14159, 2,718 and 1e-10 (10^-10)."),
    ("Code?", "def f(x):\n    return x ** 2"),
    ("URL?", "See https://example.com/a_b?c=d&e=f#g."),
    ("Quotes?", "It's the 'best' one, isn't it?"),
    ("Math?", "x² + y² = z²; ∑ᵢ aᵢ ≥ 0"),
    ("Korean?", "고양이가 있습니다."),
    ("Arabic?", "هذه قطة"),
    ("Mixed?", "Mixed 中文 and English 123."),
    ("Yes or no?", "Yes"),
    ("One letter?", "a"),
    ("Punctuation only?", "?!"),
    ("Leading newline?", "\nStarts with a newline."),
    ("Ends with newline?", "Ends with a newline.\n"),
    ("Many spaces?", "a     b      c"),
    ("Question ending with space? ", "Fine."),
    ("What is the time?", "It is 10:45 a.m."),
    ("Long numbers?", "1234567890987654321"),
    ("Greek?", "Αυτή είναι μια γάτα."),
]


def _llava_tokenize(sp, text: str) -> list[int]:
    """The authors' ``tokenizer(text).input_ids``: BOS, then sentencepiece's pieces (dummy prefix included);
    ``</s>`` in the text is the end-of-sequence token (special tokens are split out first)."""
    ids = [sp.bos_id()]
    for k, part in enumerate(text.split("</s>")):
        if k:
            ids.append(sp.eos_id())
        ids.extend(sp.encode(part) if part else [])
    return ids


def llava_tokenizer_image_token(sp, prompt: str) -> list[int]:
    """LLaVA's rule: each ``<image>``-separated chunk tokenized on its own; the first chunk keeps its BOS, the
    later ones lose it, and one image index goes between chunks (here the processor's image id)."""
    chunks = [_llava_tokenize(sp, chunk) for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(IMAGE_ID)
        ids.extend(chunk[1:])
    return ids


def llava_conversation(question: str, answer: str, with_image: bool = True) -> str:
    """``conv_llava_v1.get_prompt()`` for one user turn and one assistant turn."""
    user = ("<image>\n" if with_image else "") + question
    assistant = f"ASSISTANT: {answer}</s>" if answer else "ASSISTANT:"
    return f"{LLAVA_V1_SYSTEM} USER: {user} {assistant}"


def llava_preprocess_v1(sp, conversation: str) -> tuple[list[int], list[int]]:
    """``preprocess_v1``'s (input_ids, labels) for one conversation with an image: the conversation split at
    ``</s>`` into rounds and each round at `` ASSISTANT: ``; the instruction (minus BOS and the ``▁`` that
    the answer's first piece absorbs) is masked; when the rounds do not account for every token the whole
    row is masked."""
    ids = llava_tokenizer_image_token(sp, conversation)
    labels = list(ids)
    separator = " ASSISTANT: "
    cursor = 1
    labels[:cursor] = [IGNORE] * cursor
    for round_text in conversation.split("</s>"):
        if round_text == "":
            break
        parts = round_text.split(separator)
        if len(parts) != 2:
            break
        round_len = len(llava_tokenizer_image_token(sp, round_text))
        instruction_len = len(llava_tokenizer_image_token(sp, parts[0] + separator)) - 2
        labels[cursor : cursor + instruction_len] = [IGNORE] * instruction_len
        cursor += round_len
    labels[cursor:] = [IGNORE] * (len(labels) - cursor)
    if cursor != len(ids):
        labels = [IGNORE] * len(ids)
    return ids, labels


def collapse_images(ids: list[int]) -> tuple[list[int], list[int]]:
    """``ids`` with each run of image ids as one (LLaVA's single image index), and the runs' lengths."""
    out: list[int] = []
    runs: list[int] = []
    for token in ids:
        if token == IMAGE_ID and out and out[-1] == IMAGE_ID:
            runs[-1] += 1
            continue
        if token == IMAGE_ID:
            runs.append(1)
        out.append(token)
    return out, runs


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=MODEL_FILE)


def _processor(tokenizer):
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_ID, PAD_ID]
    image_processor = ImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>", chat_template=LLAVA_HF_TEMPLATE)  # fmt: skip


@pytest.fixture(scope="module", params=["legacy", "nonlegacy"])
def processor(request, tmp_path_factory):
    """A llava-hf style processor on the real sentencepiece model, saved and reloaded with AutoProcessor (as
    ``napo train`` loads a checkpoint)."""
    from transformers import AutoProcessor, LlamaTokenizer

    legacy = request.param == "legacy"
    root = tmp_path_factory.mktemp(request.param)
    (root / "spm").mkdir()
    shutil.copyfile(MODEL_FILE, root / "spm" / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(root / "spm", legacy=legacy, add_bos_token=True)
    _processor(tokenizer).save_pretrained(root / "processor")
    # The checkpoint's flag, as llava-hf's tokenizer_config.json carries it (transformers does not save it).
    config_file = root / "processor" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "legacy": legacy}))
    loaded = AutoProcessor.from_pretrained(root / "processor")
    assert loaded.tokenizer.legacy is legacy and loaded.tokenizer.bos_token_id == 1
    return loaded


def _rows() -> list[dict]:
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    return [
        {"idx": k, "question": q, "chosen": a, "rejected": SAMPLES[(k + 1) % len(SAMPLES)][1], "image": image}
        for k, (q, a) in enumerate(SAMPLES)
    ]


def compare_to_llava(sp, processor, prompt_format: str) -> dict[str, int]:
    """How many samples napo's collated ids equal LLaVA's, per aspect."""
    rows = _rows()
    batch = NaPOVisionCollator(processor, columns=("chosen",), prompt_format=prompt_format)(rows)
    counts = dict.fromkeys(["full", "prompt", "completion", "first_supervised", "bos", "eos", "images"], 0)
    for b, row in enumerate(rows):
        ids, labels = llava_preprocess_v1(sp, llava_conversation(row["question"], row["chosen"]))
        first = next(k for k, label in enumerate(labels) if label != IGNORE)
        keep = batch["attention_mask"][b].bool()
        got, runs = collapse_images(batch["input_ids"][b][keep].tolist())
        mask = batch["completion_mask"][b][keep].tolist()
        got_first = mask.index(1) - (IMAGE_POSITIONS - 1) * len(runs) if 1 in mask else -1
        scored = batch["input_ids"][b][keep][torch.tensor(mask).bool()].tolist()
        counts["full"] += got == ids
        counts["prompt"] += got[:got_first] == ids[:first]
        counts["completion"] += scored == ids[first:]
        counts["first_supervised"] += got_first == first
        counts["bos"] += got[:1] == [1]
        counts["eos"] += scored[-1:] == [2]
        counts["images"] += runs == [IMAGE_POSITIONS]
    return counts


def test_the_reference_is_llava_and_can_fail(sp):
    """The reference's own checks: known sentencepiece pieces, LLaVA's masks, and a planted fault caught."""
    assert [sp.id_to_piece(i) for i in sp.encode(" There is")] == ["\u2581", "\u2581There", "\u2581is"]
    ids, labels = llava_preprocess_v1(sp, llava_conversation("Q?", "Yes"))
    first = next(k for k, label in enumerate(labels) if label != IGNORE)
    assert ids[0] == 1 and ids[-1] == 2 and [sp.id_to_piece(i) for i in ids[first:-1]] == ["\u2581Yes"]
    assert sp.id_to_piece(ids[first - 1]) == ":"  # ...ASSISTANT: , the mask ends on the colon
    image_at = ids.index(IMAGE_ID)
    assert [sp.id_to_piece(i) for i in ids[image_at + 1 : image_at + 3]] == ["\u2581", "<0x0A>"]
    # LLaVA masks a row with an empty answer or a literal </s> in it.
    assert set(llava_preprocess_v1(sp, llava_conversation("Q?", ""))[1]) == {IGNORE}
    assert set(llava_preprocess_v1(sp, llava_conversation("Q?", "a</s>b"))[1]) == {IGNORE}
    # A planted fault: the old way (BOS as text, the prompt tokenized in one piece) differs.
    fused = [1, *sp.encode(f"{LLAVA_V1_SYSTEM} USER: \nQ? ASSISTANT:")]
    assert fused != [t for t in ids[:first] if t != IMAGE_ID]


WHITESPACE = [" a   b", "   lead", " end  ", " There is", " x \n y", " \u4e2d  \U0001f642 1 2", "a\t\tb  c", "a      b"]


@pytest.mark.parametrize("text", WHITESPACE)
def test_whitespace_runs_are_merged_as_sentencepiece_does(sp, processor, text):
    from napo.data.prompts import text_ids

    expected = sp.encode(text)
    assert text_ids(processor.tokenizer, [text], dummy_prefix=True) == [expected]
    # A continuation: sentencepiece's dummy prefix written by the text's own leading space.
    assert text_ids(processor.tokenizer, [" " + text], dummy_prefix=False) == [expected]


def test_llava_v1_training_ids_equal_llavas(sp, processor):
    counts = compare_to_llava(sp, processor, "llava_v1")
    assert counts == dict.fromkeys(counts, len(SAMPLES)), counts


def test_llava_v1_generation_prompts_equal_llavas(sp, processor):
    """``napo generate`` / ``napo eval`` prompts: with an image, question only, image only."""
    from napo.data.prompts import tokenize_prompts

    image = Image.new("RGB", (40, 40))
    for question, _ in SAMPLES[:12]:
        cases = [(question, 1), (question, 0), (None, 1)]
        for q, num_images in cases:
            prompt = user_prompt(processor, "llava_v1", question=q, num_images=num_images)
            batch = tokenize_prompts(processor, [prompt], [image] * num_images or None, "llava_v1")
            got, runs = collapse_images(batch["input_ids"][0].tolist())
            assert got == llava_tokenizer_image_token(sp, prompt), (q, num_images)
            assert runs == [IMAGE_POSITIONS] * num_images


def test_llava_v1_refuses_the_rows_llava_masks_and_literal_image_tokens(sp, processor):
    image = Image.new("RGB", (32, 32))
    collate = NaPOVisionCollator(processor, columns=("chosen", "rejected"), prompt_format="llava_v1")
    good = {"idx": 0, "question": "Q?", "chosen": "yes", "rejected": "no", "image": image}
    for answer in ("", "a</s>b", "fine ASSISTANT: again"):
        assert set(llava_preprocess_v1(sp, llava_conversation("Q?", answer))[1]) == {IGNORE}
        with pytest.raises(ValueError, match=r"1 of 2 rows .*idx=7, column 'rejected'"):
            collate([good, {**good, "idx": 7, "rejected": answer}])
    for template in ("template", "llava_v1"):
        with pytest.raises(ValueError, match=r"idx=3: a literal '<image>'"):
            NaPOVisionCollator(processor, prompt_format=template)([{**good, "idx": 3, "chosen": "see <image> here"}])
