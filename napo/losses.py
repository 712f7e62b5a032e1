"""The NaPO objective as ``nn.Module`` s.

Paper: Zhang et al., "Debiasing Multimodal Large Language Models via
Noise-Aware Preference Optimization". Formulas: ``shared/napo-spec.md``
(Eq. 9 loss, Eq. 12 adaptive q, Eq. 13-14 dynamic weights and objective).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from napo import functional as F_napo

__all__ = ["TERMS", "NaPOLoss", "NaPOObjective", "NaPOOutput", "TermConfig"]

TERMS = ("original", "language", "vision")
"""The three loss terms: chosen vs rejected, vs the language-biased answer, vs the vision-biased answer."""

_REJECTED_ANSWER = {"original": "rejected", "language": "language", "vision": "vision"}


@dataclass(frozen=True)
class TermConfig:
    """How one pair term is scored.

    Args:
        loss: ``"dpo"`` (-logsigmoid) or ``"napo"`` (the negative Box-Cox loss with q).
        q: ``"adaptive"`` (Eq. 12) or a fixed float in [0, 1]. Ignored for ``loss="dpo"``.
        gamma: the scale of the adaptive q, > 0.
        margin: the margin q is computed from: ``"avg"`` (avglogp) or ``"sum"`` (logp).
            The loss itself always uses the logp margin, as in DPO.
    """

    loss: Literal["dpo", "napo"] = "napo"
    q: Literal["adaptive"] | float = "adaptive"
    gamma: float = 0.5
    margin: Literal["avg", "sum"] = "avg"

    def __post_init__(self) -> None:
        if self.loss not in ("dpo", "napo"):
            raise ValueError(f"loss must be 'dpo' or 'napo', got {self.loss!r}")
        if isinstance(self.q, str):
            if self.q != "adaptive":
                raise ValueError(f"q must be 'adaptive' or a float in [0, 1], got {self.q!r}")
        elif isinstance(self.q, bool) or not isinstance(self.q, (int, float)) or not 0.0 <= self.q <= 1.0:
            raise ValueError(f"q must be 'adaptive' or a float in [0, 1], got {self.q!r}")
        if (
            isinstance(self.gamma, bool)
            or not isinstance(self.gamma, (int, float))
            or not (math.isfinite(self.gamma) and self.gamma > 0)
        ):
            raise ValueError(f"gamma must be a finite number > 0, got {self.gamma!r}")
        if self.margin not in ("avg", "sum"):
            raise ValueError(f"margin must be 'avg' or 'sum', got {self.margin!r}")

    @property
    def adaptive(self) -> bool:
        return self.loss == "napo" and self.q == "adaptive"


PAPER_TERMS = {
    "original": TermConfig(loss="dpo"),
    "language": TermConfig(loss="napo", q="adaptive", gamma=0.5, margin="avg"),
    "vision": TermConfig(loss="napo", q="adaptive", gamma=0.01, margin="sum"),
}
"""The paper's defaults (LLaVA-v1.5): DPO on the original pair, adaptive NaPO on the biased pairs."""


class NaPOOutput(NamedTuple):
    """What :class:`NaPOObjective` returns. Everything but ``loss`` is detached.

    loss: the scalar objective (Eq. 14), differentiable.
    losses: per term, the ``[B]`` unweighted per-pair losses.
    q: per term, the 0-dim q used (0 for DPO terms).
    weights: per term, the 0-dim weight used.
    margins: per term, the ``[B]`` logp reward margin beta * M.
    rewards: per answer (chosen, rejected, language, vision), ``[B]`` implicit rewards beta * (log pi - log ref).
    accuracies: per term, the 0-dim fraction of pairs with M > 0.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    q: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    margins: dict[str, torch.Tensor]
    rewards: dict[str, torch.Tensor]
    accuracies: dict[str, torch.Tensor]

    def metrics(self, prefix: str = "napo/") -> dict[str, torch.Tensor]:
        """Flat 0-dim tensors for a trainer's logs: ``napo/q_<term>``, ``napo/weight_<term>``,
        ``napo/margin_<term>`` (mean beta * M), ``napo/accuracy_<term>``, ``napo/loss_<term>``.
        Still tensors: call ``.item()`` only when logging, to avoid a host sync per step."""
        out: dict[str, torch.Tensor] = {}
        for term in self.losses:
            out[f"{prefix}q_{term}"] = self.q[term]
            out[f"{prefix}weight_{term}"] = self.weights[term]
            out[f"{prefix}margin_{term}"] = self.margins[term].mean()
            out[f"{prefix}accuracy_{term}"] = self.accuracies[term]
            out[f"{prefix}loss_{term}"] = self.losses[term].detach().mean()
        return out


class NaPOLoss(nn.Module):
    """NaPO on one kind of pair: a noise-robust drop-in for DPO's sigmoid loss.

    Paper: NaPO (Eq. 9, 12). With ``q="adaptive"`` the coefficient follows the
    batch-mean margin; with a float it is fixed; ``q=0`` is exactly DPO.

    Args:
        beta: > 0.
        q: ``"adaptive"`` or a float in [0, 1].
        gamma, margin: of the adaptive q (see :class:`TermConfig`).
        q_min, q_max: clip bounds of the adaptive q.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes: every log-prob ``[B]``; avg log-probs are needed when ``margin="avg"`` and q is adaptive.
    """

    def __init__(
        self,
        beta: float = 0.1,
        q: Literal["adaptive"] | float = "adaptive",
        gamma: float = 0.01,
        margin: Literal["avg", "sum"] = "sum",
        q_min: float = 0.001,
        q_max: float = 1.0,
        reduction: Literal["mean", "sum", "none"] = "mean",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.beta = F_napo._check_positive("beta", beta)
        self.term = TermConfig(loss="napo", q=q, gamma=gamma, margin=margin)
        self.q_min, self.q_max = F_napo._check_q_bounds(q_min, q_max)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.process_group = process_group

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        policy_chosen_avg_logps: torch.Tensor | None = None,
        policy_rejected_avg_logps: torch.Tensor | None = None,
        reference_chosen_avg_logps: torch.Tensor | None = None,
        reference_rejected_avg_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(loss, q)``."""
        logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        if self.term.q != "adaptive":
            q: float | torch.Tensor = float(self.term.q)
        else:
            if self.term.margin == "avg":
                avg = (policy_chosen_avg_logps, policy_rejected_avg_logps, reference_chosen_avg_logps,
                       reference_rejected_avg_logps)  # fmt: skip
                if any(t is None for t in avg):
                    raise ValueError("margin='avg' needs the four *_avg_logps arguments")
                q_margins = F_napo.reward_margin(*avg)
            else:
                q_margins = F_napo.reward_margin(*logps)
            q = F_napo.adaptive_q(
                q_margins, gamma=self.term.gamma, q_min=self.q_min, q_max=self.q_max, process_group=self.process_group
            )
        losses = F_napo.napo_loss(*logps, beta=self.beta, q=q)
        q_out = q if isinstance(q, torch.Tensor) else torch.full((), q, dtype=losses.dtype, device=losses.device)
        if self.reduction == "mean":
            return losses.mean(), q_out
        if self.reduction == "sum":
            return losses.sum(), q_out
        return losses, q_out


class NaPOObjective(nn.Module):
    """The three-way NaPO objective (spec Eq. 14).

    Paper: NaPO. Formula:
        L = mean_b [ w_o * L_dpo(M_o) + w_l * L_{q_l}(M_l) + w_v * L_{q_v}(M_v) ]
    where M_o is chosen vs rejected, M_l chosen vs the language-biased answer
    (question only), M_v chosen vs the vision-biased answer (image only); q_k
    from Eq. 12 and w_k from Eq. 13, both from global batch means without
    gradient. Each term is configurable (:class:`TermConfig`); a term set to
    ``None`` is left out (``original`` alone turns this into a noise-robust DPO).

    Args:
        beta: > 0 (paper: 0.1).
        original, language, vision: :class:`TermConfig` or None; defaults are the paper's.
        weights: ``"dynamic"`` (Eq. 13), ``"none"`` (all 1), or one fixed float per active term.
        q_min, q_max: clip bounds of every adaptive q (paper: 0.001, 1).
        w_min: lower clip bound of the dynamic weights (paper: 0.01).
        eps: a sum of reward margins at or below it gives uniform weights.
        process_group: the data-parallel group for the batch means (default: the world, when initialised).

    Shapes: every log-prob argument is ``[B]``; the language/vision arguments are needed only when that
    term is active, the ``*_avg_logps`` only for terms whose adaptive q uses ``margin="avg"``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        *,
        original: TermConfig | None = PAPER_TERMS["original"],
        language: TermConfig | None = PAPER_TERMS["language"],
        vision: TermConfig | None = PAPER_TERMS["vision"],
        weights: Literal["dynamic", "none"] | Sequence[float] = "dynamic",
        q_min: float = 0.001,
        q_max: float = 1.0,
        w_min: float = 0.01,
        eps: float = 1e-8,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.beta = F_napo._check_positive("beta", beta)
        configured = {"original": original, "language": language, "vision": vision}
        for name, term in configured.items():
            if term is not None and not isinstance(term, TermConfig):
                raise TypeError(f"{name} must be a TermConfig or None, got {type(term).__name__}")
        self.terms: dict[str, TermConfig] = {name: term for name, term in configured.items() if term is not None}
        if not self.terms:
            raise ValueError("at least one of original, language, vision must be configured")
        if isinstance(weights, str):
            if weights not in ("dynamic", "none"):
                raise ValueError(f"weights must be 'dynamic', 'none' or a list of floats, got {weights!r}")
            self.fixed_weights = None if weights == "dynamic" else [1.0] * len(self.terms)
        else:
            fixed = [float(w) for w in weights]
            if len(fixed) != len(self.terms):
                raise ValueError(
                    f"weights has {len(fixed)} values but {len(self.terms)} terms are active ({', '.join(self.terms)})"
                )
            if any(not (math.isfinite(w) and w >= 0) for w in fixed):
                raise ValueError(f"fixed weights must be finite and >= 0, got {fixed!r}")
            self.fixed_weights = fixed
        self.weight_mode = "dynamic" if self.fixed_weights is None else "fixed"
        self.q_min, self.q_max = F_napo._check_q_bounds(q_min, q_max)
        self.w_min = F_napo._check_unit_interval("w_min", w_min)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.process_group = process_group

    def extra_repr(self) -> str:
        terms = ", ".join(f"{name}={term}" for name, term in self.terms.items())
        return f"beta={self.beta}, weights={self.weight_mode}, {terms}"

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor | None,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor | None,
        policy_language_logps: torch.Tensor | None = None,
        reference_language_logps: torch.Tensor | None = None,
        policy_vision_logps: torch.Tensor | None = None,
        reference_vision_logps: torch.Tensor | None = None,
        *,
        policy_chosen_avg_logps: torch.Tensor | None = None,
        policy_rejected_avg_logps: torch.Tensor | None = None,
        reference_chosen_avg_logps: torch.Tensor | None = None,
        reference_rejected_avg_logps: torch.Tensor | None = None,
        policy_language_avg_logps: torch.Tensor | None = None,
        reference_language_avg_logps: torch.Tensor | None = None,
        policy_vision_avg_logps: torch.Tensor | None = None,
        reference_vision_avg_logps: torch.Tensor | None = None,
    ) -> NaPOOutput:
        sums = {
            "chosen": (policy_chosen_logps, reference_chosen_logps),
            "rejected": (policy_rejected_logps, reference_rejected_logps),
            "language": (policy_language_logps, reference_language_logps),
            "vision": (policy_vision_logps, reference_vision_logps),
        }
        avgs = {
            "chosen": (policy_chosen_avg_logps, reference_chosen_avg_logps),
            "rejected": (policy_rejected_avg_logps, reference_rejected_avg_logps),
            "language": (policy_language_avg_logps, reference_language_avg_logps),
            "vision": (policy_vision_avg_logps, reference_vision_avg_logps),
        }
        names = list(self.terms)
        answers = ["chosen", *(_REJECTED_ANSWER[name] for name in names)]
        avg_terms = [name for name, term in self.terms.items() if term.adaptive and term.margin == "avg"]
        avg_answers = ["chosen", *(_REJECTED_ANSWER[name] for name in avg_terms)] if avg_terms else []
        needed: dict[str, torch.Tensor | None] = {}
        for answer in answers:
            needed[f"policy_{answer}_logps"], needed[f"reference_{answer}_logps"] = sums[answer]
        for answer in avg_answers:
            needed[f"policy_{answer}_avg_logps"], needed[f"reference_{answer}_avg_logps"] = avgs[answer]
        missing = [arg for arg, value in needed.items() if value is None]
        if missing:
            raise ValueError(
                f"the active terms ({', '.join(names)}) need these arguments, which were not given: "
                + ", ".join(missing)
            )
        first = F_napo._check_batch(needed)  # type: ignore[arg-type]
        dtype = F_napo._compute_dtype(*needed.values())  # type: ignore[arg-type]
        device = first.device

        # Every term at once: log-ratios of the answers [A, B], chosen first; margins [K, B] (Eq. 2).
        log_ratios = _log_ratios(sums, answers, dtype)
        margins = log_ratios[:1] - log_ratios[1:]
        beta_margins = (self.beta * margins).detach()

        # One all-reduce for every batch statistic: gamma_k * q-margin_k of each adaptive term, then beta * M_k.
        # gamma is folded in here so that one elementwise q_from_mean serves all terms.
        adaptive = [name for name in names if self.terms[name].adaptive]
        if avg_terms:
            avg_ratios = _log_ratios(avgs, avg_answers, dtype).detach()
            avg_margins = dict(zip(avg_terms, (avg_ratios[:1] - avg_ratios[1:]).unbind(0), strict=True))
        stats = [
            self.terms[name].gamma * (avg_margins[name] if name in avg_terms else margins[names.index(name)].detach())
            for name in adaptive
        ]
        if self.fixed_weights is None:
            stats.extend(beta_margins.unbind(0))
        if stats:
            means = F_napo.global_mean(torch.stack(stats, dim=1), process_group=self.process_group).to(dtype)
        else:  # fixed q and fixed weights: no batch statistic, no all-reduce
            means = margins.new_zeros(0)

        adaptive_q = torch.ops.napo.q_from_mean(means[: len(adaptive)], 1.0, self.q_min, self.q_max)
        q_values = self._q_vector(adaptive_q, adaptive, dtype, device)
        if self.fixed_weights is None:
            weight_vector = torch.ops.napo.dynamic_weights(means[len(adaptive) :], self.w_min, self.eps)
        else:
            weight_vector = torch.stack([torch.full((), w, dtype=dtype, device=device) for w in self.fixed_weights])

        losses, _ = torch.ops.napo.napo_loss(margins, q_values, self.beta)  # [K, B], one kernel for all terms
        loss = torch.dot(weight_vector, losses.mean(dim=1))  # = mean_b sum_k w_k L_k (Eq. 14)

        rewards = dict(zip(answers, (self.beta * log_ratios.detach()).unbind(0), strict=True))
        return NaPOOutput(
            loss=loss,
            losses=dict(zip(names, losses.detach().unbind(0), strict=True)),
            q=dict(zip(names, q_values.unbind(0), strict=True)),
            weights=dict(zip(names, weight_vector.unbind(0), strict=True)),
            margins=dict(zip(names, beta_margins.unbind(0), strict=True)),
            rewards=rewards,
            accuracies=dict(zip(names, (margins.detach() > 0).to(dtype).mean(dim=1).unbind(0), strict=True)),
        )

    def _q_vector(
        self, adaptive_q: torch.Tensor, adaptive: list[str], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """q of every term in order: adaptive ones from the kernel, fixed ones (0 for DPO) as constants."""
        if len(adaptive) == len(self.terms):
            return adaptive_q
        pieces = []
        for name, term in self.terms.items():
            if name in adaptive:
                index = adaptive.index(name)
                pieces.append(adaptive_q[index : index + 1])
            else:
                fixed_q = 0.0 if term.loss == "dpo" else float(term.q)
                # torch.full copies nothing from the host, so this stays graph-capturable.
                pieces.append(torch.full((1,), fixed_q, dtype=dtype, device=device))
        return torch.cat(pieces)


def _log_ratios(
    logps: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]], answers: list[str], dtype: torch.dtype
) -> torch.Tensor:
    """[A, B] log pi(y) - log ref(y) for the answers, in the compute dtype."""
    # torch.stack promotes mixed dtypes; one cast per stack instead of one per tensor.
    policy = torch.stack([logps[a][0] for a in answers]).to(dtype)  # type: ignore[misc]
    reference = torch.stack([logps[a][1] for a in answers]).to(dtype)  # type: ignore[misc]
    return policy - reference
