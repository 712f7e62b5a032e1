"""Sequence log-probs of preference answers: the memory and speed hot path of the training step.

What TRL computes with ``log_softmax`` + ``gather`` (``selective_log_softmax``), in one read
of the logits and without any [B, T, V] temporary; or, with the LM head fused in, without ever
holding the [B, T, V] logits at all.

Conventions (TRL's and the paper's code): causal shift, the logits at position t score the label
at t + 1; labels equal to ``ignore_index`` do not count; ``avg_logps = logps / n_tokens``. A
sequence with no counted token gets ``logps = avg_logps = 0`` (a NaN there would poison the
batch-mean margin behind q). NaN or inf in the logits give NaN for that sequence.
"""

from __future__ import annotations

import torch

__all__ = ["fused_linear_sequence_logps", "sequence_logps"]

_LOGITS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_labels_tensor(labels: object, batch: int, time: int, device: torch.device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 (torch.long), got {labels.dtype}")
    if tuple(labels.shape) != (batch, time):
        raise ValueError(f"labels must have shape [batch, time] = {(batch, time)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")
    return labels


def _check_float(name: str, tensor: object, dims: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {tensor.dtype}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(tensor.shape)}")
    return tensor


def _check_ignore_index(ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def _shares_memory_internally(tensor: torch.Tensor) -> bool:
    """True unless the strides prove that no two elements share memory: sorted by stride, each
    dimension steps past everything the smaller ones span (true of any contiguous, sliced or
    permuted tensor; false of an expanded one)."""
    if tensor.numel() <= 1:
        return False
    dims = sorted((abs(stride), size) for stride, size in zip(tensor.stride(), tensor.shape, strict=True) if size > 1)
    span = 0
    for stride, size in dims:
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _sequence_sums(
    token_logps: torch.Tensor, aligned_labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    counts = (aligned_labels != ignore_index).sum(-1)
    logps = token_logps.sum(-1)
    return logps, logps / counts.clamp(min=1).to(logps.dtype)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and average log-probs of each labelled sequence, from LM logits.

    Formula:
        logps[b] = sum_{t : labels[b, t+1] != ignore_index} log_softmax(logits[b, t])[labels[b, t+1]]
        avg_logps[b] = logps[b] / n_tokens[b]   (0 when n_tokens[b] == 0)

    The forward reads the logits once (online log-sum-exp in C/CUDA) and saves only the logits,
    the labels and a [B, T-1] log-sum-exp; the backward writes the logits gradient in one pass.

    Args:
        logits: ``[B, T, V]`` float32, bfloat16, float16 (accumulated in float32) or float64; any strides.
        labels: ``[B, T]`` int64; values in ``[0, V)`` or ``ignore_index``. Others raise ValueError.
        ignore_index: the label of positions that do not count (prompt, padding).
        inplace_backward: reuse the logits buffer for its own gradient (as Liger-Kernel does), saving
            a [B, T, V] allocation. Only for callers that no longer need the logits: after backward
            they hold the gradient. Logits whose elements share memory (``expand``) raise ValueError.
    Returns:
        ``(logps, avg_logps)``, each ``[B]`` float32 (float64 for float64 logits), differentiable.
    """
    _check_float("logits", logits, 3)
    batch, time, vocab = logits.shape
    if time < 1 or vocab < 1:
        raise ValueError(f"logits must have at least one position and one vocabulary entry, got {tuple(logits.shape)}")
    _check_labels_tensor(labels, batch, time, logits.device)
    ignore_index = _check_ignore_index(ignore_index)
    if inplace_backward and _shares_memory_internally(logits):
        # Each position's gradient would overwrite the others' where their memory is shared.
        raise ValueError(
            "inplace_backward=True needs logits whose memory does not overlap, got shape "
            f"{tuple(logits.shape)} with strides {logits.stride()} (an expanded tensor?); pass "
            "logits.contiguous() or use inplace_backward=False"
        )
    token, _ = torch.ops.napo.token_logps(logits, labels, ignore_index, 1, bool(inplace_backward))
    return _sequence_sums(token, labels[:, 1:], ignore_index)


def fused_linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs straight from the last hidden states and the LM head, never holding [B, T, V].

    Formula: as :func:`sequence_logps` with ``logits = hidden @ weight.T + bias``.

    Counted positions are processed ``chunk_size`` tokens at a time: one matmul, then napo's
    token kernel; the backward recomputes each chunk's logits (one extra matmul) and accumulates
    the hidden, weight and bias gradients. Peak extra memory is one [chunk_size, V] block plus the
    weight gradient.

    Args:
        hidden: ``[B, T, H]`` last hidden states (float32, bfloat16, float16 or float64).
        weight: ``[V, H]`` LM head weight, same dtype and device.
        labels: ``[B, T]`` int64, as for :func:`sequence_logps`.
        bias: optional ``[V]``.
        ignore_index: the label of positions that do not count.
        chunk_size: tokens per chunk, >= 1. None (default) picks it from the device: 256 on the
            CPU (a chunk's logits are 31 MiB in float32 for V = 32000); on CUDA 1024-4096, as many
            as fit in 1/64 of the device's memory (``napo.backends.fused_linear.choose_chunk_size``).
    Returns:
        ``(logps, avg_logps)``, each ``[B]`` float32 (float64 for float64 inputs), differentiable
        w.r.t. hidden, weight and bias.
    """
    _check_float("hidden", hidden, 3)
    _check_float("weight", weight, 2)
    batch, time, width = hidden.shape
    if weight.shape[1] != width:
        raise ValueError(f"weight must be [V, H] with H = {width} (hidden's last dimension), got {tuple(weight.shape)}")
    if width < 1:
        raise ValueError(
            f"hidden must have a hidden size H >= 1, got hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1 or time < 1:
        raise ValueError(f"need V >= 1 and T >= 1, got weight {tuple(weight.shape)} and hidden {tuple(hidden.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but hidden has {hidden.dtype}")
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_labels_tensor(labels, batch, time, hidden.device)
    ignore_index = _check_ignore_index(ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    # The op's chunk_size 0 means "the device's default", resolved by the backend.
    chunk = 0 if chunk_size is None else chunk_size
    token, _ = torch.ops.napo.fused_linear_token_logps(hidden, weight, bias, labels, ignore_index, 1, chunk)
    return _sequence_sums(token, labels[:, 1:], ignore_index)
