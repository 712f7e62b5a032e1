"""C (CPU) and CUDA C kernels of napo's ops, called through ``napo._C``.

Tensors cross into C as DLPack capsules made by ``torch.utils.dlpack.to_dlpack``
(detached: the op's autograd is registered separately, and DLPack refuses
tensors that require grad). The capsule path skips the two Python-level
``__dlpack__``/``__dlpack_device__`` calls per tensor and never synchronises
streams. Outputs are allocated here, by torch, so that on CUDA they come from
the caching allocator and a graph capture sees only kernel launches on the
current stream. A CUDA tensor on a build without CUDA kernels falls back to the
reference kernels, with one warning; so does every CUDA tensor when the CUDA runtime napo links
cannot start (a driver older than that runtime).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.dlpack import to_dlpack

from napo._native import env_flag, native
from napo._ops import LSE_DTYPE, accumulation_dtype
from napo.backends import label_check, reference


def _capsule(tensor: torch.Tensor) -> Any:
    return to_dlpack(tensor.detach())


def _launch(tensor: torch.Tensor) -> dict[str, int]:
    """The stream to launch on: the current one of the tensor's device (the kernels set the device)."""
    if tensor.device.type != "cuda":
        return {}
    return {"stream": torch.cuda.current_stream(tensor.device).cuda_stream}


# Why CUDA tensors cannot use napo's CUDA kernels in this process (None: they can), decided once.
_cuda_problem: str | None = None
_cuda_checked = False
_warned_cuda_fallback = False


def _find_cuda_problem() -> str | None:
    """None when napo's CUDA kernels can run here; otherwise why not and what to do, for the warning."""
    module = native()
    if not module.built_with_cuda():
        return (
            "napo was built without CUDA kernels (no nvcc at build time). Reinstall with nvcc on PATH "
            "(NAPO_CUDA=1) for the fused kernels."
        )
    if module.cuda_available():
        return None
    info = module.cuda_runtime_info() or {}
    runtime, driver = info.get("runtime_version", 0), info.get("driver_version", 0)
    built = f"{runtime // 1000}.{runtime % 1000 // 10}"
    supports = f"CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else "no CUDA (no driver found)"
    return (
        f"napo's CUDA kernels cannot start: {info.get('error') or 'no CUDA device visible to them'}. They link "
        f"the CUDA {built} runtime statically, and this machine's driver supports {supports}; torch uses CUDA "
        f"{torch.version.cuda}. Rebuild napo with a CUDA toolkit no newer than the driver (the major version "
        f"torch reports) on PATH: pip install --no-build-isolation --force-reinstall ."
    )


def _cuda_fallback(tensor: torch.Tensor) -> bool:
    """True when a CUDA tensor must take the pure-PyTorch path: no CUDA kernels built, or the CUDA
    runtime they link cannot start here (e.g. a driver older than that runtime). One warning per
    process. The first CUDA call also applies NAPO_CUDA_DEBUG."""
    global _cuda_problem, _cuda_checked, _warned_cuda_fallback
    if tensor.device.type != "cuda":
        return False
    if not _cuda_checked:
        _cuda_problem = _find_cuda_problem()
        if _cuda_problem is None:
            native().set_cuda_debug(cuda_debug_requested())
        _cuda_checked = True
    if _cuda_problem is None:
        return False
    if not _warned_cuda_fallback:
        _warned_cuda_fallback = True
        warnings.warn(
            f"{_cuda_problem} Until then CUDA tensors use napo's pure-PyTorch implementation (slower, same results).",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def cuda_debug_requested() -> bool:
    """NAPO_CUDA_DEBUG=1: napo synchronises and checks for errors after each of its CUDA kernels, so a
    fault is reported by the call that caused it (and one pending from earlier work is named as not
    napo's). Read on the first CUDA call; ``native().set_cuda_debug`` changes it later."""
    return env_flag("NAPO_CUDA_DEBUG", False)


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


# ---- sequence log-probs ----


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: int, inplace_backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if _cuda_fallback(logits):
        return reference.token_logps(logits, labels, ignore_index, shift, inplace_backward)
    scored = logits.shape[1] - shift
    token = logits.new_empty((logits.shape[0], scored), dtype=accumulation_dtype(logits.dtype))
    lse = torch.empty_like(token, dtype=LSE_DTYPE)
    aligned = labels[:, shift:]
    # The CUDA kernel never reads out of bounds (a bad label gives NaN), but the ValueError that
    # names the label needs the host: one sync per call, or none (see label_check). The C kernel
    # checks CPU labels itself.
    label_check.check_on_device(aligned, logits.shape[-1], ignore_index, shift)
    native().token_logps(
        _capsule(logits[:, :scored]), _capsule(aligned), ignore_index, _capsule(token), _capsule(lse),
        num_threads=torch.get_num_threads(), position_offset=shift, **_launch(logits),
    )  # fmt: skip
    return token, lse


def _token_backward_into(out: torch.Tensor, grad_token, logits, labels, lse, ignore_index: int, shift: int) -> None:
    scored = logits.shape[1] - shift
    native().token_logps_backward(
        _capsule(logits[:, :scored]), _capsule(labels[:, shift:]), ignore_index, _capsule(lse),
        _capsule(grad_token.contiguous()), _capsule(out[:, :scored]), num_threads=torch.get_num_threads(),
        **_launch(logits),
    )  # fmt: skip
    if shift:
        out[:, scored:].zero_()  # positions with no label to score (the last one, causally)


def token_logps_backward(
    grad_token: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: int,
) -> torch.Tensor:
    if _cuda_fallback(logits):
        return reference.token_logps_backward(grad_token, logits, labels, lse, ignore_index, shift)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _token_backward_into(out, grad_token, logits, labels, lse, ignore_index, shift)
    return out


def token_logps_backward_inplace(
    grad_token: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: int,
) -> None:
    if _cuda_fallback(logits):
        return reference.token_logps_backward_inplace(grad_token, logits, labels, lse, ignore_index, shift)
    _token_backward_into(logits, grad_token, logits, labels, lse, ignore_index, shift)
    return None
