"""``NaPOTrainer``: TRL's ``DPOTrainer`` with the NaPO objective, as a one-line swap.

Paper: NaPO (spec Eq. 14). Each step runs one forward over ``[chosen; rejected; question_only;
image_only]`` (every completion under the full multimodal prompt), takes the sequence log-probs
from napo's fused LM-head kernel, and feeds :class:`napo.NaPOObjective`: DPO on the original pair,
adaptive-q NaPO on the two biased pairs, dynamic weights; q and the weights come from batch means
all-reduced over the data-parallel ranks. On a dataset with only prompt / chosen / rejected it is a
noise-robust DPO: one term, adaptive q.

Everything else is TRL's: model and reference-model handling (``ref_model``, PEFT adapters off,
DeepSpeed / FSDP preparation), the vision pipeline, dataset preparation, logging. Only
``compute_loss`` is replaced, plus the collator (K completions instead of 2), the dataset hooks
that keep the extra columns, and reference log-probs cached per completion column.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

try:
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import disable_gradient_checkpointing, is_peft_model, use_adapter
except ImportError as error:  # pragma: no cover - exercised by test_import_without_trl
    raise ImportError(
        "napo.train.trainer needs TRL (NaPOTrainer is a DPOTrainer subclass): pip install 'napo[train]' "
        f"(or pip install 'trl>=1.16,<2'). The import failed with: {error}"
    ) from error

from napo.data.prompts import check_prompt_format_for
from napo.losses import NaPOObjective, NaPOOutput
from napo.train.checkpoint import has_full_weights, restore_weights
from napo.train.collator import NaPOTextCollator, NaPOVisionCollator, reference_columns
from napo.train.config import NaPOConfig, check_dpo_options, resolve_terms
from napo.train.lm_head import SequenceLogps, add_napo_lm_head, completion_logps, model_inputs

__all__ = ["NaPOConfig", "NaPOTrainer"]  # NaPOConfig is defined in napo.train.config


def _first_example(dataset: Any) -> dict[str, Any]:
    try:
        return dict(next(iter(dataset)))
    except StopIteration:
        raise ValueError("the training dataset is empty") from None


def _check_text_columns(dataset: Any, columns: Sequence[str]) -> None:
    """Each completion column holds strings or chat messages, with no nulls (checked on the Arrow table, cheaply)."""
    from datasets import Value

    features = getattr(dataset, "features", None) or {}
    table = getattr(dataset, "data", None)
    for column in columns:
        feature = features.get(column)
        if isinstance(feature, Value) and feature.dtype not in ("string", "large_string"):
            raise TypeError(f"column {column!r} must hold strings (or chat messages), but its type is {feature.dtype}")
        if table is not None and column in table.column_names:
            nulls = table.column(column).null_count
            if nulls:
                raise ValueError(f"column {column!r} has {nulls} null value(s); every row needs every answer")


class NaPOTrainer(DPOTrainer):
    """A drop-in for TRL's ``DPOTrainer`` that trains with the NaPO objective.

    Same arguments as ``DPOTrainer`` (``args`` a :class:`NaPOConfig`). The dataset is TRL's
    preference format (``prompt``, ``chosen``, ``rejected``, optionally ``image``/``images``) or
    ``napo generate``'s RLAIF-V-Bias rows (``image``, ``question``, ``chosen``, ``rejected``,
    ``question_only``, ``image_only``), with optional cached reference columns
    ``ref_<column>_logps`` / ``ref_<column>_avg_logps`` (``napo logps``). With cached columns the
    reference model is not kept; ``precompute_ref_log_probs=True`` computes them (text or vision)
    before training.

    Logged, besides TRL's ``rewards/*`` and ``logps/*``: ``napo/q_<term>``, ``napo/weight_<term>``,
    ``napo/margin_<term>`` (batch-mean beta * M), ``napo/accuracy_<term>``, ``napo/loss_<term>``, and
    ``rewards/<column>`` / ``logps/<column>`` for the biased answers. TRL's per-token ``entropy``,
    ``logits/*`` and ``mean_token_accuracy`` are not computed: napo's kernel never forms the logits.

    The parameters of a LLaVA vision tower that no output reads (the layers past ``vision_feature_layer``, its
    ``post_layernorm``) are frozen, listed in ``napo_frozen_parameters``: they get no gradient either way.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "napo"]

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: NaPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: Any = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = NaPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-NaPO")
        if not isinstance(args, NaPOConfig):
            raise TypeError(
                f"args must be a NaPOConfig, got {type(args).__name__} (NaPOConfig accepts every DPOConfig field)"
            )
        check_dpo_options(args)
        if processing_class is None:
            processing_class = _processor_without_torchvision(model, args)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")  # TRL's words: code matching them keeps working
        sample = _first_example(train_dataset)
        names = list(getattr(train_dataset, "column_names", None) or sample)
        self.napo_terms = resolve_terms(args, names)
        self.napo_columns: tuple[str, ...] = tuple(
            dict.fromkeys(["chosen", *(column for _, column in self.napo_terms.values())])
        )
        # NaPOObjective's answer names (its keyword arguments, its rewards) -> the data column holding the answer.
        self._answer_columns = {"chosen": "chosen"}
        for term, (_, column) in self.napo_terms.items():
            self._answer_columns["rejected" if term == "original" else term] = column
        _check_text_columns(train_dataset, self.napo_columns)
        if ref_model is not None and not isinstance(model, str):
            _check_same_vocabulary(model, ref_model)
        vision = "image" in sample or "images" in sample
        if "prompt" not in sample and "question" in sample and not vision:
            raise ValueError("RLAIF-V rows (a 'question' column) need an 'image' column")
        self._napo_cached_reference = self._has_reference_columns(train_dataset) and (
            eval_dataset is None or self._has_reference_columns(eval_dataset)
        )
        if self._napo_cached_reference:
            for dataset in (train_dataset, eval_dataset):
                _check_reference_values(dataset, self.napo_columns)
        # TRL refuses to precompute for vision data and caches only chosen/rejected: napo does it itself below.
        requested_precompute = args.precompute_ref_log_probs
        self._napo_precompute = bool(requested_precompute) and not self._napo_cached_reference
        args.precompute_ref_log_probs = False
        try:
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        finally:
            args.precompute_ref_log_probs = requested_precompute
        unwrapped = self.accelerator.unwrap_model(self.model)
        base = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        self.napo_frozen_parameters = freeze_unread_vision_parameters(base)
        add_napo_lm_head(base)
        if self.ref_model is not None:
            _check_same_vocabulary(unwrapped, self.ref_model)
            add_napo_lm_head(self.accelerator.unwrap_model(self.ref_model))
        if data_collator is None:
            if self._is_vision_dataset:
                # llava_v1 on another family is refused here, not at the first batch.
                check_prompt_format_for(self.processing_class, args.prompt_format)
                self.data_collator = NaPOVisionCollator(
                    processor=self.processing_class,
                    columns=self.napo_columns,
                    max_length=args.max_length,
                    prompt_format=args.prompt_format,
                )
            else:
                if args.prompt_format != "template":
                    raise ValueError(
                        f"prompt_format={args.prompt_format!r} renders image + question rows; this dataset is text "
                        "only (its prompts are used as they are): use prompt_format='template'"
                    )
                self.data_collator = NaPOTextCollator(
                    pad_token_id=self._tokenizer.pad_token_id,
                    columns=self.napo_columns,
                    max_length=args.max_length,
                    truncation_mode=args.truncation_mode,
                )
        objective_terms = {term: config for term, (config, _) in self.napo_terms.items()}
        self.napo_objective = NaPOObjective(
            beta=args.beta,
            original=objective_terms.get("original"),
            language=objective_terms.get("language"),
            vision=objective_terms.get("vision"),
            weights=args.weight_setting(),
            q_min=args.q_min,
            w_min=args.w_min,
        )
        if self._napo_precompute:
            batch_size = args.precompute_ref_batch_size or args.per_device_train_batch_size
            self.train_dataset = self.add_reference_logps(self.train_dataset, batch_size, "train")
            if self.eval_dataset is not None:
                if isinstance(self.eval_dataset, dict):
                    self.eval_dataset = {
                        name: self.add_reference_logps(ds, batch_size, name) for name, ds in self.eval_dataset.items()
                    }
                else:
                    self.eval_dataset = self.add_reference_logps(self.eval_dataset, batch_size, "eval")
        self.napo_uses_cached_reference = self._napo_precompute or self._napo_cached_reference
        if self.napo_uses_cached_reference:
            self._release_reference_model()

    def _release_reference_model(self) -> None:
        """Every reference log-prob is in the data: drop the reference model TRL built. TRL decides to build
        it before the data can be inspected, so this frees it right after construction (the accelerator
        keeps a handle on prepared models too; without removing it the weights would stay resident)."""
        import gc

        if self.ref_model is None:
            return
        reference, self.ref_model = self.ref_model, None
        models = getattr(self.accelerator, "_models", None)
        if isinstance(models, list):
            models[:] = [m for m in models if m is not reference]
        del reference
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ checkpoints

    def _plain_weights(self, model: Any, directory: str) -> Any:
        """The model to restore through :func:`napo.train.checkpoint.restore_weights`, or None where the
        Trainer's own loading applies (adapters, DeepSpeed and FSDP states keep their native loaders)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or is_peft_model(unwrapped):
            return None
        return unwrapped if has_full_weights(directory) else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        # The Trainer loads the saved keys as they are (strict=False), which for models whose saved layout
        # differs from their module tree (LLaVA in transformers 5) restores nothing and says nothing.
        target = self._plain_weights(self.model if model is None else model, resume_from_checkpoint)
        if target is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            restore_weights(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        target = self._plain_weights(self.model, self.state.best_model_checkpoint)
        if target is None:
            super()._load_best_model()
        else:
            restore_weights(target, self.state.best_model_checkpoint)

    # ------------------------------------------------------------------ dataset hooks

    def _has_reference_columns(self, dataset: Any) -> bool:
        if isinstance(dataset, dict):
            return all(self._has_reference_columns(d) for d in dataset.values())
        names = getattr(dataset, "column_names", None) or list(_first_example(dataset))
        return all(name in names for column in self.napo_columns for name in reference_columns(column))

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        extra = [column for column in self.napo_columns if column not in ("chosen", "rejected")]
        if not extra:
            return dataset
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        eos = tokenizer.eos_token

        def tokenize_extra(example: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for column in extra:
                if f"{column}_ids" in example:  # prepared already (evaluate() prepares again)
                    continue
                if isinstance(example["prompt"], list):
                    full = tokenizer.apply_chat_template(example["prompt"] + example[column], tokenize=True)
                    if not isinstance(full, list):  # a BatchEncoding in recent transformers
                        full = full["input_ids"]
                else:
                    answer = example[column] if example[column].endswith(eos) else example[column] + eos
                    full = tokenizer(example["prompt"] + answer)["input_ids"]
                shared = 0
                prompt_ids = example["prompt_ids"]
                while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
                    shared += 1
                if shared < len(prompt_ids):
                    _warn_prompt_divergence(column)
                out[f"{column}_ids"] = full[shared:]
            return out

        from datasets import Dataset

        kwargs = {"desc": f"Tokenizing the biased answers of the {dataset_name} dataset"}
        return dataset.map(tokenize_extra, **(kwargs if isinstance(dataset, Dataset) else {}))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        ours = [name for column in self.napo_columns for name in reference_columns(column)]
        if self._is_vision_dataset:
            ours += [*self.napo_columns, "question", "idx"]
        else:
            ours += [f"{column}_ids" for column in self.napo_columns]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *ours]))

    # ------------------------------------------------------------------ reference log-probs

    def _reference_context(self):
        """The model and context that give the reference log-probs (a reference model, or PEFT adapters off)."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        if is_peft_model(unwrapped):
            return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return self.model, contextlib.nullcontext()  # before training, the policy is the reference

    def reference_logps(
        self, inputs: dict[str, Any], model_kwargs: dict[str, Any] | None = None
    ) -> dict[str, SequenceLogps]:
        """Per completion column, the reference ``[B]`` log-prob sums and averages of a collated batch."""
        model, adapter = self._reference_context()
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter,
            self.accelerator.autocast(),
        ):
            return completion_logps(model, inputs, self.napo_columns, model_kwargs)

    def add_reference_logps(self, dataset: Any, batch_size: int, name: str = "train") -> Any:
        """``dataset`` with ``ref_<column>_logps`` / ``_avg_logps`` for every completion column, computed now."""
        from datasets import Dataset
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        if not isinstance(dataset, Dataset):
            raise ValueError(  # TRL's words first, so code matching them keeps working
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        )
        values: dict[str, list[torch.Tensor]] = {n: [] for c in self.napo_columns for n in reference_columns(c)}
        model, _ = self._reference_context()
        was_training = model.training
        model.eval()
        try:
            for batch in tqdm(
                loader,
                desc=f"napo: reference log-probs ({name})",
                disable=self.args.disable_tqdm or not self.is_world_process_zero(),
            ):
                for column, out in self.reference_logps(batch).items():
                    sum_name, avg_name = reference_columns(column)
                    gathered = self.accelerator.gather_for_metrics((out.logps, out.avg_logps))
                    values[sum_name].append(gathered[0].float().cpu())
                    values[avg_name].append(gathered[1].float().cpu())
        finally:
            model.train(was_training)
        for column_name, parts in values.items():
            if column_name in dataset.column_names:
                dataset = dataset.remove_columns(column_name)
            dataset = dataset.add_column(column_name, torch.cat(parts).tolist())
        return dataset

    # ------------------------------------------------------------------ the step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        try:
            loss, output = self._napo_loss(model, inputs)
        except ValueError as error:
            if "Image features and image tokens do not match" in str(error) and self.args.max_length is not None:
                raise ValueError(
                    f"max_length={self.args.max_length} cuts image placeholder tokens off the prompt while the "
                    "image features stay whole: raise max_length or set it to None"
                ) from error
            raise
        return (loss, output) if return_outputs else loss

    def _napo_loss(self, model, inputs) -> tuple[torch.Tensor, NaPOOutput]:
        mode = "train" if self.model.training else "eval"
        model_kwargs = model_inputs(inputs)
        # MoE: the policy's forward also returns the router load-balancing loss (as TRL adds it); the frozen
        # reference does not compute one.
        policy_kwargs = {**model_kwargs, "output_router_logits": True} if self.aux_loss_enabled else model_kwargs
        policy, aux_loss = completion_logps(model, inputs, self.napo_columns, policy_kwargs, return_aux_loss=True)
        if self.napo_uses_cached_reference:
            reference = {}
            for column in self.napo_columns:
                sum_name, avg_name = reference_columns(column)
                if sum_name not in inputs:
                    raise KeyError(
                        f"the batch lacks the cached reference column {sum_name!r}: the reference model was freed "
                        "because the training data had every reference column; give evaluation data those columns "
                        "too (napo logps), or pass it as eval_dataset when constructing the trainer"
                    )
                reference[column] = SequenceLogps(inputs[sum_name], inputs[avg_name])
        else:
            reference = self.reference_logps(inputs, model_kwargs)
        kwargs: dict[str, torch.Tensor] = {}
        for answer, column in self._answer_columns.items():
            device = policy[column].logps.device
            kwargs[f"policy_{answer}_logps"] = policy[column].logps
            kwargs[f"reference_{answer}_logps"] = reference[column].logps.to(device)
            kwargs[f"policy_{answer}_avg_logps"] = policy[column].avg_logps
            kwargs[f"reference_{answer}_avg_logps"] = reference[column].avg_logps.to(device)
        if "original" not in self.napo_terms:
            kwargs.update(policy_rejected_logps=None, reference_rejected_logps=None)
        output = self.napo_objective(**kwargs)
        self._record_metrics(mode, output, policy, inputs)
        if not self.aux_loss_enabled:
            return output.loss, output
        if aux_loss is None:
            raise ValueError(
                f"{type(self.accelerator.unwrap_model(model)).__name__} returned no router auxiliary loss although "
                "it declares output_router_logits; set router_aux_loss_coef=0 to train without it"
            )
        aux_loss = aux_loss.to(output.loss.device)
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        return output.loss + self.router_aux_loss_coef * aux_loss, output

    def _record_metrics(
        self, mode: str, output: NaPOOutput, policy: dict[str, SequenceLogps], inputs: dict[str, Any]
    ) -> None:
        """TRL's rewards/* and logps/* plus napo/*, averaged over every rank's rows with one gather."""
        sums: dict[str, torch.Tensor] = {}
        for answer, reward in output.rewards.items():
            column = self._answer_columns[answer]
            sums[f"rewards/{column}"] = reward.sum()
            sums[f"logps/{column}"] = policy[column].logps.detach().float().sum()
        if "original" in output.margins:
            sums["rewards/margins"] = output.margins["original"].sum()
            sums["rewards/accuracies"] = (output.margins["original"] > 0).float().sum()
        for term in output.margins:
            sums[f"napo/margin_{term}"] = output.margins[term].sum()
            sums[f"napo/accuracy_{term}"] = (output.margins[term] > 0).float().sum()
            sums[f"napo/loss_{term}"] = output.losses[term].sum()
        rows = output.margins[next(iter(output.margins))].numel()
        keys = list(sums)
        local = torch.stack([sums[k].float() for k in keys] + [torch.tensor(float(rows), device=sums[keys[0]].device)])
        total = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, len(keys) + 1).sum(0).tolist()
        count = max(total[-1], 1.0)
        metrics = self._metrics[mode]
        for key, value in zip(keys, total[:-1], strict=True):
            metrics[key].append(value / count)
        # q and the weights are global batch statistics already (all-reduced inside the objective).
        scalars = [output.q[t] for t in output.q] + [output.weights[t] for t in output.weights]
        values = torch.stack(scalars).float().tolist()
        for index, term in enumerate(output.q):
            metrics[f"napo/q_{term}"].append(values[index])
            metrics[f"napo/weight_{term}"].append(values[len(output.q) + index])
        if mode == "train":
            tokens = self.accelerator.gather(inputs["attention_mask"].sum().reshape(1)).sum().item()
            self._total_train_tokens += int(tokens) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The NaPO loss, and unless ``prediction_loss_only`` what ``compute_metrics`` receives.

        The logits TRL passes on never exist here; instead ``EvalPrediction.predictions`` is ``[N, K]``, the
        implicit rewards ``beta * (log pi - log pi_ref)`` of each row's answers in the order of
        ``self.napo_columns`` (``chosen`` first, then ``rejected`` and the biased answers), and
        ``EvalPrediction.label_ids`` is ``[N]`` zeros: the column of the preferred answer. So
        ``(predictions.argmax(-1) == label_ids).mean()`` is the share of rows whose chosen answer the policy
        prefers to all the others, and ``predictions[:, 0] - predictions[:, 1]`` the DPO reward margins.
        """
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, output = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        by_column = {self._answer_columns[answer]: reward for answer, reward in output.rewards.items()}
        rewards = torch.stack([by_column[column] for column in self.napo_columns], dim=1).detach()
        preferred = torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)
        return loss.detach(), rewards, preferred

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """TRL's ``evaluate``; a dataset passed here when the reference log-probs are cached (``napo logps``
        columns, or ``precompute_ref_log_probs``) gets them computed now, as TRL does. The reference is then
        the policy before training (or the base model under PEFT adapters), so after a full fine-tuning step
        it no longer exists and this raises, as TRL does."""
        if eval_dataset is not None and not isinstance(eval_dataset, str) and self.napo_uses_cached_reference:
            named = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
            lacking = [name for name, dataset in named.items() if not self._has_reference_columns(dataset)]
            if lacking:
                unwrapped = self.accelerator.unwrap_model(self.model)
                if self.ref_model is None and not is_peft_model(unwrapped) and self.state.global_step > 0:
                    raise ValueError(  # TRL's words first, so code matching them keeps working
                        "Cannot compute reference log-probs for a dataset passed to `evaluate()` after training has "
                        "started: the reference log-probs are cached and the reference model (the policy before "
                        "training) is gone. Give the dataset its ref_* columns (napo logps), pass it as "
                        "eval_dataset when constructing the trainer, or pass an explicit ref_model."
                    )
                batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
                for name in lacking:
                    dataset = named[name]
                    if not self._is_vision_dataset:
                        dataset = self._prepare_dataset(dataset, self.processing_class, self.args, name)
                    named[name] = self.add_reference_logps(dataset, batch_size, name)
                eval_dataset = named if isinstance(eval_dataset, dict) else named["eval"]
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


def _check_reference_values(dataset: Any, columns: Sequence[str]) -> None:
    """Refuses cached reference log-probs that are null, NaN or infinite, naming the rows, before any step: with
    -inf the margin is infinite, the weights NaN and the loss 0. A streamed dataset is checked batch by batch by
    the collator instead."""
    import numpy as np

    if isinstance(dataset, dict):
        for part in dataset.values():
            _check_reference_values(part, columns)
        return
    names = getattr(dataset, "column_names", None)
    if dataset is None or names is None or not hasattr(dataset, "__len__"):
        return
    for name in (n for column in columns for n in reference_columns(column)):
        if name not in names:
            continue
        values = np.asarray([np.nan if v is None else v for v in dataset[name]], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            rows = [str(dataset[int(i)].get("idx", int(i))) for i in bad[:5]]
            raise ValueError(
                f"the cached reference log-prob column {name!r} is null, NaN or infinite in {bad.size} row(s) "
                f"(idx {', '.join(rows)}{', ...' if bad.size > 5 else ''}); score them again (napo logps --overwrite) "
                "or drop those rows"
            )


@functools.cache
def _warn_prompt_divergence(column: str) -> None:
    """Once per column: prompt + answer does not tokenize as the prompt's tokens followed by the answer's."""
    warnings.warn(
        f"the tokenized prompt is not a prefix of prompt + {column} (usually tokens merging across the boundary); "
        "such answers are scored after the shared prefix, as TRL does for chosen and rejected",
        stacklevel=2,
    )


def _processor_without_torchvision(model: Any, args: NaPOConfig) -> Any:
    """Where torchvision is missing, a local checkpoint's processor through
    :func:`napo.models.processors.load_processor`: TRL's ``AutoProcessor.from_pretrained`` cannot load a Qwen2-VL /
    Qwen2.5-VL processor there (its video processor needs torchvision), napo's loads it without the video part,
    and loads every other processor as ``AutoProcessor`` does. None elsewhere: TRL loads it."""
    from pathlib import Path

    from transformers.utils import is_torchvision_available

    from napo.models.processors import load_processor

    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    if is_torchvision_available() or args.trust_remote_code or not name or not Path(name).is_dir():
        return None
    return load_processor(name)


_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


def freeze_unread_vision_parameters(model: Any) -> list[str]:
    """Freezes the parameters of a LLaVA's vision tower whose outputs nothing reads; returns their names.

    LLaVA (and LLaVA-NeXT / -OneVision) take the image features from the tower's
    ``hidden_states[vision_feature_layer]``: the encoder layers past that layer, the tower's ``post_layernorm``
    and SigLIP's pooling ``head`` compute outputs the loss never sees (LLaVA-1.5 reads layer -2: its last CLIP
    layer and the post-layernorm). They never receive a gradient, so training leaves them unchanged either way;
    left trainable, they make FSDP2 checkpoints impossible to resume from: torch's ``set_optimizer_state_dict``
    (strict) refuses a checkpoint without the AdamW state of a trainable parameter, and a parameter that never had
    a gradient has none. Other models (and CLIP/SigLIP towers of another layout) are left as they are: Gemma 3 and
    Idefics3 read their SigLIP tower's normalised last layer, Qwen2-VL / Qwen2.5-VL their merger's output, so every
    parameter there gets a gradient (tests/test_trl_vlm_harness.py checks each changes in training)."""
    config = getattr(model, "config", None)
    read = getattr(config, "vision_feature_layer", None)
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    if read is None or tower is None or not type(model).__module__.startswith("transformers.models.llava"):
        return []
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if getattr(tower.config, "model_type", None) not in _VISION_TOWERS or not isinstance(layers, torch.nn.ModuleList):
        return []
    count = len(layers)  # hidden_states[0] is the embeddings' output, hidden_states[k + 1] layer k's
    deepest = max(i if i >= 0 else count + 1 + i for i in ([read] if isinstance(read, int) else read))
    unread = [layers[k] for k in range(deepest, count)]
    unread += [getattr(tower, name) for name in ("post_layernorm", "head") if getattr(tower, name, None) is not None]
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    frozen = []
    for module in unread:
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen.append(names[id(parameter)])
    return frozen


def _vocabulary_size(model: Any) -> int | None:
    """The LM head's rows: its full shape, not a shard's. DeepSpeed ZeRO-3 leaves an empty local tensor and keeps
    the shape in ``ds_shape``; FSDP2's DTensor reports its global shape as ``shape``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return int(getattr(head.weight, "ds_shape", head.weight.shape)[0])


def _check_same_vocabulary(model: Any, ref_model: Any) -> None:
    policy, reference = _vocabulary_size(model), _vocabulary_size(ref_model)
    if policy is not None and reference is not None and policy != reference:
        raise ValueError(
            f"the reference model's vocabulary ({reference} entries) differs from the policy's ({policy}): "
            "log-probs of the same token ids would not be comparable; use a reference with the policy's tokenizer"
        )
