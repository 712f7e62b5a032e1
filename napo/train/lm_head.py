"""Sequence log-probs straight from a HuggingFace model, through napo's fused LM-head kernel.

:func:`add_napo_lm_head` patches ``model.forward`` (as TRL patches its own fused head) so that
``model(..., labels=labels, napo_logps=True)`` runs the backbone, then
:func:`napo.fused_linear_sequence_logps` on the last hidden states and the LM head weight: the
``[B, T, V]`` logits never exist. Patching the forward, rather than calling the backbone from the
trainer, keeps DDP / FSDP / DeepSpeed wrappers in the call path. Models whose logits are scaled or
soft-capped after the head (Gemma 2, Cohere, Granite, PaliGemma, ...) go through the model's own forward
and napo's token kernel on the logits instead (correct, but the logits are then materialised), and napo
says so once per model class; so do heads sharded by DeepSpeed ZeRO-3 or FSDP2 (silently: the kernel
runs inside the head's call, see :func:`_head_logps`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from napo.logps import fused_linear_sequence_logps, sequence_logps

__all__ = ["SequenceLogps", "add_napo_lm_head", "completion_logps", "model_inputs"]

# Config attributes that change the logits after the LM head matmul in the classes that read them; the fused
# path cannot apply them. Read on the model's config and on its text config (PaliGemma and Gemma 4 apply their
# text config's final_logit_softcapping), unless the class is one of _PLAIN_HEAD_CLASSES.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
# Classes whose forward computes ``logits = self.lm_head(last_hidden_state)`` and nothing after, whatever their
# configs say, read in transformers 5.24's modeling files (each ``...ForConditionalGeneration.forward``). Their
# configs may still carry a transform the class ignores: Gemma3ForConditionalGeneration never applies its
# text_config.final_logit_softcapping (only the text-only Gemma3ForCausalLM does), so it must not send Gemma 3 to
# the slow path. tests/test_family_lm_head.py checks each against the model's own logits with the transforms set.
_PLAIN_HEAD_CLASSES = frozenset(
    {
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Gemma3ForConditionalGeneration",
        "Idefics3ForConditionalGeneration",
    }
)
# (model class, reason) pairs the model's-own-head notice has been given for: once per process.
_TOLD_OWN_HEAD: set[tuple[str, str]] = set()
# Batch keys that are not model inputs.
_NON_MODEL_KEYS = ("completion_mask",)


class SequenceLogps(NamedTuple):
    """What the patched forward returns with ``napo_logps=True``: ``[N]`` sums and averages over labelled tokens,
    and for a Mixture-of-Experts model asked for ``output_router_logits=True``, its router load-balancing loss."""

    logps: torch.Tensor
    avg_logps: torch.Tensor
    aux_loss: torch.Tensor | None = None


def _router_aux_loss(model: Any, outputs: Any, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The load-balancing loss a HF MoE model adds in its own forward, from the backbone's router logits: the
    model's module defines it (``load_balancing_loss_func``); None where that or the router logits are absent."""
    import sys

    compute = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    router_logits = getattr(outputs, "router_logits", None)
    experts, top_k = getattr(model, "num_experts", None), getattr(model, "num_experts_per_tok", None)
    if compute is None or router_logits is None or experts is None or top_k is None:
        return None
    return compute(router_logits, experts, top_k, attention_mask)


def _logit_transform(model: Any) -> str | None:
    """What the model's forward may do to the logits after the LM head matmul, as ``"name=value"`` from its
    config (or its text config), or None when the head is a plain linear map the fused kernel reproduces."""
    if type(model).__name__ in _PLAIN_HEAD_CLASSES:
        return None
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        for name in _LOGIT_TRANSFORMS:
            value = getattr(config, name, None)
            if value not in (None, 1, 1.0):
                return f"{name}={value}"
    return None


def _fused_head_applies(model: Any) -> bool:
    """Whether napo's fused kernel computes what ``model``'s own LM head computes; where not, says so (once per
    model class and reason) and the patched forward scores the model's own logits."""
    transform = _logit_transform(model)
    if transform is None:
        return True
    told = (type(model).__name__, transform)
    if told not in _TOLD_OWN_HEAD:
        _TOLD_OWN_HEAD.add(told)
        warnings.warn(
            f"napo: {told[0]} changes its logits after the LM head ({transform}), which napo's fused LM-head "
            "kernel does not reproduce; its sequence log-probs come from the model's own logits instead (the same "
            "numbers, with the [batch, tokens, vocabulary] logits in memory)",
            stacklevel=3,
        )
    return False


def _plain_weight(weight: torch.Tensor) -> bool:
    """Whether the LM head weight, read inside the head's forward, is a whole ordinary tensor the fused kernel
    can take. There DeepSpeed ZeRO-3 has gathered its shards and FSDP2 has swapped in the unsharded tensor;
    a DTensor still (tensor parallelism) or an empty shard is read through the head's own forward instead."""
    return type(weight).__name__ != "DTensor" and weight.dim() == 2 and weight.numel() > 0


def _head_logps(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int | None):
    """``(logps, avg_logps)`` of ``labels`` under ``head(hidden)``, computed inside a call of the head module.

    The fused kernel runs as the head's forward (swapped in for this one call), so whatever the engine hooks on
    the head runs around it as around the matmul it replaces: DeepSpeed ZeRO-3 gathers the partitioned weight
    before, re-gathers it for the backward (its pre-backward hook sits on this call's outputs) and
    reduce-scatters the weight gradient; FSDP2 unshards and reshards a separately wrapped head the same way.
    The kernel saves the weight parameter itself for the backward, not a copy, so the backward reads the
    re-gathered data and its gradient lands in the parameter the engine reduces."""
    own_forward = head.forward
    shadowed = vars(head).get("forward")  # a forward already set on the instance (another patch) comes back after

    def fused_forward(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = head.weight, head.bias
        if not _plain_weight(weight):
            return sequence_logps(own_forward(hidden), labels.to(hidden.device))
        if torch.is_autocast_enabled(hidden.device.type):  # mixed precision: the head runs in the autocast dtype
            dtype = torch.get_autocast_dtype(hidden.device.type)
        else:
            dtype = weight.dtype
        hidden, weight = hidden.to(weight.device, dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        return fused_linear_sequence_logps(hidden, weight, labels.to(hidden.device), bias=bias, chunk_size=chunk_size)

    # A plain tuple out: DeepSpeed rebuilds the outputs it hooks with their own type, which a NamedTuple refuses.
    head.forward = fused_forward
    try:
        return head(hidden, labels)
    finally:
        if shadowed is None:
            del head.forward
        else:
            head.forward = shadowed


def add_napo_lm_head(model: Any, chunk_size: int | None = None) -> Any:
    """Adds the ``napo_logps=True`` mode to ``model.forward`` (in place; returns the model).

    With ``napo_logps=True`` and ``labels`` (``[N, T]``, ``-100`` where a token does not count; the
    usual causal shift), the forward returns :class:`SequenceLogps`. Without it the forward is the
    model's own (generation is unchanged). Patch the base model before wrapping it with PEFT.
    Calling it twice is harmless. ``chunk_size``: token rows per LM-head chunk; None: chosen for the
    device (see :func:`napo.fused_linear_sequence_logps`).
    """
    if getattr(model, "_napo_lm_head", False):
        return model
    original_forward = model.forward
    fused = _fused_head_applies(model)

    @functools.wraps(type(model).forward)
    def forward(self, *args, napo_logps: bool = False, labels: torch.Tensor | None = None, **kwargs):
        if not napo_logps:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        if labels is None:
            raise ValueError("napo_logps=True needs labels (-100 where a token does not count)")
        kwargs["use_cache"] = False

        def through_the_models_logits() -> SequenceLogps:
            outputs = original_forward(*args, **kwargs)
            logits = outputs.logits[:, -labels.shape[1] :]  # prompt-learning PEFT prepends virtual tokens
            return SequenceLogps(*sequence_logps(logits, labels.to(logits.device)), getattr(outputs, "aux_loss", None))

        if not fused:
            return through_the_models_logits()
        outputs = self.base_model(*args, **kwargs)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, outputs, kwargs.get("attention_mask"))
            if aux_loss is None:  # a MoE layout napo does not know: the model's own forward computes it
                return through_the_models_logits()
        hidden = outputs.last_hidden_state[:, -labels.shape[1] :]
        logps, avg_logps = _head_logps(self.get_output_embeddings(), hidden, labels, chunk_size)
        return SequenceLogps(logps, avg_logps, aux_loss)

    model.forward = forward.__get__(model)
    model._napo_lm_head = True
    return model


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The collated batch minus what is not a model input (masks of the loss, cached reference columns)."""
    return {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS and not k.startswith("ref_")}


def completion_logps(
    model: Any,
    batch: dict[str, Any],
    columns: Sequence[str],
    inputs: dict[str, Any] | None = None,
    *,
    return_aux_loss: bool = False,
) -> Any:
    """One forward over a collated K-completion batch; per column, the ``[B]`` log-prob sums and averages.

    ``model`` must have :func:`add_napo_lm_head` (possibly under a DDP/PEFT wrapper). With
    ``return_aux_loss=True``: ``(per column, the forward's MoE router loss or None)``.
    """
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(**(model_inputs(batch) if inputs is None else inputs), labels=labels, napo_logps=True)
    sums = out.logps.chunk(len(columns), dim=0)
    avgs = out.avg_logps.chunk(len(columns), dim=0)
    per_column = {column: SequenceLogps(s, a) for column, s, a in zip(columns, sums, avgs, strict=True)}
    return (per_column, out.aux_loss) if return_aux_loss else per_column
