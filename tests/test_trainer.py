"""NaPOTrainer against TRL's DPOTrainer, the K-completion collators against TRL's, and the trainer's guards.

Everything runs on the tiny random LLaVA (or its text half as a Llama), built offline and loaded back
with ``from_pretrained``. DPO equivalence tolerance: the loss to 1e-5 relative; each gradient tensor
to 1e-5 relative to its own largest entry, with an absolute floor of 1e-8 for entries that are
mathematically zero (attention key biases: both sides are rounding noise near 1e-10).
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference, DataCollatorForVisionPreference

from napo.data import make_sample_data, make_tiny_model
from napo.train import NaPOTextCollator, NaPOVisionCollator
from napo.train.trainer import NaPOConfig, NaPOTrainer

os.environ.setdefault("TQDM_DISABLE", "1")
TRAINING = dict(
    per_device_train_batch_size=4,
    bf16=False,
    use_cpu=True,
    report_to="none",
    gradient_checkpointing=False,
    max_steps=1,
    save_strategy="no",
    dataloader_pin_memory=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(policy dir, reference dir): two tiny LLaVAs with different random weights, one tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "policy", seed=0), make_tiny_model(root / "reference", seed=1)


@pytest.fixture(scope="module")
def processor(tiny):
    return AutoProcessor.from_pretrained(tiny[0])


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    import pandas as pd

    path = make_sample_data(tmp_path_factory.mktemp("sample") / "sample.parquet", rows=8, seed=3)
    return pd.read_parquet(path).to_dict("records")


def conversational(rows: list[dict]) -> list[dict]:
    """TRL's conversational vision format of RLAIF-V rows."""
    return [
        {
            "image": Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"),
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": row["rejected"]}]}],
        }
        for row in rows
    ]


def text_rows(rows: list[dict], extra: bool = False) -> list[dict]:
    out = [
        {"prompt": f"Question: {r['question']} Answer:", "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
        for r in rows
    ]
    if extra:
        for row, source in zip(out, rows, strict=True):
            row["question_only"] = " " + source["rejected"].split(".")[0] + " perhaps."
    return out


@pytest.fixture(scope="module")
def text_models(tiny, tmp_path_factory):
    """(policy dir, reference dir) of text-only Llamas built from the tiny LLaVA's text config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny[0]).text_config
    tokenizer = AutoProcessor.from_pretrained(tiny[0]).tokenizer
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"llama{seed}")
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs


def assert_grads_match(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name, grad in expected.items():
        atol = 1e-5 * grad.abs().max().item() + 1e-8
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=atol, msg=f"gradient of {name}")


def one_step(trainer, examples: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = trainer._prepare_inputs(trainer.data_collator(copy.deepcopy(examples)))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


NAPO_AS_DPO = [{"original_loss": "dpo"}, {"original_loss": "napo", "original_q": "0"}]


@pytest.mark.parametrize("napo_options", NAPO_AS_DPO, ids=["dpo-term", "napo-q0"])
def test_vision_equivalence_with_trl_dpo(tiny, processor, sample, tmp_path, napo_options):
    rows = conversational(sample)
    dataset = Dataset.from_list(rows)
    results = []
    # TRL's step on napo's batches (napo's adds the BOS and ends answers at </s>: the collator test above).
    napo_batches = {"data_collator": NaPOVisionCollator(processor)}
    for trainer_class, config_class, options, collator in (
        (DPOTrainer, DPOConfig, {}, napo_batches),
        (NaPOTrainer, NaPOConfig, napo_options, {}),
    ):
        policy = AutoModelForImageTextToText.from_pretrained(tiny[0])
        reference = AutoModelForImageTextToText.from_pretrained(tiny[1])  # differs: margins are not zero
        args = config_class(output_dir=str(tmp_path / trainer_class.__name__), **TRAINING, **options)
        trainer = trainer_class(
            model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=processor, **collator
        )
        results.append(one_step(trainer, rows[:4]))
    (dpo_loss, dpo_grads), (napo_loss, napo_grads) = results
    assert abs(dpo_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3  # a real margin, not the step-0 log 2
    torch.testing.assert_close(napo_loss, dpo_loss, rtol=1e-5, atol=0)
    assert len(dpo_grads) > 50
    assert_grads_match(dpo_grads, napo_grads)


@pytest.mark.parametrize(("feature_layer", "unread"), [(-1, 2), (-2, 18)], ids=["layer-1", "layer-2"])
def test_vision_parameters_nothing_reads_are_frozen_and_only_those(feature_layer, unread, tiny, processor, sample,
                                                                   tmp_path):  # fmt: skip
    """The frozen parameters are exactly those a training step leaves without a gradient once trainable again:
    the post-layernorm (2 tensors), and at vision_feature_layer -2 (LLaVA-1.5's) also the last CLIP layer (16)."""
    rows = conversational(sample)
    policy = AutoModelForImageTextToText.from_pretrained(tiny[0])
    policy.config.vision_feature_layer = feature_layer
    reference = AutoModelForImageTextToText.from_pretrained(tiny[1])
    args = NaPOConfig(output_dir=str(tmp_path), **TRAINING)
    trainer = NaPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor
    )
    frozen = set(trainer.napo_frozen_parameters)
    assert len(frozen) == unread
    assert frozen == {name for name, p in policy.named_parameters() if not p.requires_grad}
    for parameter in policy.parameters():
        parameter.requires_grad_(True)
    _, grads = one_step(trainer, rows[:4])
    assert {name for name, _ in policy.named_parameters()} - grads.keys() == frozen


@pytest.mark.parametrize("napo_options", NAPO_AS_DPO, ids=["dpo-term", "napo-q0"])
def test_text_equivalence_with_trl_dpo(text_models, sample, tmp_path, napo_options):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_models[0])
    dataset = Dataset.from_list(text_rows(sample))
    results = []
    for trainer_class, config_class, options in ((DPOTrainer, DPOConfig, {}), (NaPOTrainer, NaPOConfig, napo_options)):
        policy = LlamaForCausalLM.from_pretrained(text_models[0])
        reference = LlamaForCausalLM.from_pretrained(text_models[1])
        args = config_class(output_dir=str(tmp_path / trainer_class.__name__), **TRAINING, **options)
        trainer = trainer_class(
            model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        prepared = [trainer.train_dataset[i] for i in range(4)]
        results.append(one_step(trainer, prepared))
    (dpo_loss, dpo_grads), (napo_loss, napo_grads) = results
    torch.testing.assert_close(napo_loss, dpo_loss, rtol=1e-5, atol=0)
    assert_grads_match(dpo_grads, napo_grads)


def test_vision_collator_is_trls_with_bos_and_the_answer_ending_in_eos(processor, sample):
    """TRL's vision collator tokenizes the chat template's prompt without special tokens, so a template that
    writes no BOS (llava-1.5's, the tiny model's) trains without one, and scores the space the template writes
    after ``</s>`` as the answer's last token. napo's batch is TRL's with the tokenizer's BOS first (as
    generation's prompts have it) and the answer ending at ``</s>``; the layout is TRL's."""
    tokenizer = processor.tokenizer
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    rows = conversational(sample[:3])
    expected = DataCollatorForVisionPreference(processor)(copy.deepcopy(rows))
    for examples in (copy.deepcopy(rows), [dict(r) for r in sample[:3]]):  # TRL rows, then raw RLAIF-V rows
        actual = NaPOVisionCollator(processor)(examples)
        assert actual.keys() == expected.keys()
        assert torch.equal(actual["pixel_values"], expected["pixel_values"])
        for row in range(len(expected["input_ids"])):
            theirs = expected["input_ids"][row][expected["attention_mask"][row].bool()].tolist()
            their_scored = expected["input_ids"][row][expected["completion_mask"][row].bool()].tolist()
            ours = actual["input_ids"][row][actual["attention_mask"][row].bool()].tolist()
            our_scored = actual["input_ids"][row][actual["completion_mask"][row].bool()].tolist()
            assert theirs[0] != tokenizer.bos_token_id and their_scored[-2:] == [tokenizer.eos_token_id, *space]
            assert ours == [tokenizer.bos_token_id, *theirs[: -len(space)]]
            assert our_scored == their_scored[: -len(space)] and our_scored[-1] == tokenizer.eos_token_id
    full = NaPOVisionCollator(processor)(copy.deepcopy(rows))
    truncated = NaPOVisionCollator(processor, max_length=24)(copy.deepcopy(rows))
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(truncated[key], full[key][:, :24]), key


@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (12, "keep_start"), (12, "keep_end")])
def test_text_collator_matches_trl(max_length, mode):
    generator = torch.Generator().manual_seed(5)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 90, (n,), generator=generator).tolist()

    examples = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in
                [(5, 3, 9), (9, 7, 1), (2, 11, 4)]]  # fmt: skip
    expected = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)(examples)
    actual = NaPOTextCollator(pad_token_id=0, max_length=max_length, truncation_mode=mode)(examples)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_k_way_batch_holds_every_answer_under_the_same_prompt(processor, sample):
    columns = ("chosen", "rejected", "question_only")
    rows = [dict(r, question_only=f"A guess without the picture {i}.") for i, r in enumerate(sample[:3])]
    batch = NaPOVisionCollator(processor, columns=columns)(copy.deepcopy(rows))
    assert batch["input_ids"].shape[0] == 9 and batch["pixel_values"].shape[0] == 9
    pair = NaPOVisionCollator(processor, columns=("chosen", "question_only"))(copy.deepcopy(rows))
    for block_k, block_pair in ((0, 0), (2, 1)):  # chosen block, question_only block
        for b in range(3):
            k_row, pair_row = block_k * 3 + b, block_pair * 3 + b
            k_tokens = batch["input_ids"][k_row][batch["attention_mask"][k_row].bool()]
            pair_tokens = pair["input_ids"][pair_row][pair["attention_mask"][pair_row].bool()]
            assert torch.equal(k_tokens, pair_tokens)
            k_answer = batch["input_ids"][k_row][batch["completion_mask"][k_row].bool()]
            text = processor.tokenizer.decode(k_answer)
            assert rows[b][columns[block_k]] in text


def test_cached_reference_columns_ride_along(processor, sample):
    rows = [dict(r, ref_chosen_logps=-1.5 * i, ref_chosen_avg_logps=-0.5, ref_rejected_logps=-2.0,
                 ref_rejected_avg_logps=-0.25) for i, r in enumerate(sample[:2])]  # fmt: skip
    batch = NaPOVisionCollator(processor)(rows)
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor([0.0, -1.5]))
    assert batch["ref_rejected_avg_logps"].dtype == torch.float32


def test_text_dataset_with_a_biased_column_trains_three_answers(text_models, sample, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_models[0])
    dataset = Dataset.from_list(text_rows(sample, extra=True))
    args = NaPOConfig(output_dir=str(tmp_path), **{**TRAINING, "max_steps": 2, "logging_steps": 1})
    trainer = NaPOTrainer(model=LlamaForCausalLM.from_pretrained(text_models[0]), args=args,
                          train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    assert trainer.napo_columns == ("chosen", "rejected", "question_only")
    assert set(trainer.napo_terms) == {"original", "language"}
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["napo/q_language"] == 1.0  # step 1: policy == reference, mean margin 0 -> q = 1
    assert logged["napo/weight_original"] == pytest.approx(0.5) and "logps/question_only" in logged


def test_plain_dpo_data_is_noise_robust_dpo(text_models, sample, tmp_path):
    from transformers import AutoTokenizer

    dataset = Dataset.from_list(text_rows(sample))
    args = NaPOConfig(output_dir=str(tmp_path), **TRAINING)
    trainer = NaPOTrainer(model=LlamaForCausalLM.from_pretrained(text_models[0]), args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(text_models[0]))  # fmt: skip
    config = trainer.napo_terms["original"][0]
    assert list(trainer.napo_terms) == ["original"] and config.loss == "napo" and config.q == "adaptive"


def test_text_model_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(text_models, sample, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_models[0])
    dataset = Dataset.from_list(text_rows(sample, extra=True))
    options = {**TRAINING, "max_steps": 4, "per_device_train_batch_size": 2, "save_strategy": "steps",
               "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-3, "seed": 7}  # fmt: skip

    def run(output, resume=None):
        args = NaPOConfig(output_dir=str(output), **options)
        model = LlamaForCausalLM.from_pretrained(text_models[0])
        trainer = NaPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    expected = dict(full.model.named_parameters())
    for name, parameter in resumed.model.named_parameters():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(parameter, expected[name], rtol=0, atol=1e-6 * scale, msg=name)
    last = next(h for h in full.state.log_history if h.get("step") == 4 and "loss" in h)
    again = next(h for h in resumed.state.log_history if h.get("step") == 4 and "loss" in h)
    assert again["loss"] == pytest.approx(last["loss"], rel=1e-5)
    assert again["napo/q_language"] == pytest.approx(last["napo/q_language"], rel=1e-5)


def test_best_model_at_end_restores_the_best_checkpoints_weights(tiny, processor, sample, tmp_path):
    from safetensors.torch import load_file

    rows = conversational(sample)
    args = NaPOConfig(output_dir=str(tmp_path), **{**TRAINING, "max_steps": 2, "per_device_train_batch_size": 2,
                      "save_strategy": "steps", "save_steps": 1, "eval_strategy": "steps", "eval_steps": 1,
                      "load_best_model_at_end": True, "metric_for_best_model": "loss", "greater_is_better": True,
                      "learning_rate": 1e-3})  # fmt: skip
    trainer = NaPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny[0]), args=args,
                          train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:2]),
                          processing_class=processor)  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    # Compared through the model's own loader (the saved keys are in the original layout, not the module tree's).
    reference = AutoModelForImageTextToText.from_pretrained(best).state_dict()
    assert set(load_file(f"{best}/model.safetensors")) != set(reference)  # the layouts differ: the case that broke
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- bad input, before training starts


def test_missing_biased_column_named_in_the_config(tiny, processor, sample, tmp_path):
    args = NaPOConfig(output_dir=str(tmp_path), **TRAINING, language_column="question_only_black")
    with pytest.raises(ValueError, match=r"language_column='question_only_black'.*no such column"):
        NaPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny[0]), args=args,
                    train_dataset=Dataset.from_list(conversational(sample)), processing_class=processor)  # fmt: skip


def test_biased_column_of_the_wrong_type(tiny, processor, sample, tmp_path):
    rows = [dict(r, question_only=i) for i, r in enumerate(conversational(sample))]
    args = NaPOConfig(output_dir=str(tmp_path), **TRAINING)
    with pytest.raises(TypeError, match=r"column 'question_only' must hold strings.*int64"):
        NaPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny[0]), args=args,
                    train_dataset=Dataset.from_list(rows), processing_class=processor)  # fmt: skip


def test_null_answers_are_refused(tiny, processor, sample, tmp_path):
    rows = [dict(r, image_only=None if i == 2 else "x") for i, r in enumerate(conversational(sample))]
    args = NaPOConfig(output_dir=str(tmp_path), **TRAINING)
    with pytest.raises(ValueError, match="'image_only' has 1 null"):
        NaPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny[0]), args=args,
                    train_dataset=Dataset.from_list(rows), processing_class=processor)  # fmt: skip


def test_reference_with_another_vocabulary(tiny, processor, sample, tmp_path):
    reference = AutoModelForImageTextToText.from_pretrained(tiny[1])
    reference.resize_token_embeddings(reference.get_output_embeddings().weight.shape[0] + 8)
    args = NaPOConfig(output_dir=str(tmp_path), **TRAINING)
    with pytest.raises(ValueError, match=r"reference model's vocabulary .* differs"):
        NaPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny[0]), ref_model=reference, args=args,
                    train_dataset=Dataset.from_list(conversational(sample)), processing_class=processor)  # fmt: skip


@pytest.mark.parametrize(
    "options,match",
    [({"loss_type": ["ipo"]}, "loss_type"), ({"language_q": "often"}, "language_q"),
     ({"vision_margin": "max"}, "margin"), ({"napo_weights": "1,x"}, "napo_weights"),
     ({"original_loss": "hinge"}, "original_loss")],
)  # fmt: skip
def test_bad_configuration(options, match, tiny, processor, sample, tmp_path):
    with pytest.raises(ValueError, match=match):
        args = NaPOConfig(output_dir=str(tmp_path), **TRAINING, **options)
        NaPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny[0]), args=args,
                    train_dataset=Dataset.from_list(conversational(sample)), processing_class=processor)  # fmt: skip


def test_wrong_args_type(tiny, processor, sample, tmp_path):
    with pytest.raises(TypeError, match="NaPOConfig"):
        NaPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny[0]),
                    args=DPOConfig(output_dir=str(tmp_path), **TRAINING),
                    train_dataset=Dataset.from_list(conversational(sample)), processing_class=processor)  # fmt: skip


def test_precompute_caches_every_answer_and_frees_the_reference(tiny, processor, sample, tmp_path):
    rows = [dict(r, question_only=f"Maybe a shape number {i}.") for i, r in enumerate(conversational(sample))]
    args = NaPOConfig(output_dir=str(tmp_path), **TRAINING, precompute_ref_log_probs=True)
    trainer = NaPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny[0]),
                          ref_model=AutoModelForImageTextToText.from_pretrained(tiny[1]), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=processor)  # fmt: skip
    assert trainer.ref_model is None and trainer.napo_uses_cached_reference
    # TRL prepared the reference with the accelerator; it must not stay resident through that handle either.
    assert all(m is trainer.model for m in trainer.accelerator._models)
    assert args.precompute_ref_log_probs is True  # the caller's config is left as it was given
    cached = trainer.train_dataset
    for column in ("chosen", "rejected", "question_only"):
        assert f"ref_{column}_logps" in cached.column_names and f"ref_{column}_avg_logps" in cached.column_names
    # The cached values are the reference model's own log-probs of those sequences.
    reference = AutoModelForImageTextToText.from_pretrained(tiny[1])
    from napo.train import add_napo_lm_head, completion_logps

    add_napo_lm_head(reference)
    batch = trainer.data_collator(copy.deepcopy(rows[:3]))
    with torch.no_grad():
        expected = completion_logps(reference, batch, trainer.napo_columns)
    for column in trainer.napo_columns:
        torch.testing.assert_close(torch.tensor(cached[f"ref_{column}_logps"][:3]), expected[column].logps)
        torch.testing.assert_close(torch.tensor(cached[f"ref_{column}_avg_logps"][:3]), expected[column].avg_logps)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_fused_head_runs_as_the_heads_forward_and_falls_back_to_its_logits(tiny, processor, sample, monkeypatch):
    """The fused kernel runs inside a call of the LM head module, so the hooks an engine puts on the head (ZeRO-3's
    gather, FSDP2's unshard) run around it and no [B, T, V] logits form; a weight that is still not whole there
    (a tensor-parallel DTensor) goes through the head's own forward, with the same values."""
    from napo.train import add_napo_lm_head, completion_logps, lm_head

    model = add_napo_lm_head(AutoModelForImageTextToText.from_pretrained(tiny[0]))
    batch = NaPOVisionCollator(processor)(copy.deepcopy(conversational(sample[:3])))
    calls = []
    model.lm_head.register_forward_pre_hook(lambda module, args: calls.append([tuple(a.shape) for a in args]))
    fused = completion_logps(model, batch, ("chosen", "rejected"))
    assert len(calls) == 1 and calls[0][1] == tuple(batch["input_ids"].shape)  # hidden and labels went in
    assert "forward" not in vars(model.lm_head)  # the head's own forward is back
    monkeypatch.setattr(lm_head, "_plain_weight", lambda weight: False)
    unfused = completion_logps(model, batch, ("chosen", "rejected"))
    for column in ("chosen", "rejected"):
        torch.testing.assert_close(unfused[column].logps, fused[column].logps, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(unfused[column].avg_logps, fused[column].avg_logps, rtol=1e-5, atol=1e-5)


def test_conversational_text_rows_with_a_biased_answer(text_models, processor, sample, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_models[0])
    tokenizer.chat_template = processor.chat_template  # the tiny LLaVA's llava-1.5 template

    def turn(role: str, text: str) -> list[dict]:
        return [{"role": role, "content": [{"type": "text", "text": text}]}]

    rows = [{"prompt": turn("user", r["question"]), "chosen": turn("assistant", r["chosen"]),
             "rejected": turn("assistant", r["rejected"]), "question_only": turn("assistant", f"Perhaps {i}.")}
            for i, r in enumerate(sample)]  # fmt: skip
    args = NaPOConfig(output_dir=str(tmp_path), **{**TRAINING, "max_steps": 1, "logging_steps": 1})
    trainer = NaPOTrainer(model=LlamaForCausalLM.from_pretrained(text_models[0]), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
    first = trainer.train_dataset[0]
    assert tokenizer.decode(first["prompt_ids"] + first["question_only_ids"]).endswith("ASSISTANT: Perhaps 0.</s> ")
    trainer.train()
    assert trainer.state.log_history[0]["napo/q_language"] == 1.0


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_peft_equivalence_with_trl_dpo(kind, tiny, text_models, processor, sample, tmp_path):
    """LoRA on the policy, no ref_model: the reference is the base model (adapters off), as in TRL."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    if kind == "text":
        rows, processing = text_rows(sample), AutoTokenizer.from_pretrained(text_models[0])

        def load_policy():
            return LlamaForCausalLM.from_pretrained(text_models[0])
    else:
        rows, processing = conversational(sample), processor

        def load_policy():
            return AutoModelForImageTextToText.from_pretrained(tiny[0])

    dataset = Dataset.from_list(rows)
    # Random B (init_lora_weights=False): the adapted policy differs from the base, so the margins are real.
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    results, adapters = [], None
    runs = ((DPOTrainer, DPOConfig, {}), (NaPOTrainer, NaPOConfig, NAPO_AS_DPO[1]))
    for trainer_class, config_class, options in runs:
        args = config_class(output_dir=str(tmp_path / trainer_class.__name__), **TRAINING, **options)
        # TRL's step on napo's vision batches (napo's adds the BOS and ends answers at </s>).
        collator = (
            {"data_collator": NaPOVisionCollator(processor)} if kind == "vision" and trainer_class is DPOTrainer else {}
        )
        trainer = trainer_class(
            model=load_policy(), args=args, train_dataset=dataset, processing_class=processing,
            peft_config=LoraConfig(**lora), **collator,
        )  # fmt: skip
        assert trainer.ref_model is None
        trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        if adapters is None:
            adapters = {n: p.detach().clone() for n, p in trainable.items()}
        else:  # the same adapter weights in both runs
            with torch.no_grad():
                for name, parameter in trainable.items():
                    parameter.copy_(adapters[name])
        examples = [trainer.train_dataset[i] for i in range(4)] if kind == "text" else rows[:4]
        results.append(one_step(trainer, examples))
    (dpo_loss, dpo_grads), (napo_loss, napo_grads) = results
    # Not log 2 (policy != reference): the random adapters move the margin by ~1e-4 here, over a thousand times
    # float32's rounding at log 2 (6e-8), however the tiny models' vocabulary happens to seed them.
    assert abs(dpo_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-5
    torch.testing.assert_close(napo_loss, dpo_loss, rtol=1e-5, atol=0)
    assert_grads_match(dpo_grads, napo_grads)


# ---------------------------------------------------------------- TRL parity (issue 10)


def test_defaults_are_the_papers_recipe(tmp_path):
    args = NaPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    # The authors' llava15_train_bias.sh: cosine schedule, 10% warmup, weight decay 0.01, 2048 tokens, lr 5e-7,
    # 4 epochs of batch 4, beta 0.1.
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.1  # SchedulerType is a str enum
    assert args.weight_decay == 0.01 and args.max_length == 2048 and args.learning_rate == 5e-7
    assert args.num_train_epochs == 4 and args.per_device_train_batch_size == 4 and args.beta == 0.1
    assert args.get_warmup_steps(100) == 10  # the fraction is a share of the run's steps
    assert DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).max_length == 1024  # TRL: another default


def text_trainer(text_models, tmp_path, rows, **options):
    from transformers import AutoTokenizer

    args = NaPOConfig(output_dir=str(tmp_path), **{**TRAINING, **options})
    return NaPOTrainer(model=LlamaForCausalLM.from_pretrained(text_models[0]), args=args,
                       train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(
                           text_models[0]))  # fmt: skip


@pytest.mark.parametrize("vision", [False, True], ids=["text", "vision"])
def test_evaluate_a_new_dataset_with_precomputed_reference(vision, tiny, processor, text_models, sample, tmp_path):
    """A dataset passed to evaluate() gets its reference log-probs computed then (TRL's behaviour): the same
    eval loss as when it was given at construction; after a full fine-tuning step TRL's error."""
    rows = conversational(sample) if vision else text_rows(sample, extra=True)
    train_rows, eval_rows = rows[:4], rows[4:]
    options = {"precompute_ref_log_probs": True, "per_device_eval_batch_size": 2, "learning_rate": 1e-3}

    def make(eval_dataset=None):
        if not vision:
            trainer = text_trainer(text_models, tmp_path, train_rows, **options)
            if eval_dataset is not None:  # the same trainer, given the eval set at construction
                from transformers import AutoTokenizer

                trainer = NaPOTrainer(model=LlamaForCausalLM.from_pretrained(text_models[0]),
                                      args=NaPOConfig(output_dir=str(tmp_path), **{**TRAINING, **options}),
                                      train_dataset=Dataset.from_list(train_rows), eval_dataset=eval_dataset,
                                      processing_class=AutoTokenizer.from_pretrained(text_models[0]))  # fmt: skip
            return trainer
        args = NaPOConfig(output_dir=str(tmp_path), **{**TRAINING, **options})
        return NaPOTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny[0]), args=args,
                           train_dataset=Dataset.from_list(train_rows), eval_dataset=eval_dataset,
                           processing_class=processor)  # fmt: skip

    given_late = make().evaluate(eval_dataset=Dataset.from_list(eval_rows))
    given_early = make(Dataset.from_list(eval_rows)).evaluate()
    assert given_late["eval_loss"] == pytest.approx(given_early["eval_loss"], rel=1e-5)
    assert "eval_napo/q_original" in given_late
    trainer = make()
    trainer.train()
    with pytest.raises(ValueError, match=r"Cannot compute reference log-probs for a dataset passed to `evaluate\(\)`"):
        trainer.evaluate(eval_dataset=Dataset.from_list(eval_rows))


def test_compute_metrics_receives_per_row_rewards(text_models, sample, tmp_path):
    seen = {}

    def compute_metrics(prediction):
        rewards, preferred = prediction.predictions, prediction.label_ids
        seen.update(rewards=rewards, preferred=preferred)
        return {"chosen_wins": float((rewards.argmax(-1) == preferred).mean())}

    rows = text_rows(sample, extra=True)
    reference = LlamaForCausalLM.from_pretrained(text_models[1])  # differs from the policy: non-zero rewards
    from transformers import AutoTokenizer

    # Batches of equal size (8 rows, 4 a batch): the mean of the batch means is the mean over rows.
    args = NaPOConfig(output_dir=str(tmp_path), **{**TRAINING, "per_device_eval_batch_size": 4})
    trainer = NaPOTrainer(model=LlamaForCausalLM.from_pretrained(text_models[0]), ref_model=reference, args=args,
                          train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(text_models[0]),
                          compute_metrics=compute_metrics)  # fmt: skip
    metrics = trainer.evaluate()
    rewards, preferred = seen["rewards"], seen["preferred"]
    assert rewards.shape == (len(rows), 3) and (preferred == 0).all()  # chosen, rejected, question_only
    assert metrics["eval_chosen_wins"] == pytest.approx(float((rewards.argmax(-1) == 0).mean()))
    assert abs(rewards).max() > 0
    # The DPO reward margin of the rows, averaged, is what TRL logs as rewards/margins.
    assert float((rewards[:, 0] - rewards[:, 1]).mean()) == pytest.approx(metrics["eval_rewards/margins"], rel=1e-4)


def test_trls_messages_for_the_refusals_trl_makes_too(text_models, sample, tmp_path):
    from datasets import IterableDataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_models[0])
    model = LlamaForCausalLM.from_pretrained(text_models[0])
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        NaPOTrainer(model=model, args=NaPOConfig(output_dir=str(tmp_path), **TRAINING), processing_class=tokenizer)
    rows = text_rows(sample)
    iterable = IterableDataset.from_generator(lambda: iter(rows))
    args = NaPOConfig(output_dir=str(tmp_path), **TRAINING, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="`precompute_ref_log_probs=True` is not supported with IterableDataset"):
        NaPOTrainer(model=model, args=args, train_dataset=iterable, processing_class=tokenizer)


@pytest.fixture(scope="module")
def moe_models(tiny, tmp_path_factory):
    """(policy, reference) tiny Qwen3-MoE causal LMs (4 experts, top 2) with the tiny LLaVA's tokenizer."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = AutoProcessor.from_pretrained(tiny[0]).tokenizer
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                            router_aux_loss_coef=0.5, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"moe{seed}")
        Qwen3MoeForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs


def test_moe_router_aux_loss_is_added_as_trl_adds_it(moe_models, sample, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(moe_models[0])
    dataset = Dataset.from_list(text_rows(sample))
    results, trainers = [], []
    for trainer_class, config_class, options in ((DPOTrainer, DPOConfig, {}), (NaPOTrainer, NaPOConfig,
                                                 {"original_loss": "dpo"})):  # fmt: skip
        args = config_class(output_dir=str(tmp_path / trainer_class.__name__), **TRAINING, **options)
        trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(moe_models[0]),
                                ref_model=AutoModelForCausalLM.from_pretrained(moe_models[1]), args=args,
                                train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
        assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5
        prepared = [trainer.train_dataset[i] for i in range(4)]
        results.append(one_step(trainer, prepared))
        trainers.append(trainer)
    (dpo_loss, dpo_grads), (napo_loss, napo_grads) = results
    torch.testing.assert_close(napo_loss, dpo_loss, rtol=1e-5, atol=0)
    assert_grads_match(dpo_grads, napo_grads)
    aux = trainers[1]._metrics["train"]["aux_loss"]
    assert aux == pytest.approx(trainers[0]._metrics["train"]["aux_loss"], rel=1e-5) and aux[0] > 0
    # Without the aux term the losses would differ by coef * aux: the test sees the term.
    assert abs(napo_loss.item() - 0.5 * aux[0] - dpo_loss.item()) > 1e-4
