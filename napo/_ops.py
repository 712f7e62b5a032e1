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

# Sequence log-probs: logits[b, t] is scored against labels[b, t + shift] for t < T - shift
# (shift = 1 is the causal-LM convention). token_logps is [B, T - shift] float32 (float64 for
# float64 logits), lse [B, T - shift] float64 (the backward's exp(x - lse) needs it unrounded);
# both 0 at ignored positions.
_lib.define(
    "token_logps(Tensor logits, Tensor labels, int ignore_index, int shift, bool inplace_backward)"
    " -> (Tensor token_logps, Tensor lse)"
)
_lib.define(
    "token_logps_backward(Tensor grad_token, Tensor logits, Tensor labels, Tensor lse, int ignore_index, int shift)"
    " -> Tensor"
)
_lib.define(
    "token_logps_backward_inplace(Tensor grad_token, Tensor(a!) logits, Tensor labels, Tensor lse,"
    " int ignore_index, int shift) -> ()"
)
# The LM head fused in: hidden [B, T, H] @ weight[V, H].T (+ bias) in token chunks, never [B, T, V] at once.
_lib.define(
    "fused_linear_token_logps(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index,"
    " int shift, int chunk_size) -> (Tensor token_logps, Tensor lse)"
)
_lib.define(
    "fused_linear_token_logps_backward(Tensor grad_token, Tensor hidden, Tensor weight, Tensor? bias,"
    " Tensor labels, Tensor lse, int ignore_index, int shift, int chunk_size)"
    " -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"
)

OP_NAMES = ("napo_loss", "napo_loss_backward", "adaptive_q", "q_from_mean", "dynamic_weights")
LOGPS_OP_NAMES = ("token_logps", "token_logps_backward", "token_logps_backward_inplace")
COMPOSITE_OP_NAMES = ("fused_linear_token_logps", "fused_linear_token_logps_backward")


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
    margins, q, beta = inputs
    _, grad_factor = output
    # grad_factor stays differentiable: through it a double backward (a gradient penalty) reaches
    # the second derivative. Unused, its gradient arrives as None rather than as zeros.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(margins, q, grad_factor)
    ctx.beta = beta


def _napo_loss_backward(ctx, grad_loss: torch.Tensor | None, grad_of_grad_factor: torch.Tensor | None):
    margins, q, grad_factor = ctx.saved_tensors
    grad_margins = None
    if grad_loss is not None:
        # The backward is an op of its own (C on CPU/CUDA), differentiable in turn (below).
        grad_margins = torch.ops.napo.napo_loss_backward(grad_loss, grad_factor)
    if grad_of_grad_factor is not None:
        from napo.backends.reference import napo_loss_grad_factor_derivative

        second = grad_of_grad_factor * napo_loss_grad_factor_derivative(margins, q, ctx.beta, grad_factor)
        grad_margins = second if grad_margins is None else grad_margins + second
    # q is a constant of the objective (spec: computed without gradient).
    return grad_margins, None, None


torch.library.register_autograd("napo::napo_loss", _napo_loss_backward, setup_context=_napo_loss_setup_context)


def _napo_loss_backward_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _napo_loss_backward_backward(ctx, grad_output: torch.Tensor):
    # d(grad_loss * grad_factor): grad_factor's own gradient flows on into napo_loss's backward.
    grad_loss, grad_factor = ctx.saved_tensors
    return grad_output * grad_factor, grad_output * grad_loss


torch.library.register_autograd(
    "napo::napo_loss_backward", _napo_loss_backward_backward, setup_context=_napo_loss_backward_setup_context
)


# ---- sequence log-probs ----


# The log-sum-exp the backward reads: float64 whatever the logits (a float32 lse of ~10 is off by
# up to 5e-7 in every exponent of exp(x - lse)).
LSE_DTYPE = torch.float64


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of token log-probs for logits of ``dtype`` (log-sum-exps are always LSE_DTYPE)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("napo::token_logps")
def _token_logps_fake(logits, labels, ignore_index, shift, inplace_backward):
    shape = (logits.shape[0], logits.shape[1] - shift)
    return logits.new_empty(shape, dtype=accumulation_dtype(logits.dtype)), logits.new_empty(shape, dtype=LSE_DTYPE)


@torch.library.register_fake("napo::token_logps_backward")
def _token_logps_backward_fake(grad_token, logits, labels, lse, ignore_index, shift):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("napo::token_logps_backward_inplace")
def _token_logps_backward_inplace_fake(grad_token, logits, labels, lse, ignore_index, shift):
    return None


@torch.library.register_fake("napo::fused_linear_token_logps")
def _fused_linear_fake(hidden, weight, bias, labels, ignore_index, shift, chunk_size):
    shape = (hidden.shape[0], hidden.shape[1] - shift)
    return hidden.new_empty(shape, dtype=accumulation_dtype(hidden.dtype)), hidden.new_empty(shape, dtype=LSE_DTYPE)


@torch.library.register_fake("napo::fused_linear_token_logps_backward")
def _fused_linear_backward_fake(grad_token, hidden, weight, bias, labels, lse, ignore_index, shift, chunk_size):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,))
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _token_logps_setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, shift, inplace_backward = inputs
    _, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index, ctx.shift, ctx.inplace_backward = ignore_index, shift, inplace_backward


def _token_logps_backward(ctx, grad_token, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad_token = grad_token.contiguous()
    if ctx.inplace_backward:
        if torch.is_grad_enabled():
            # The logits buffer is about to hold the gradient: nothing is left to differentiate it by.
            raise RuntimeError(
                "napo.sequence_logps(inplace_backward=True) does not support create_graph=True (double "
                "backward): the logits buffer is overwritten by their gradient"
            )
        # The caller gave up the logits: their buffer becomes their own gradient (no [B, T, V] allocation).
        torch.ops.napo.token_logps_backward_inplace(grad_token, logits, labels, lse, ctx.ignore_index, ctx.shift)
        return logits, None, None, None, None
    grad = torch.ops.napo.token_logps_backward(grad_token, logits, labels, lse, ctx.ignore_index, ctx.shift)
    return grad, None, None, None, None


torch.library.register_autograd("napo::token_logps", _token_logps_backward, setup_context=_token_logps_setup_context)


def _fused_linear_setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, ignore_index, shift, chunk_size = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.ignore_index, ctx.shift, ctx.chunk_size = ignore_index, shift, chunk_size
    ctx.has_bias = bias is not None


def _fused_linear_backward(ctx, grad_token, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = torch.ops.napo.fused_linear_token_logps_backward(
        grad_token.contiguous(), hidden, weight, bias, labels, lse, ctx.ignore_index, ctx.shift, ctx.chunk_size
    )
    return grad_hidden, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None


torch.library.register_autograd(
    "napo::fused_linear_token_logps", _fused_linear_backward, setup_context=_fused_linear_setup_context
)


def _no_double_backward_setup_context(ctx, inputs, output) -> None:
    pass


def _no_double_backward_of(function: str):
    """An autograd formula for a backward op that raises: without one torch only warns and a second
    derivative through the op comes out as zero."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"napo.{function} does not support double backward: its gradient, taken with "
            "create_graph=True, cannot be differentiated again"
        )

    return backward


# (token_logps_backward_inplace mutates, so torch takes no autograd formula for it: the in-place
# path raises in _token_logps_backward instead.)
for _op, _function in (
    ("token_logps_backward", "sequence_logps"),
    ("fused_linear_token_logps_backward", "fused_linear_sequence_logps"),
):
    torch.library.register_autograd(
        f"napo::{_op}", _no_double_backward_of(_function), setup_context=_no_double_backward_setup_context
    )
