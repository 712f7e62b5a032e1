"""C (CPU) and CUDA C kernels of napo's ops, called through ``napo._C``.

Tensors cross into C as DLPack capsules made by ``torch.utils.dlpack.to_dlpack``
(detached: the op's autograd is registered separately, and DLPack refuses
tensors that require grad). The capsule path skips the two Python-level
``__dlpack__``/``__dlpack_device__`` calls per tensor and never synchronises
streams. Outputs are allocated here, by torch, so that on CUDA they come from
the caching allocator and a graph capture sees only kernel launches on the
current stream. A CUDA tensor on a build without CUDA kernels falls back to the
reference kernels, with one warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.dlpack import to_dlpack

from napo._native import native
from napo.backends import reference


def _capsule(tensor: torch.Tensor) -> Any:
    return to_dlpack(tensor.detach())


def _launch(tensor: torch.Tensor) -> dict[str, int]:
    """The stream to launch on: the current one of the tensor's device (the kernels set the device)."""
    if tensor.device.type != "cuda":
        return {}
    return {"stream": torch.cuda.current_stream(tensor.device).cuda_stream}


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


def napo_loss(margins: torch.Tensor, q: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _cuda_fallback(margins):
        return reference.napo_loss(margins, q, beta)
    loss, grad_factor = margins.new_empty(margins.shape), margins.new_empty(margins.shape)
    native().loss_forward(
        _capsule(margins), _capsule(q), beta, _capsule(loss), _capsule(grad_factor), **_launch(margins)
    )
    return loss, grad_factor


def napo_loss_backward(grad_loss: torch.Tensor, grad_factor: torch.Tensor) -> torch.Tensor:
    if _cuda_fallback(grad_factor):
        return reference.napo_loss_backward(grad_loss, grad_factor)
    out = grad_factor.new_empty(grad_factor.shape)
    native().loss_backward(_capsule(grad_loss), _capsule(grad_factor), _capsule(out), **_launch(grad_factor))
    return out


def adaptive_q(margins: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    if _cuda_fallback(margins):
        return reference.adaptive_q(margins, gamma, q_min, q_max)
    out = margins.new_empty(())
    native().adaptive_q(_capsule(margins), gamma, q_min, q_max, _capsule(out), **_launch(margins))
    return out


def q_from_mean(means: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    if _cuda_fallback(means):
        return reference.q_from_mean(means, gamma, q_min, q_max)
    out = means.new_empty(means.shape)
    native().q_from_mean(_capsule(means), gamma, q_min, q_max, _capsule(out), **_launch(means))
    return out


def dynamic_weights(reward_margins: torch.Tensor, w_min: float, eps: float) -> torch.Tensor:
    if _cuda_fallback(reward_margins):
        return reference.dynamic_weights(reward_margins, w_min, eps)
    out = reward_margins.new_empty(reward_margins.shape)
    native().dynamic_weights(_capsule(reward_margins), w_min, eps, _capsule(out), **_launch(reward_margins))
    return out
