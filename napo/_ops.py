"""Schemas, fake (meta) kernels and autograd of napo's custom ops.

No maths here: the pure-PyTorch kernels live in ``backends/reference.py`` (the
default for every device, and the test oracle) and the C/CUDA kernels in
``backends/native.py`` (registered for CPU and CUDA). The ops are low-level: float32/float64
tensors; the loss takes margins ``[B]`` with a 0-dim q, or ``[K, B]`` (one term per
row) with q ``[K]``, and returns the loss and dL/dmargins (computed together: the
backward is one multiply); ``q_from_mean`` is elementwise over 0-dim or ``[K]`` means.
The user-facing checks and dtype promotion are in ``napo.functional``.
"""

from __future__ import annotations

import torch

LIBRARY = "napo"

# Kept referenced for the process lifetime: dropping the Library object unregisters the schemas.
_lib = torch.library.Library(LIBRARY, "DEF")
_lib.define("napo_loss(Tensor margins, Tensor q, float beta) -> (Tensor loss, Tensor grad_factor)")
_lib.define("napo_loss_backward(Tensor grad_loss, Tensor grad_factor) -> Tensor")
_lib.define("adaptive_q(Tensor margins, float gamma, float q_min, float q_max) -> Tensor")
_lib.define("q_from_mean(Tensor means, float gamma, float q_min, float q_max) -> Tensor")
_lib.define("dynamic_weights(Tensor reward_margins, float w_min, float eps) -> Tensor")

OP_NAMES = ("napo_loss", "napo_loss_backward", "adaptive_q", "q_from_mean", "dynamic_weights")


@torch.library.register_fake("napo::napo_loss")
def _napo_loss_fake(margins: torch.Tensor, q: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return margins.new_empty(margins.shape), margins.new_empty(margins.shape)


@torch.library.register_fake("napo::napo_loss_backward")
def _napo_loss_backward_fake(grad_loss: torch.Tensor, grad_factor: torch.Tensor) -> torch.Tensor:
    return grad_factor.new_empty(grad_factor.shape)


@torch.library.register_fake("napo::adaptive_q")
def _adaptive_q_fake(margins: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    return margins.new_empty(())


@torch.library.register_fake("napo::q_from_mean")
def _q_from_mean_fake(means: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    return means.new_empty(means.shape)


@torch.library.register_fake("napo::dynamic_weights")
def _dynamic_weights_fake(reward_margins: torch.Tensor, w_min: float, eps: float) -> torch.Tensor:
    return reward_margins.new_empty(reward_margins.shape)


def _napo_loss_setup_context(ctx, inputs, output) -> None:
    _, grad_factor = output
    ctx.mark_non_differentiable(grad_factor)
    ctx.save_for_backward(grad_factor)


def _napo_loss_backward(ctx, grad_loss: torch.Tensor, _grad_of_grad_factor: torch.Tensor | None):
    (grad_factor,) = ctx.saved_tensors
    # The backward is an op of its own (C on CPU/CUDA); its own backward raises
    # (below) rather than silently dropping the second derivative.
    grad_margins = torch.ops.napo.napo_loss_backward(grad_loss, grad_factor)
    # q is a constant of the objective (spec: computed without gradient).
    return grad_margins, None, None


torch.library.register_autograd("napo::napo_loss", _napo_loss_backward, setup_context=_napo_loss_setup_context)


def _no_double_backward_setup_context(ctx, inputs, output) -> None:
    pass


def _no_double_backward(ctx, grad_output: torch.Tensor):
    raise RuntimeError("napo::napo_loss does not support double backward (create_graph=True through the loss gradient)")


torch.library.register_autograd(
    "napo::napo_loss_backward", _no_double_backward, setup_context=_no_double_backward_setup_context
)
