"""The LM head fused with the sequence log-probs, in token chunks (all devices).

Only the positions whose label counts are scored (prompt and padding tokens
never reach the matmul). For each chunk of them the logits [chunk, V] come from
one matmul (torch/BLAS, cuBLAS on GPU), the log-sum-exp and the label's
log-prob from napo's token kernel (C or CUDA); the backward recomputes the
chunk's logits, turns them in place into their gradient with the same kernel
and accumulates the hidden, weight and bias gradients. At most one
[chunk, V] block of logits exists at a time, never [B, T, V]. Chunks are over
tokens, not sequences, so nothing batch-level is needed inside a chunk: q and
the weights are computed afterwards from the returned log-probs.
"""

from __future__ import annotations

import torch

from napo._ops import LSE_DTYPE, accumulation_dtype
from napo.backends import label_check

CPU_CHUNK_ROWS = 256
GPU_CHUNK_ROWS = (1024, 4096)
GPU_CHUNK_BUDGET_FRACTION = 1 / 64  # of the device's memory, for one chunk's [chunk, V] blocks


def choose_chunk_size(device_type: str, vocab: int, itemsize: int, device_memory: int | None = None) -> int:
    """Tokens per chunk of the fused head when the caller gives none.

    CPU: 256 (a chunk's logits stay cache-friendly and BLAS is already efficient at that size). CUDA:
    as many rows as fit in 1/64 of the device's memory, counting per row the logits in their dtype
    plus a float32 copy (the weight gradient's upcast where torch has no float32-output matmul),
    rounded down to a multiple of 256 and kept within 1024-4096: below ~1k rows the bf16 matmuls
    sit under the tensor cores' ridge point and the token kernel gets too few rows to fill an
    H100/H200; above 4k the logits block grows with nothing left to gain.
    """
    if device_type != "cuda":
        return CPU_CHUNK_ROWS
    low, high = GPU_CHUNK_ROWS
    if not device_memory:
        return low
    rows = int(device_memory * GPU_CHUNK_BUDGET_FRACTION) // (vocab * (itemsize + 4))
    return max(low, min(high, rows // 256 * 256))


def default_chunk_size(weight: torch.Tensor) -> int:
    """choose_chunk_size for the LM head ``weight`` [V, H] on its device."""
    memory = None
    if weight.device.type == "cuda":
        memory = torch.cuda.get_device_properties(weight.device).total_memory
    return choose_chunk_size(weight.device.type, weight.shape[0], weight.element_size(), memory)


def _counted_rows(
    labels: torch.Tensor, ignore_index: int, shift: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The counted positions as flat indices into [B * (T - shift)] (the outputs) and into [B * T]
    (the hidden rows), and their labels."""
    time = labels.shape[1]
    scored = time - shift
    aligned = labels[:, shift:].reshape(-1)
    rows = (aligned != ignore_index).nonzero().squeeze(-1)
    hidden_rows = rows // scored * time + rows % scored if scored > 0 else rows
    return rows, hidden_rows, aligned.index_select(0, rows)


def _chunk_logits(
    hidden_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor
) -> torch.Tensor:
    """hidden_rows @ weight.T (+ bias) written into the front of one reused [chunk, V] buffer: one
    allocation per call instead of one per chunk (which allocators tend to keep around)."""
    logits = buffer[: hidden_rows.shape[0]]
    if bias is not None:
        return torch.addmm(bias, hidden_rows, weight.t(), out=logits)
    return torch.mm(hidden_rows, weight.t(), out=logits)


def _logits_buffer(rows: int, chunk_size: int, weight: torch.Tensor) -> torch.Tensor:
    return weight.new_empty((min(rows, chunk_size), weight.shape[0]))


def _check_labels_once(labels: torch.Tensor, vocab: int, ignore_index: int, shift: int) -> torch.Tensor | None:
    """The batch's labels, checked once before chunking: by the C check on the CPU (no sync); on CUDA
    a flag read after _counted_rows' nonzero, the sync the fused head needs anyway (see label_check)."""
    aligned = labels[:, shift:]
    if not label_check.on_cuda(labels):
        from napo._native import native

        native().check_labels(aligned, vocab, ignore_index, shift)
        return None
    return label_check.pending_flag(aligned, vocab, ignore_index) if label_check.enabled(labels) else None


_HALF_DTYPES = (torch.bfloat16, torch.float16)
_fp32_out_matmul: dict[tuple[str, torch.dtype], bool] = {}


def _has_fp32_out_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch can multiply ``dtype`` matrices into a float32 output accumulated in float32
    (addmm's out_dtype, CUDA in torch >= 2.9: tensor cores, no float32 copies). Tried once per
    device type and dtype; CPU kernels do not have it yet."""
    key = (device.type, dtype)
    if key not in _fp32_out_matmul:
        try:
            acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
            ones = torch.ones(2, 2, dtype=dtype, device=device)
            torch.addmm(acc, ones, ones, out_dtype=torch.float32, out=acc)
            _fp32_out_matmul[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _fp32_out_matmul[key] = False
    return _fp32_out_matmul[key]


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden_rows: torch.Tensor) -> None:
    """grad_weight (float32/64) += grad_logits.T @ hidden_rows, accumulated in grad_weight's dtype.
    Half-precision inputs are multiplied as they are where torch can accumulate them into float32
    (tensor cores, and no [V, chunk] float32 copy of the logits); otherwise both are upcast."""
    half = grad_logits.dtype in _HALF_DTYPES and grad_weight.dtype == torch.float32
    if half and _has_fp32_out_matmul(grad_logits.device, grad_logits.dtype):
        torch.addmm(grad_weight, grad_logits.t(), hidden_rows, out_dtype=torch.float32, out=grad_weight)
        return
    grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), hidden_rows.to(grad_weight.dtype))


def fused_linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    shift: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, time, width = hidden.shape
    scored = time - shift
    chunk_size = chunk_size if chunk_size > 0 else default_chunk_size(weight)
    bad_label = _check_labels_once(labels, weight.shape[0], ignore_index, shift)
    token = torch.zeros(batch * scored, dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
    lse = torch.zeros_like(token, dtype=LSE_DTYPE)
    rows, hidden_index, row_labels = _counted_rows(labels, ignore_index, shift)  # the call's one sync
    if bad_label is not None and bool(bad_label):
        label_check.host_check(labels[:, shift:], weight.shape[0], ignore_index, shift)  # raises, naming it
    flat_hidden = hidden.reshape(-1, width)
    buffer = _logits_buffer(rows.numel(), chunk_size, weight)
    with torch.no_grad(), label_check.already_checked():  # the chunks' labels are the batch's, checked
        for start in range(0, rows.numel(), chunk_size):
            index = rows[start : start + chunk_size]
            chunk_hidden = flat_hidden.index_select(0, hidden_index[start : start + chunk_size])
            logits = _chunk_logits(chunk_hidden, weight, bias, buffer)
            chunk_token, chunk_lse = torch.ops.napo.token_logps(
                logits.unsqueeze(0), row_labels[start : start + chunk_size].unsqueeze(0), ignore_index, 0, False
            )
            token[index] = chunk_token.squeeze(0)
            lse[index] = chunk_lse.squeeze(0)
    return token.view(batch, scored), lse.view(batch, scored)


def fused_linear_token_logps_backward(
    grad_token: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, time, width = hidden.shape
    chunk_size = chunk_size if chunk_size > 0 else default_chunk_size(weight)  # as in the forward
    rows, hidden_index, row_labels = _counted_rows(labels, ignore_index, shift)
    flat_hidden = hidden.reshape(-1, width)
    flat_grad, flat_lse = grad_token.reshape(-1), lse.reshape(-1)
    grad_hidden = torch.zeros(batch, time, width, dtype=hidden.dtype, device=hidden.device)
    grad_rows = grad_hidden.view(-1, width)
    # Accumulated over chunks in float32 (or float64), cast once at the end.
    acc = accumulation_dtype(weight.dtype)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_bias = torch.zeros(bias.shape, dtype=acc, device=weight.device) if bias is not None else None
    buffer = _logits_buffer(rows.numel(), chunk_size, weight)
    with torch.no_grad():
        for start in range(0, rows.numel(), chunk_size):
            index = rows[start : start + chunk_size]
            chunk_rows = hidden_index[start : start + chunk_size]
            chunk_hidden = flat_hidden.index_select(0, chunk_rows)
            logits = _chunk_logits(chunk_hidden, weight, bias, buffer)
            torch.ops.napo.token_logps_backward_inplace(
                flat_grad.index_select(0, index).unsqueeze(0).contiguous(),
                logits.unsqueeze(0),
                row_labels[start : start + chunk_size].unsqueeze(0),
                flat_lse.index_select(0, index).unsqueeze(0).contiguous(),
                ignore_index,
                0,
            )  # logits now hold d logps / d logits
            grad_rows.index_copy_(0, chunk_rows, (logits @ weight).to(hidden.dtype))
            _accumulate_weight_grad(grad_weight, logits, chunk_hidden)
            if grad_bias is not None:
                grad_bias += logits.sum(0, dtype=acc)
    empty = weight.new_empty((0,))
    return (
        grad_hidden,
        grad_weight.to(weight.dtype),
        grad_bias.to(bias.dtype) if grad_bias is not None and bias is not None else empty,
    )
