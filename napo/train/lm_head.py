"""Sequence log-probs straight from a HuggingFace model, through napo's fused LM-head kernel.

:func:`add_napo_lm_head` patches ``model.forward`` (as TRL patches its own fused head) so that
``model(..., labels=labels, napo_logps=True)`` runs the backbone, then
:func:`napo.fused_linear_sequence_logps` on the last hidden states and the LM head weight: the
``[B, T, V]`` logits never exist. Patching the forward, rather than calling the backbone from the
trainer, keeps DDP / FSDP / DeepSpeed wrappers in the call path. Models whose logits are scaled or
soft-capped after the head (Gemma 2, Cohere, Granite, ...), and heads sharded by DeepSpeed ZeRO-3 or
FSDP2, go through the model's own forward and napo's token kernel on the logits instead (correct,
but the logits are then materialised).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from napo.logps import fused_linear_sequence_logps, sequence_logps

__all__ = ["SequenceLogps", "add_napo_lm_head", "completion_logps", "model_inputs"]

# Config attributes that change the logits after the LM head matmul; the fused path cannot apply them.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
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


def _fused_head_applies(model: Any) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


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
