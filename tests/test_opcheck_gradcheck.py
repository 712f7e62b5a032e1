"""torch.library.opcheck (schemas, fake kernels, autograd registration) and gradcheck (the maths)."""

from __future__ import annotations

import pytest
import torch

import napo

F64 = torch.float64


def _margins(n: int, *, requires_grad: bool = False, dtype=F64) -> torch.Tensor:
    return (torch.randn(n, dtype=F64) * 5).to(dtype).requires_grad_(requires_grad)


def loss_examples():
    non_contiguous = _margins(14)[::2]
    return [
        (_margins(7, requires_grad=True), torch.tensor(0.3, dtype=F64), 0.1),
        (_margins(7, requires_grad=True), torch.tensor(0.0, dtype=F64), 0.5),
        (_margins(5, dtype=torch.float32), torch.tensor(1.0), 0.1),
        (_margins(0), torch.tensor(0.5, dtype=F64), 0.1),
        (non_contiguous, torch.tensor(0.7, dtype=F64), 0.2),
        (non_contiguous.detach().requires_grad_(True), torch.tensor(0.7, dtype=F64), 0.2),
        (torch.randn(5, 3, dtype=F64).t().requires_grad_(True), torch.tensor([0.0, 0.5, 1.0], dtype=F64), 0.1),
        (torch.randn(3, 0, dtype=F64), torch.tensor([0.0, 0.5, 1.0], dtype=F64), 0.1),
    ]


@pytest.mark.parametrize("example", range(8))
def test_opcheck_napo_loss(example):
    torch.library.opcheck(torch.ops.napo.napo_loss.default, loss_examples()[example])


@pytest.mark.parametrize(
    "args",
    [
        (torch.ones(4, dtype=F64), _margins(4)),
        (torch.ones(8, dtype=F64)[::2], _margins(4)),
        (torch.ones(0, dtype=F64), _margins(0)),
        (torch.ones(1).expand(3), _margins(3, dtype=torch.float32)),
        (torch.ones(1, 1, dtype=F64).expand(2, 5), _margins(10).reshape(2, 5)),
    ],
)
def test_opcheck_napo_loss_backward(args):
    torch.library.opcheck(torch.ops.napo.napo_loss_backward.default, args)


@pytest.mark.parametrize(
    "op,args",
    [
        ("adaptive_q", (_margins(9), 0.5, 0.001, 1.0)),
        ("adaptive_q", (_margins(18)[::2], 0.01, 0.0, 0.9)),
        ("adaptive_q", (_margins(3, dtype=torch.float32), 0.5, 0.001, 1.0)),
        ("q_from_mean", (torch.tensor(1.5, dtype=F64), 0.5, 0.001, 1.0)),
        ("q_from_mean", (torch.tensor([1.5, -2.0, 0.0, 9.0], dtype=torch.float32)[::2], 0.5, 0.001, 1.0)),
        ("dynamic_weights", (torch.tensor([0.1, 0.5, 0.2], dtype=F64), 0.01, 1e-8)),
        ("dynamic_weights", (torch.tensor([0.1, 0.5, 0.2, 0.7], dtype=torch.float32)[::2], 0.01, 1e-8)),
    ],
)
def test_opcheck_batch_statistics(op, args):
    torch.library.opcheck(getattr(torch.ops.napo, op).default, args)


@pytest.mark.parametrize("q", [0.0, 1e-3, 0.4, 1.0])
def test_gradcheck_napo_loss_op(q):
    margins = _margins(11, requires_grad=True)
    qt = torch.tensor(q, dtype=F64)
    assert torch.autograd.gradcheck(lambda m: torch.ops.napo.napo_loss(m, qt, 0.3)[0], (margins,), eps=1e-6, atol=1e-9)


def test_gradcheck_napo_loss_op_stacked_terms():
    margins = torch.randn(3, 6, dtype=F64, requires_grad=True)
    q = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda m: torch.ops.napo.napo_loss(m, q, 0.7)[0], (margins,), eps=1e-6, atol=1e-9)


def test_gradcheck_napo_loss_functional():
    logps = [_margins(6, requires_grad=i < 2) - 20 for i in range(4)]

    def loss(policy_chosen, policy_rejected):
        return napo.napo_loss(policy_chosen, policy_rejected, logps[2], logps[3], beta=0.2, q=0.6)

    assert torch.autograd.gradcheck(loss, (logps[0], logps[1]), eps=1e-6, atol=1e-9)


def test_gradcheck_objective_with_fixed_q_and_weights():
    # Adaptive q and dynamic weights are constants of the backward (stop-gradient),
    # which finite differences cannot see; their gradient is tested in test_objective.py.
    objective = napo.NaPOObjective(
        beta=0.1,
        language=napo.TermConfig(q=0.4, margin="avg"),
        vision=napo.TermConfig(q=0.9),
        weights=[0.5, 0.3, 0.2],
    )
    fixed = {name: _margins(5) - 30 for name in ("rc", "rr", "rl", "rv", "rca", "rra", "rla", "rva")}

    def total(pc, pr, pl, pv, pca, pla):
        return objective(
            pc, pr, fixed["rc"], fixed["rr"], pl, fixed["rl"], pv, fixed["rv"],
            policy_chosen_avg_logps=pca, reference_chosen_avg_logps=fixed["rca"],
            policy_language_avg_logps=pla, reference_language_avg_logps=fixed["rla"],
        ).loss  # fmt: skip

    inputs = tuple(_margins(5, requires_grad=True) - 30 for _ in range(6))
    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-9)


@pytest.mark.parametrize("q", [0.0, 1e-3, 0.4, 1.0])
def test_gradgradcheck_napo_loss_op(q):
    # The first gradient used to come back detached (requires_grad=False): a gradient penalty lost
    # its second-order part silently. d2L/dM2 = dL/dM * beta * (q sigmoid(-z) - sigmoid(z)).
    margins = _margins(11, requires_grad=True)
    qt = torch.tensor(q, dtype=F64)
    assert torch.autograd.gradgradcheck(
        lambda m: torch.ops.napo.napo_loss(m, qt, 0.3)[0], (margins,), eps=1e-6, atol=1e-9
    )
    stacked = torch.randn(3, 6, dtype=F64, requires_grad=True)
    rows_q = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    assert torch.autograd.gradgradcheck(
        lambda m: torch.ops.napo.napo_loss(m, rows_q, 0.7)[0], (stacked,), eps=1e-6, atol=1e-9
    )


def test_gradient_penalty_matches_the_reference_formula():
    """A gradient penalty through napo_loss equals torch autograd's through the reference formula."""
    from napo.backends import reference

    torch.manual_seed(0)
    base = _margins(9) + torch.linspace(-40, 40, 9, dtype=F64)
    q = torch.tensor(0.35, dtype=F64)

    def penalised(loss_fn):
        margins = base.clone().requires_grad_(True)
        loss = loss_fn(margins, q, 0.2)[0]
        (grad,) = torch.autograd.grad(loss.sum(), margins, create_graph=True)
        total = loss.sum() + (grad**2).sum() * 1e3
        (total_grad,) = torch.autograd.grad(total, margins)
        return total.detach(), total_grad

    value, grad = penalised(torch.ops.napo.napo_loss)
    expected_value, expected_grad = penalised(reference.napo_loss)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_gradient_penalty_through_the_functional():
    logps = [_margins(5, requires_grad=i < 2) - 20 for i in range(4)]

    def grad_norm(policy_chosen, policy_rejected):
        loss = napo.napo_loss(policy_chosen, policy_rejected, logps[2], logps[3], beta=0.5, q=0.6).sum()
        grads = torch.autograd.grad(loss, (policy_chosen, policy_rejected), create_graph=True)
        return sum((g**2).sum() for g in grads)

    assert torch.autograd.gradcheck(grad_norm, (logps[0], logps[1]), eps=1e-6, atol=1e-9)
