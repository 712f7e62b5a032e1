"""TRL's VLM DPO tests with NaPOTrainer swapped in for DPOTrainer, on napo's tiny checkpoints of each family.

Reproduces ``TestDPOTrainerVLM::test_train_vlm`` and ``::test_train_vlm_text_only_data`` of TRL's
tests/test_dpo_trainer.py (huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8): the same arguments
(``max_length=None``, ``per_device_train_batch_size=2`` for the image data, defaults otherwise), the model given
as a path as TRL gives a hub id, and TRL's assertions: a ``train_loss`` is logged, and every parameter changed,
except in LLaVA and LLaVA-NeXT the vision tower's last encoder layer and ``post_layernorm`` (``vision_feature_layer
=-2`` reads neither), which must stay equal; on text-only data, Qwen2.5-VL's ``model.visual`` stays equal.

What differs from TRL's run, and why:
- TRL's tiny hub checkpoints and its ``zen-image`` / ``zen`` datasets cannot be downloaded here: the checkpoints are
  napo's (``napo.data.tiny_families``, the tiny LLaVA of ``napo.data.tiny``), and the data are built in code with
  the shape of TRL's (``scripts/generate_zen_image_dataset.py`` at that commit: 17 train rows, a one-message user
  prompt with string content, one-message assistant answers, one random uint8 RGB image 32-63 pixels a side).
- Idefics3 (SmolVLM) is in the list too; TRL comments it out for its memory peak, napo's tiny one is small.
- CPU flags (``use_cpu``, ``bf16=False``), no checkpoints saved, and ``weight_decay=0`` (NaPOConfig's default is
  the paper's 0.01): with decay every parameter that has a gradient moves, so only a real update can pass the
  "every parameter changed" check. NaPOConfig's other defaults are the paper's (4 epochs, lr 5e-7, cosine).
- Each case also runs with TRL's own DPOTrainer and DPOConfig (the control): the same data and checks pass there,
  so a failure with NaPOTrainer is napo's.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402

from napo.data.tiny import make_tiny_model  # noqa: E402
from napo.data.tiny_families import make_tiny_family_model  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")

# TRL's parametrisation (the families napo has tiny checkpoints of), plus Idefics3.
VLM_FAMILIES = ["gemma3", "llava", "llava-next", "qwen2-vl", "qwen2.5-vl", "idefics3"]
ROWS = 17

# Questions and answers in the words of napo's sample grammar (the tiny tokenizers are trained on it).
QUESTIONS = [
    "What color is the cube?",
    "What shape is next to the ball?",
    "How many shapes are there?",
    "Is there a red sphere?",
    "What is on the left?",
    "What color is the ball?",
    "Which shape is the largest?",
    "Is the cone green?",
    "What is next to the cube?",
]
CHOSEN = ["The cube is red.", "A green cone.", "There are two shapes.", "Yes, one red sphere.", "A blue cube."]
REJECTED = ["The cube is blue.", "A red ball.", "There are five shapes.", "No.", "A yellow cone."]


def zen_image_like(seed: int = 0) -> Dataset:
    """17 rows shaped as TRL's zen-image ``conversational_preference`` train split."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(32, 64, size=(ROWS, 2))
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(ROWS)],
            "chosen": [[{"role": "assistant", "content": CHOSEN[i % len(CHOSEN)]}] for i in range(ROWS)],
            "rejected": [[{"role": "assistant", "content": REJECTED[i % len(REJECTED)]}] for i in range(ROWS)],
            "image": [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in sizes],
        }
    )


def zen_like(config: str) -> Dataset:
    """17 text-only rows shaped as TRL's zen ``conversational_preference`` or ``standard_preference``."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(ROWS)]
    chosen = [CHOSEN[i % len(CHOSEN)] for i in range(ROWS)]
    rejected = [REJECTED[i % len(REJECTED)] for i in range(ROWS)]
    if config == "standard_preference":
        return Dataset.from_dict({"prompt": questions, "chosen": chosen, "rejected": rejected})
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": q}] for q in questions],
            "chosen": [[{"role": "assistant", "content": a}] for a in chosen],
            "rejected": [[{"role": "assistant", "content": a}] for a in rejected],
        }
    )


# Tiny models gain nothing from threads; on a busy machine their spinning slowed these modules many times.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            path = root / arch
            built[arch] = str(make_tiny_model(path) if arch == "llava" else make_tiny_family_model(arch, path))
        return built[arch]

    return get


def unread_by_design(arch: str, model: str) -> tuple[str, ...]:
    """TRL's exception, for the checkpoint at hand: in LLaVA and LLaVA-NeXT the vision tower's encoder layers past
    ``vision_feature_layer`` and its ``post_layernorm`` get no gradient. TRL's tiny checkpoints (2 layers, read at
    -2) give its substrings ``encoder.layers.1`` and ``post_layernorm``; napo's tiny LLaVA reads layer -1 (only
    ``post_layernorm``), its tiny LLaVA-NeXT -2 as TRL's."""
    if arch not in ("llava", "llava-next"):
        return ()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    count, read = config.vision_config.num_hidden_layers, config.vision_feature_layer
    first_unread = read if read >= 0 else count + 1 + read  # hidden_states[k + 1] is layer k's output
    return (*(f"encoder.layers.{k}." for k in range(first_unread, count)), "post_layernorm")


def trainer_for(kind: str, model: str, dataset: Dataset, output_dir, **overrides):
    """The trainer TRL's test builds (``kind="dpo"``) or the same with napo's classes (``kind="napo"``)."""
    args = dict(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, save_strategy="no")
    args.update(overrides)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        # TRL's AutoProcessor cannot load a Qwen-VL processor without torchvision; napo's loader can.
        from napo.models.processors import load_processor

        return DPOTrainer(
            model=model, args=DPOConfig(**args), train_dataset=dataset, processing_class=load_processor(model)
        )
    from napo.train.trainer import NaPOConfig, NaPOTrainer

    return NaPOTrainer(model=model, args=NaPOConfig(weight_decay=0.0, **args), train_dataset=dataset)


def train_and_check(trainer, unchanged=lambda name: False, must_stay=lambda name: False) -> None:
    """TRL's assertions after ``trainer.train()``."""
    previous = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    stuck = []
    for name, before in previous.items():
        after = trainer.model.get_parameter(name)
        if must_stay(name):
            torch.testing.assert_close(before, after, rtol=1e-12, atol=1e-12, msg=f"Param {name} is updated")
        elif not unchanged(name) and torch.equal(before, after):
            stuck.append(name)
    assert not stuck, f"{len(stuck)} params not updated: {stuck[:8]}"


@pytest.mark.parametrize("kind", ["napo", "dpo"])
@pytest.mark.parametrize("arch", VLM_FAMILIES)
def test_train_vlm(checkpoint, arch, kind, tmp_path):
    model = checkpoint(arch)
    trainer = trainer_for(kind, model, zen_image_like(), tmp_path, max_length=None, per_device_train_batch_size=2)
    unread = unread_by_design(arch, model)
    assert arch != "llava-next" or unread == ("encoder.layers.1.", "post_layernorm")  # TRL's very exception
    if kind == "napo" and unread:  # napo freezes exactly the parameters TRL expects to stay equal
        frozen = set(trainer.napo_frozen_parameters)
        assert frozen and all(any(part in name for part in unread) for name in frozen)
    elif kind == "napo":  # the other towers feed the model their last layer, normalised: nothing to freeze
        assert trainer.napo_frozen_parameters == []
    train_and_check(trainer, must_stay=lambda name: any(part in name for part in unread))


@pytest.mark.parametrize("kind", ["napo", "dpo"])
@pytest.mark.parametrize("config", ["conversational_preference", "standard_preference"])
def test_train_vlm_text_only_data(checkpoint, config, kind, tmp_path):
    trainer = trainer_for(kind, checkpoint("qwen2.5-vl"), zen_like(config), tmp_path)
    train_and_check(trainer, must_stay=lambda name: name.startswith("model.visual"))


# Beyond TRL's tests: the same runs with napo's biased answers (the full NaPO objective), and text-only data on every
# family. Where each family keeps its image path: no image, no gradient there.
VISION_PARTS = {
    "gemma3": ("model.vision_tower.", "model.multi_modal_projector."),
    "llava": ("model.vision_tower.", "model.multi_modal_projector."),
    "llava-next": ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline"),
    "qwen2-vl": ("model.visual.",),
    "qwen2.5-vl": ("model.visual.",),
    "idefics3": ("model.vision_model.", "model.connector."),
}


@pytest.mark.parametrize("arch", VLM_FAMILIES)
def test_train_vlm_with_biased_answers(checkpoint, arch, tmp_path):
    """TRL-format rows plus ``question_only`` / ``image_only`` assistant turns: all three NaPO terms train (3 steps,
    the first at the warmup's learning rate of 0: every parameter has moved by the third)."""
    model = checkpoint(arch)
    dataset = zen_image_like()
    dataset = dataset.add_column("question_only", [[{"role": "assistant", "content": "It is green."}]] * ROWS)
    dataset = dataset.add_column("image_only", [[{"role": "assistant", "content": "A red square."}]] * ROWS)
    trainer = trainer_for("napo", model, dataset, tmp_path, max_length=None, per_device_train_batch_size=2,
                          max_steps=3, logging_steps=1)  # fmt: skip
    assert list(trainer.napo_terms) == ["original", "language", "vision"]
    unread = unread_by_design(arch, model)
    train_and_check(trainer, must_stay=lambda name: any(part in name for part in unread))
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert steps and all(f"napo/q_{term}" in steps[-1] for term in ("original", "language", "vision"))
    assert steps[-1]["napo/margin_language"] != 0.0


@pytest.mark.parametrize("arch", [arch for arch in VLM_FAMILIES if arch != "qwen2.5-vl"])  # TRL's own case above
def test_train_vlm_text_only_data_on_every_family(checkpoint, arch, tmp_path):
    trainer = trainer_for("napo", checkpoint(arch), zen_like("conversational_preference"), tmp_path, max_steps=3)
    train_and_check(trainer, must_stay=lambda name: name.startswith(VISION_PARTS[arch]))


@pytest.mark.parametrize("arch", VLM_FAMILIES)
def test_max_length_cutting_image_tokens_is_one_clear_error(checkpoint, arch, tmp_path):
    """Why TRL's VLM tests set max_length=None: a shorter one cuts image placeholders off while the image features
    stay whole. Each family's forward then fails; napo names the setting to change."""
    trainer = trainer_for("napo", checkpoint(arch), zen_image_like(), tmp_path, max_length=12,
                          per_device_train_batch_size=2, max_steps=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"max_length=12 cuts image placeholder tokens .* set it to None"):
        trainer.train()


@pytest.mark.parametrize("arch", VLM_FAMILIES)
def test_napo_as_dpo_is_trls_dpo_step_on_every_family(checkpoint, arch, tmp_path):
    """NaPOConfig(original_loss="dpo") on chosen/rejected rows is TRL's sigmoid DPO: one step on the same batch
    (napo's collator for both, a reference with other weights so the margins are real) gives TRL's loss and
    gradients, through napo's fused head on one side and the model's own logits on the other."""
    import copy

    from transformers import AutoModelForImageTextToText
    from trl import DPOConfig, DPOTrainer

    from napo.models.processors import load_processor
    from napo.train.collator import NaPOVisionCollator
    from napo.train.trainer import NaPOConfig, NaPOTrainer

    policy_dir = checkpoint(arch)
    reference_dir = tmp_path / "reference"
    if arch == "llava":
        make_tiny_model(reference_dir, seed=1)
    else:
        make_tiny_family_model(arch, reference_dir, seed=1)
    processor = load_processor(policy_dir)
    dataset = zen_image_like()
    examples = [dataset[i] for i in range(3)]
    flags = dict(report_to="none", use_cpu=True, bf16=False, max_length=None, save_strategy="no")
    results = []
    for trainer_class, args in (
        (DPOTrainer, DPOConfig(output_dir=str(tmp_path / "dpo"), **flags)),
        (NaPOTrainer, NaPOConfig(output_dir=str(tmp_path / "napo"), original_loss="dpo", **flags)),
    ):
        collator = {"data_collator": NaPOVisionCollator(processor)} if trainer_class is DPOTrainer else {}
        trainer = trainer_class(
            model=AutoModelForImageTextToText.from_pretrained(policy_dir),
            ref_model=AutoModelForImageTextToText.from_pretrained(reference_dir),
            args=args, train_dataset=dataset, processing_class=processor, **collator,
        )  # fmt: skip
        batch = trainer._prepare_inputs(trainer.data_collator(copy.deepcopy(examples)))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (dpo_loss, dpo_grads), (napo_loss, napo_grads) = results
    assert abs(dpo_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-4  # a real margin, not log 2
    torch.testing.assert_close(napo_loss, dpo_loss, rtol=1e-5, atol=0)
    assert dpo_grads.keys() == napo_grads.keys()
    for name, grad in dpo_grads.items():
        atol = 1e-4 * grad.abs().max().item() + 1e-8
        torch.testing.assert_close(napo_grads[name], grad, rtol=1e-4, atol=atol, msg=f"gradient of {name}")


@pytest.mark.parametrize("arch", VLM_FAMILIES)
def test_napos_dpo_batch_is_trls_but_for_where_answers_end(checkpoint, arch):
    """napo's collator against TRL's DataCollatorForVisionPreference on the same rows: the same image tensors, and
    each row's tokens TRL's except that napo's answer ends at the tokenizer's end-of-sequence token where the
    template writes it (Qwen's <|im_end|>, Idefics3's <end_of_utterance>, LLaVA's </s>) without the whitespace the
    template writes after it, and that napo starts with the BOS a template without one (LLaVA, LLaVA-NeXT) leaves
    to the tokenizer. Gemma 3's answers end with <end_of_turn>, not its <eos>: the batches are the same."""
    import copy

    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from napo.models.processors import load_processor
    from napo.train.collator import NaPOVisionCollator

    processor = load_processor(checkpoint(arch))
    tokenizer = processor.tokenizer
    dataset = zen_image_like()
    examples = [dataset[i] for i in range(3)]
    ours = NaPOVisionCollator(processor)(copy.deepcopy(examples))
    theirs = DataCollatorForVisionPreference(processor)(copy.deepcopy(examples))
    assert set(ours) == set(theirs)
    for key in set(ours) - {"input_ids", "attention_mask", "completion_mask", "token_type_ids", "mm_token_type_ids"}:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    trailing = {"llava": " ", "llava-next": " ", "qwen2-vl": "\n", "qwen2.5-vl": "\n", "idefics3": "\n"}.get(arch)
    bos = [tokenizer.bos_token_id] if arch in ("llava", "llava-next") else []
    for row in range(ours["input_ids"].shape[0]):
        napo_ids = ours["input_ids"][row][ours["attention_mask"][row].bool()].tolist()
        trl_ids = theirs["input_ids"][row][theirs["attention_mask"][row].bool()].tolist()
        if trailing is not None:
            assert tokenizer.decode(trl_ids[-1:]) == trailing and trl_ids[-2] == tokenizer.eos_token_id
            trl_ids = trl_ids[:-1]
        assert napo_ids == bos + trl_ids, (tokenizer.decode(napo_ids), tokenizer.decode(trl_ids))
        answer = ours["completion_mask"][row].sum().item()
        assert answer == theirs["completion_mask"][row].sum().item() - (trailing is not None)


def test_llava_v1_on_another_family_is_refused_when_the_trainer_is_built(checkpoint, tmp_path):
    """NaPOTrainer refuses llava_v1 on a non-LLaVA-1.5 vision dataset at construction, not at its first batch."""
    with pytest.raises(ValueError, match=r"Qwen2\.5-VL.*--prompt-format template"):
        trainer_for("napo", checkpoint("qwen2.5-vl"), zen_image_like(), tmp_path, prompt_format="llava_v1")


def test_llava_v1_on_another_family_is_refused_by_compute_reference_logps_before_any_row(checkpoint, tmp_path):
    from napo.data import make_sample_data
    from napo.models import load_model
    from napo.train.reference import compute_reference_logps

    model = checkpoint("gemma3")
    data = make_sample_data(tmp_path / "sample.parquet", rows=4)
    for loaded in (None, load_model(model, device="cpu")):  # a checkpoint path, or an already loaded pair
        output = tmp_path / f"logps-{loaded is None}"
        with pytest.raises(ValueError, match=r"Gemma 3.*--prompt-format template"):
            compute_reference_logps(model, data, output, prompt_format="llava_v1", loaded=loaded, progress=False)
        assert not output.exists() or not any(output.rglob("*")), "a run was recorded before the refusal"
