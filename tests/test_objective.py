"""NaPOObjective (spec Eq. 14) against hand values and a plain-torch restatement of the spec."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, assert_close, random_logps

import napo

ANSWERS = ("chosen", "rejected", "language", "vision")


def make_batch(batch: int, dtype: torch.dtype, generator: torch.Generator, requires_grad: bool = True):
    """Policy/reference sum and avg log-probs for the four answers."""
    out = {}
    for answer in ANSWERS:
        lengths = torch.randint(5, 60, (batch,), generator=generator).to(torch.float64)
        for model in ("policy", "reference"):
            logps = random_logps(batch, torch.float64, generator)
            out[f"{model}_{answer}_logps"] = logps.to(dtype)
            out[f"{model}_{answer}_avg_logps"] = (logps / lengths).to(dtype)
    if requires_grad:
        for key in out:
            if key.startswith("policy"):
                out[key].requires_grad_(True)
    return out


def call(objective: napo.NaPOObjective, batch: dict[str, torch.Tensor]) -> napo.NaPOOutput:
    """Every log-prob by keyword: the dict keys are the forward's argument names."""
    return objective(**batch)


def spec_objective(batch: dict[str, torch.Tensor], beta: float = 0.1) -> torch.Tensor:
    """Eq. 14 with the paper's defaults, written from the spec with plain torch ops."""
    b = {k: v.float() if v.dtype != torch.float64 else v for k, v in batch.items()}

    def margin(rejected: str, kind: str = "") -> torch.Tensor:
        return (b[f"policy_chosen{kind}_logps"] - b[f"reference_chosen{kind}_logps"]) - (
            b[f"policy_{rejected}{kind}_logps"] - b[f"reference_{rejected}{kind}_logps"]
        )

    def q_of(m: torch.Tensor, gamma: float) -> torch.Tensor:
        return (2 * (1 - torch.sigmoid(gamma * m.detach().mean()))).clamp(0.001, 1.0)

    def gce(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (1 - torch.sigmoid(beta * m) ** q) / q

    m_o, m_l, m_v = margin("rejected"), margin("language"), margin("vision")
    q_l, q_v = q_of(margin("language", "_avg"), 0.5), q_of(m_v, 0.01)
    r = torch.stack([beta * m.detach().mean() for m in (m_o, m_l, m_v)])
    w = (r / r.sum()).clamp(0.01, 1.0) if r.sum() > 1e-8 else torch.full_like(r, 1 / 3)
    return (w[0] * -F.logsigmoid(beta * m_o) + w[1] * gce(m_l, q_l) + w[2] * gce(m_v, q_v)).mean()


def test_step_zero_hand_values():
    logps = torch.full((4,), -12.5, dtype=torch.float64)
    avg = torch.full((4,), -0.8, dtype=torch.float64)
    out = napo.NaPOObjective()(
        logps, logps, logps, logps, logps, logps, logps, logps,
        policy_chosen_avg_logps=avg, reference_chosen_avg_logps=avg,
        policy_language_avg_logps=avg, reference_language_avg_logps=avg,
    )  # fmt: skip
    assert out.q["original"].item() == 0.0
    assert out.q["language"].item() == 1.0 and out.q["vision"].item() == 1.0
    assert [out.weights[t].item() for t in napo.TERMS] == pytest.approx([1 / 3] * 3, rel=1e-15)
    # L_dpo(0) = log 2, L_1(0) = 1 - sigmoid(0) = 1/2.
    assert out.loss.item() == pytest.approx((math.log(2) + 0.5 + 0.5) / 3, rel=1e-15)
    assert all(out.accuracies[t].item() == 0.0 for t in napo.TERMS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_size", [1, 3, 257])
def test_matches_spec_restatement_with_stop_gradient(dtype, batch_size, generator):
    batch = make_batch(batch_size, dtype, generator)
    out = call(napo.NaPOObjective(), batch)
    out.loss.backward()
    napo_grads = {k: v.grad.clone() for k, v in batch.items() if v.grad is not None}
    for v in batch.values():
        v.grad = None
    expected = spec_objective(batch)
    expected.backward()
    tol = TOLERANCES[dtype] if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    assert_close(out.loss, expected, **tol, what="objective")
    # Gradients flow to the sum log-probs only (avg log-probs feed q alone, without gradient).
    assert set(napo_grads) == {f"policy_{a}_logps" for a in ANSWERS}
    grad_tol = tol if dtype != torch.bfloat16 else {"rtol": 1.6e-2, "atol": 1e-6}
    for key, grad in napo_grads.items():
        assert_close(grad, batch[key].grad, **grad_tol, what=key)


def test_all_dpo_without_weights_is_the_sum_of_trl_sigmoid_losses(generator):
    batch = make_batch(16, torch.float64, generator, requires_grad=False)
    dpo = napo.TermConfig(loss="dpo")
    out = call(napo.NaPOObjective(beta=0.2, original=dpo, language=dpo, vision=dpo, weights="none"), batch)
    expected = 0
    for rejected in ("rejected", "language", "vision"):
        logits = (batch["policy_chosen_logps"] - batch[f"policy_{rejected}_logps"]) - (
            batch["reference_chosen_logps"] - batch[f"reference_{rejected}_logps"]
        )
        expected = expected + (-F.logsigmoid(0.2 * logits)).mean()
    assert_close(out.loss, expected, rtol=1e-13, atol=0)


def test_single_term_noise_robust_dpo(generator):
    batch = make_batch(8, torch.float64, generator, requires_grad=False)
    objective = napo.NaPOObjective(original=napo.TermConfig(gamma=0.05, margin="sum"), language=None, vision=None)
    out = objective(
        batch["policy_chosen_logps"], batch["policy_rejected_logps"],
        batch["reference_chosen_logps"], batch["reference_rejected_logps"],
    )  # fmt: skip
    m = napo.reward_margin(
        batch["policy_chosen_logps"], batch["policy_rejected_logps"],
        batch["reference_chosen_logps"], batch["reference_rejected_logps"],
    )  # fmt: skip
    q = napo.adaptive_q(m, gamma=0.05)
    assert list(out.q) == ["original"] and out.weights["original"].item() == 1.0
    assert_close(out.q["original"], q, rtol=1e-15, atol=0)
    assert_close(out.loss, ((1 - torch.sigmoid(0.1 * m) ** q) / q).mean(), rtol=1e-12, atol=0)


def test_fixed_q_and_fixed_weights(generator):
    batch = make_batch(8, torch.float64, generator, requires_grad=False)
    objective = napo.NaPOObjective(
        original=napo.TermConfig(loss="dpo"),
        language=napo.TermConfig(q=0.5),
        vision=napo.TermConfig(q=1.0),
        weights=[1.0, 0.25, 0.5],
    )
    out = call(objective, batch)
    assert [out.q[t].item() for t in napo.TERMS] == [0.0, 0.5, 1.0]
    assert [out.weights[t].item() for t in napo.TERMS] == [1.0, 0.25, 0.5]
    expected = sum(out.weights[t] * out.losses[t] for t in napo.TERMS).mean()
    assert_close(out.loss, expected, rtol=1e-15, atol=0)


def test_outputs_and_metrics_are_detached_tensors(generator):
    batch = make_batch(4, torch.float32, generator)
    out = call(napo.NaPOObjective(), batch)
    metrics = out.metrics()
    expected_keys = {f"napo/{k}_{t}" for k in ("q", "weight", "margin", "accuracy", "loss") for t in napo.TERMS}
    assert set(metrics) == expected_keys
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert out.loss.requires_grad
    chosen_reward = 0.1 * (batch["policy_chosen_logps"] - batch["reference_chosen_logps"])
    assert_close(out.rewards["chosen"], chosen_reward, rtol=1e-6, atol=1e-7)
    assert_close(out.margins["vision"], out.rewards["chosen"] - out.rewards["vision"], rtol=1e-5, atol=1e-5)


def test_missing_arguments_are_named(generator):
    batch = make_batch(4, torch.float32, generator, requires_grad=False)
    with pytest.raises(ValueError, match="policy_language_avg_logps") as info:
        napo.NaPOObjective()(
            batch["policy_chosen_logps"], batch["policy_rejected_logps"],
            batch["reference_chosen_logps"], batch["reference_rejected_logps"],
            batch["policy_language_logps"], batch["reference_language_logps"],
            batch["policy_vision_logps"], batch["reference_vision_logps"],
        )  # fmt: skip
    assert "policy_vision_avg_logps" not in str(info.value)  # the vision q uses logp margins
    with pytest.raises(ValueError, match="policy_vision_logps"):
        napo.NaPOObjective(language=None)(
            batch["policy_chosen_logps"], batch["policy_rejected_logps"],
            batch["reference_chosen_logps"], batch["reference_rejected_logps"],
        )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"original": None, "language": None, "vision": None}, ValueError, "at least one"),
        ({"weights": "uniform"}, ValueError, "weights"),
        ({"weights": [1.0, 2.0]}, ValueError, "3 terms"),
        ({"weights": [1.0, -2.0, 1.0]}, ValueError, "fixed weights"),
        ({"q_min": 0.5, "q_max": 0.2}, ValueError, "q_min"),
        ({"w_min": 1.5}, ValueError, "w_min"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"language": "napo"}, TypeError, "TermConfig"),
    ],
)
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        napo.NaPOObjective(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss": "ipo"}, "loss"),
        ({"q": 1.5}, "q must be"),
        ({"q": "fixed"}, "q must be"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -0.5}, "gamma"),
        ({"margin": "mean"}, "margin"),
    ],
)
def test_bad_term_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        napo.TermConfig(**kwargs)


def test_napo_loss_module_matches_functional(generator):
    batch = make_batch(6, torch.float64, generator, requires_grad=False)
    args = [batch[k] for k in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                               "reference_rejected_logps")]  # fmt: skip
    loss, q = napo.NaPOLoss(beta=0.1, gamma=0.05, margin="sum")(*args)
    expected_q = napo.adaptive_q(napo.reward_margin(*args), gamma=0.05)
    assert_close(q, expected_q, rtol=0, atol=0)
    assert_close(loss, napo.napo_loss(*args, beta=0.1, q=expected_q).mean(), rtol=0, atol=0)
    fixed, q_fixed = napo.NaPOLoss(q=0.0, reduction="none")(*args)
    assert q_fixed.item() == 0.0
    assert_close(fixed, -F.logsigmoid(0.1 * napo.reward_margin(*args)), rtol=1e-13, atol=0)
