"""Pure-PyTorch implementations of napo's ops.

They are registered as the default kernel of every op (any device without a
native kernel runs them, and ``NAPO_BACKEND=reference`` forces them) and they
are the oracle the C and CUDA kernels are tested against. They follow the
spec's formulas as written rather than the C code's rearrangements, so that a
shared mistake is unlikely. Like the CUDA kernels they never synchronise with
the host: an out-of-range q tensor gives NaN rather than an exception.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _row_q(q: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """q of shape [] (margins [B]) or [K] (margins [K, B]) as a column that broadcasts over the batch."""
    return q.to(margins.dtype).reshape(q.shape + (1,) * (margins.dim() - q.dim()))


def napo_loss(margins: torch.Tensor, q: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/dM): L_q(M) = -expm1(q * logsigmoid(beta * M)) / q; q == 0 is -logsigmoid(beta * M)."""
    log_sig = F.logsigmoid(beta * margins)
    q = _row_q(q, margins)
    is_dpo = q == 0
    safe_q = torch.where(is_dpo, torch.ones_like(q), q)
    x = q * log_sig
    # Where |q logsigmoid| < 1e-8 the Taylor series -logsigmoid * (1 + x / 2) is exact to x^2 / 6
    # relative (below float64's half ulp), while x itself may be subnormal and imprecise there.
    series = -log_sig * (1 + x / 2)
    loss = torch.where(is_dpo, -log_sig, torch.where(x.abs() < 1e-8, series, -torch.expm1(x) / safe_q))
    bad_q = (q < 0) | (q > 1)
    nan = torch.full_like(loss, float("nan"))
    return torch.where(bad_q, nan, loss), torch.where(bad_q, nan, napo_loss_grad_factor(margins, q, beta))


def napo_loss_grad_factor(margins: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """dL_q/dM = -beta * sigmoid(beta M)^q * sigmoid(-beta M)."""
    z = beta * margins
    q = _row_q(q, margins)
    # sigmoid^q as exp(q * logsigmoid): q == 0 must give exactly 1, also where logsigmoid = -inf.
    power = torch.where(q == 0, torch.ones_like(z), torch.exp(q * F.logsigmoid(z)))
    return -beta * power * torch.sigmoid(-z)


def napo_loss_grad_factor_derivative(
    margins: torch.Tensor, q: torch.Tensor, beta: float, grad_factor: torch.Tensor
) -> torch.Tensor:
    """d2L_q/dM2 from dL_q/dM (``grad_factor``): dL/dM * beta * (q * sigmoid(-beta M) - sigmoid(beta M)).

    Differentiable in torch (a third derivative goes through ``grad_factor``'s own backward).
    """
    z = beta * margins
    return grad_factor * beta * (_row_q(q, margins) * torch.sigmoid(-z) - torch.sigmoid(z))


def napo_loss_backward(grad_loss: torch.Tensor, grad_factor: torch.Tensor) -> torch.Tensor:
    return grad_loss * grad_factor


def q_from_mean(means: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    """q = clip(2 * (1 - sigmoid(gamma * mean)), q_min, q_max) elementwise, evaluated in float64."""
    q = 2.0 * (1.0 - torch.sigmoid(gamma * means.to(torch.float64)))
    return q.clamp(q_min, q_max).to(means.dtype)


def _scale_of(values: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of ``values``, or 1 where it is 0 or not finite: dividing by it keeps
    sums of finite values near the float64 maximum from overflowing."""
    largest = values.abs().max()
    return torch.where(torch.isfinite(largest) & (largest > 0), largest, torch.ones_like(largest))


def adaptive_q(margins: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    m = margins.to(torch.float64)
    scale = _scale_of(m)
    return q_from_mean((m / scale).mean() * scale, gamma, q_min, q_max).to(margins.dtype)


def dynamic_weights(reward_margins: torch.Tensor, w_min: float, eps: float) -> torch.Tensor:
    """w_k = clip(R_k / sum R, w_min, 1), or 1/K when sum R <= eps; with m margins at +inf (none at
    -inf or NaN), clip(1/m, w_min, 1) for those and w_min for the rest (the limit of the ratio)."""
    r = reward_margins.to(torch.float64)
    # Divided by their largest magnitude, K margins near the float64 maximum do not sum to inf.
    scale = _scale_of(r)
    scaled_total = (r / scale).sum()
    uniform = torch.full_like(r, 1.0 / r.numel())
    ratio = ((r / scale) / scaled_total).clamp(w_min, 1.0)
    # A +inf total means some R_k = +inf and none -inf or NaN (those make it NaN).
    is_inf = torch.isposinf(r)
    infinite_share = (1.0 / is_inf.sum().to(torch.float64)).clamp(w_min, 1.0)
    limit = torch.where(is_inf, infinite_share, torch.full_like(r, w_min))
    weights = torch.where(torch.isposinf(scaled_total), limit, ratio)
    weights = torch.where(scaled_total * scale <= eps, uniform, weights)
    return weights.to(reward_margins.dtype)


# ---- sequence log-probs (TRL's log_softmax + gather recipe, with the same conventions) ----


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int, position_offset: int = 0) -> None:
    """ValueError naming the first label outside [0, vocab) that is not ignore_index (one host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels[{b}, {t + position_offset}] = {int(labels[b, t])} is outside the vocabulary [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )


def _aligned(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: int):
    scored = logits.shape[1] - shift
    x = logits[:, :scored].to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    aligned = labels[:, shift:]
    mask = aligned != ignore_index
    return x, aligned, mask, torch.where(mask, aligned, torch.zeros_like(aligned))


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: int, inplace_backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    check_labels(labels[:, shift:], logits.shape[-1], ignore_index, shift)
    x, _, mask, safe = _aligned(logits, labels, ignore_index, shift)
    lse = torch.logsumexp(x, dim=-1)
    token = torch.log_softmax(x, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(lse)
    # The op's lse is float64 (napo._ops.LSE_DTYPE; the reference imports nothing of napo's, so it is
    # spelled here); this one is only as exact as a logsumexp in x's dtype.
    return torch.where(mask, token, zero), torch.where(mask, lse, zero).to(torch.float64)


def token_logps_backward(
    grad_token: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: int,
) -> torch.Tensor:
    x, _, mask, safe = _aligned(logits, labels, ignore_index, shift)
    g = torch.where(mask, grad_token, torch.zeros_like(grad_token)).unsqueeze(-1)
    # lse = hi + lo in x's dtype: x - hi is exact near the top of the softmax, where rounding the
    # float64 lse once would put an ulp of |lse| (1e-3 for float32 logits of 1e4) in every exponent.
    lse_hi = lse.to(x.dtype)
    lse_lo = (lse - lse_hi.to(lse.dtype)).to(x.dtype)
    grad = -g * torch.exp((x - lse_hi.unsqueeze(-1)) - lse_lo.unsqueeze(-1))
    grad = grad.scatter_add(-1, safe.unsqueeze(-1), g)
    grad = torch.where(mask.unsqueeze(-1), grad, torch.zeros_like(grad))  # exp(x - 0) may be inf where ignored
    out = torch.zeros_like(logits)
    out[:, : x.shape[1]] = grad.to(logits.dtype)
    return out


def token_logps_backward_inplace(
    grad_token: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: int,
) -> None:
    logits.copy_(token_logps_backward(grad_token, logits, labels, lse, ignore_index, shift))
