"""C (CPU) and CUDA C kernels of napo's ops, called through ``napo._C``.

Tensors cross into C through DLPack (detached: the op's autograd is
registered separately, and DLPack refuses tensors that require grad); outputs are allocated here, by torch,
so that on CUDA they come from the caching allocator and a graph capture sees
only kernel launches on the current stream. A CUDA tensor on a build without
CUDA kernels falls back to the reference kernels, with one warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from napo._native import native
from napo.backends import reference


@contextlib.contextmanager
def _launch_context(tensor: torch.Tensor) -> Iterator[dict[str, Any]]:
    """Guards the tensor's CUDA device and yields the stream to launch on."""
    if tensor.device.type != "cuda":
        yield {}
        return
    with torch.cuda.device(tensor.device):
        yield {"stream": torch.cuda.current_stream(tensor.device).cuda_stream}


_warned_no_cuda_kernels = False


def _cuda_fallback(tensor: torch.Tensor) -> bool:
    """True when a CUDA tensor must take the reference path (no CUDA kernels built)."""
    global _warned_no_cuda_kernels
    if tensor.device.type != "cuda" or native().built_with_cuda():
        return False
    if not _warned_no_cuda_kernels:
        _warned_no_cuda_kernels = True
        warnings.warn(
            "napo was built without CUDA kernels (no nvcc at build time); CUDA tensors use the pure-PyTorch "
            "implementation. Reinstall with nvcc on PATH (NAPO_CUDA=1) for the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def napo_loss(margins: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    if _cuda_fallback(margins):
        return reference.napo_loss(margins, q, beta)
    out = margins.new_empty(margins.shape)
    with _launch_context(margins) as launch:
        native().loss_forward(margins.detach(), q.detach(), beta, out, **launch)
    return out


def napo_loss_backward(grad_loss: torch.Tensor, margins: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    if _cuda_fallback(margins):
        return reference.napo_loss_backward(grad_loss, margins, q, beta)
    out = margins.new_empty(margins.shape)
    with _launch_context(margins) as launch:
        native().loss_backward(grad_loss.detach(), margins.detach(), q.detach(), beta, out, **launch)
    return out


def adaptive_q(margins: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    if _cuda_fallback(margins):
        return reference.adaptive_q(margins, gamma, q_min, q_max)
    out = margins.new_empty(())
    with _launch_context(margins) as launch:
        native().adaptive_q(margins.detach(), gamma, q_min, q_max, out, **launch)
    return out


def q_from_mean(mean: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    if _cuda_fallback(mean):
        return reference.q_from_mean(mean, gamma, q_min, q_max)
    out = mean.new_empty(())
    with _launch_context(mean) as launch:
        native().q_from_mean(mean.detach(), gamma, q_min, q_max, out, **launch)
    return out


def dynamic_weights(reward_margins: torch.Tensor, w_min: float, eps: float) -> torch.Tensor:
    if _cuda_fallback(reward_margins):
        return reference.dynamic_weights(reward_margins, w_min, eps)
    out = reward_margins.new_empty(reward_margins.shape)
    with _launch_context(reward_margins) as launch:
        native().dynamic_weights(reward_margins.detach(), w_min, eps, out, **launch)
    return out
