"""The NaPO objective as functions: what users call.

Paper: Zhang et al., "Debiasing Multimodal Large Language Models via
Noise-Aware Preference Optimization" (NaPO). Formulas: ``shared/napo-spec.md``.

Every function validates its input and names the offending argument and value
(``TypeError`` for non-tensors and non-float dtypes, ``ValueError`` for shapes,
devices and out-of-range parameters), promotes bf16/fp16 log-probs to float32
and calls napo's custom ops. Nothing here synchronises with the host, so the
functions are safe inside ``torch.compile`` and CUDA graphs. NaN in the
log-probs is not an error: it propagates into the margins, q, weights and loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "adaptive_q",
    "dynamic_weights",
    "global_mean",
    "napo_loss",
    "q_from_mean",
    "reward_margin",
]

# --------------------------------------------------------------------------- checks


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def _check_batch(named: dict[str, torch.Tensor], *, allow_empty: bool = False) -> torch.Tensor:
    """All 1-D, same length, same device; returns the first for reference."""
    first_name, first = next(iter(named.items()))
    for name, tensor in named.items():
        _check_tensor(name, tensor)
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D [batch], got shape {tuple(tensor.shape)}")
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has shape {tuple(first.shape)}; "
                "every log-prob tensor needs one value per pair"
            )
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")
    if not allow_empty and first.numel() == 0:
        raise ValueError(f"{first_name} is an empty batch; the NaPO objective needs at least one pair")
    return first


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _check_q_bounds(q_min: float, q_max: float) -> tuple[float, float]:
    q_min = _check_unit_interval("q_min", q_min)
    q_max = _check_unit_interval("q_max", q_max)
    if q_min > q_max:
        raise ValueError(f"q_min must be <= q_max, got q_min={q_min!r} and q_max={q_max!r}")
    return q_min, q_max


def _q_tensor(q: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(q, torch.Tensor):
        if q.numel() != 1 or q.dim() > 1:
            raise ValueError(f"q must be a float or a 0-dim tensor, got a tensor of shape {tuple(q.shape)}")
        if q.is_complex() or not q.is_floating_point():
            raise TypeError(f"q must have a floating-point dtype, got {q.dtype}")
        if q.device != like.device:
            raise ValueError(f"q is on {q.device} but the log-probs are on {like.device}")
        # A tensor q is checked where its value lives: by the C kernel on CPU;
        # on CUDA (checking would sync) an out-of-range q gives a NaN loss.
        return q.detach().to(like.dtype).reshape(())
    # torch.full launches a fill kernel: unlike torch.tensor it copies nothing from the host, so it is
    # allowed inside a CUDA graph capture.
    return torch.full((), _check_unit_interval("q", q), dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- distributed


def _distributed(process_group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def global_mean(values: torch.Tensor, *, process_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over the batch dimension (dim 0) of ``values``, across all data-parallel ranks.

    With ``torch.distributed`` initialised this is one all-reduce of the local
    sums and the local count, so ranks with unequal batch sizes still give the
    mean over the global batch. Computed in float64 without gradient.

    Args:
        values: ``[B]`` or ``[B, K]`` (K statistics reduced together).
    Returns:
        ``[]`` or ``[K]`` float64 tensor on ``values.device``.
    """
    values = values.detach().to(torch.float64)
    local = torch.cat([values.sum(dim=0).reshape(-1), values.new_full((1,), values.shape[0])])
    if _distributed(process_group):
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
    mean = local[:-1] / local[-1]
    return mean.reshape(values.shape[1:])


# --------------------------------------------------------------------------- the objective


def _named_logps(
    policy_chosen: object, policy_rejected: object, reference_chosen: object, reference_rejected: object
) -> dict:
    return {
        "policy_chosen_logps": policy_chosen,
        "policy_rejected_logps": policy_rejected,
        "reference_chosen_logps": reference_chosen,
        "reference_rejected_logps": reference_rejected,
    }


def _margin(named: dict[str, torch.Tensor]) -> torch.Tensor:
    """M of already-checked log-probs, in float32 (float64 if any input is float64)."""
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = named.values()
    dtype = _compute_dtype(*named.values())
    return (policy_chosen.to(dtype) - reference_chosen.to(dtype)) - (
        policy_rejected.to(dtype) - reference_rejected.to(dtype)
    )


def reward_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """The reward margin of each pair, without beta (spec Eq. 2).

    Formula:
        M = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]

    Pass sum log-probs for the logp margin or average log-probs for the
    avglogp margin. Differentiable w.r.t. every input.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``[B]`` floating tensors on one device.
    Returns:
        ``[B]`` float32 (float64 if any input is float64).
    """
    named = _named_logps(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    _check_batch(named, allow_empty=True)
    return _margin(named)


def napo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    q: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Per-pair NaPO loss, no reduction (spec Eq. 9).

    Paper: NaPO, the negative Box-Cox transform of DPO's sigmoid loss.

    Formula:
        L_q(M) = (1 - sigmoid(beta * M) ** q) / q, evaluated as -expm1(q * logsigmoid(beta * M)) / q
        q == 0 is DPO's -logsigmoid(beta * M); q == 1 is 1 - sigmoid(beta * M).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` sequence log-probs under the policy
            (differentiable).
        reference_chosen_logps, reference_rejected_logps: ``[B]`` under the reference model.
        beta: > 0.
        q: a float or a 0-dim tensor in [0, 1] (e.g. from :func:`adaptive_q`); not differentiated.
    Returns:
        ``[B]`` losses, float32 (float64 for float64 inputs), each in [0, 1/q).
    """
    beta = _check_positive("beta", beta)
    named = _named_logps(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    _check_batch(named)
    margins = _margin(named)
    loss, _ = torch.ops.napo.napo_loss(margins, _q_tensor(q, margins), beta)
    return loss


def _margin_vector(name: str, margins: torch.Tensor, *, allow_empty: bool = False) -> torch.Tensor:
    _check_tensor(name, margins)
    if margins.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(margins.shape)}")
    if margins.numel() == 0 and not allow_empty:
        raise ValueError(f"{name} is empty; need at least one value")
    return margins.detach().to(_compute_dtype(margins))


def adaptive_q(
    margins: torch.Tensor,
    *,
    gamma: float,
    q_min: float = 0.001,
    q_max: float = 1.0,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The noise-robustness coefficient q from the batch-mean margin (spec Eq. 12).

    Formula:
        q = clip(2 * (1 - sigmoid(gamma * mean(M))), q_min, q_max)

    At mean(M) = 0 (policy == reference) q = 1; q falls toward DPO as the
    margin grows. With ``torch.distributed`` initialised the mean is over the
    global batch (all ranks). Detached.

    Args:
        margins: ``[B]`` reward margins (no beta): avglogp margins with gamma ~ 0.5,
            logp margins with gamma in [0.01, 0.1].
        gamma: > 0.
        q_min, q_max: clip bounds, 0 <= q_min <= q_max <= 1.
        process_group: the data-parallel group (default: the world, when initialised).
    Returns:
        0-dim float32 (float64 for float64 margins).
    """
    gamma = _check_positive("gamma", gamma)
    q_min, q_max = _check_q_bounds(q_min, q_max)
    margins = _margin_vector("margins", margins)
    if _distributed(process_group):
        mean = global_mean(margins, process_group=process_group).to(margins.dtype)
        return torch.ops.napo.q_from_mean(mean, gamma, q_min, q_max)
    return torch.ops.napo.adaptive_q(margins, gamma, q_min, q_max)


def q_from_mean(mean: torch.Tensor, *, gamma: float, q_min: float = 0.001, q_max: float = 1.0) -> torch.Tensor:
    """Adaptive q from an already-reduced batch-mean margin (0-dim tensor)."""
    gamma = _check_positive("gamma", gamma)
    q_min, q_max = _check_q_bounds(q_min, q_max)
    _check_tensor("mean", mean)
    if mean.numel() != 1:
        raise ValueError(f"mean must be a 0-dim tensor, got shape {tuple(mean.shape)}")
    return torch.ops.napo.q_from_mean(mean.detach().to(_compute_dtype(mean)).reshape(()), gamma, q_min, q_max)


def dynamic_weights(
    reward_margins: torch.Tensor | Sequence[float],
    *,
    w_min: float = 0.01,
    eps: float = 1e-8,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Dynamic loss weights from K batch-mean reward margins (spec Eq. 13).

    Formula:
        w_k = clip(R_k / sum_j R_j, w_min, 1); uniform 1/K when sum_j R_j <= eps
        (always at step 0, where every margin is zero).
        When m of the R_k are +inf (and none is -inf or NaN): clip(1/m, w_min, 1) for those and
        w_min for the others, the limit of R_k / sum_j R_j as the infinite terms grow alike
        (e.g. [inf, 1, 1] -> [1, w_min, w_min]). +inf with -inf, or a NaN, gives NaN weights.

    Args:
        reward_margins: ``[K]`` batch means of the logp reward margin beta * M_k, one per loss term.
            With ``torch.distributed`` initialised they are averaged over ranks (equal local batch
            sizes assumed; :class:`napo.NaPOObjective` reduces sums and counts instead).
        w_min: lower clip bound in [0, 1].
        eps: sums at or below it count as zero.
    Returns:
        ``[K]`` weights, detached, float32 (float64 for float64 input).
    """
    if not isinstance(reward_margins, torch.Tensor):
        reward_margins = torch.as_tensor(reward_margins, dtype=torch.float32)
    w_min = _check_unit_interval("w_min", w_min)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    margins = _margin_vector("reward_margins", reward_margins, allow_empty=True)
    if margins.numel() == 0:
        raise ValueError("reward_margins is empty (K = 0); dynamic weights need at least one loss term")
    if _distributed(process_group):
        margins = margins.clone()
        dist.all_reduce(margins, op=dist.ReduceOp.SUM, group=process_group)
        margins = margins / dist.get_world_size(process_group)
    return torch.ops.napo.dynamic_weights(margins, w_min, float(eps))
