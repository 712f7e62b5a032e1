"""The C kernels of the NaPO objective against the pure-PyTorch reference and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BATCH_SIZES, DTYPES, GRAD_TOLERANCES, TOLERANCES, assert_close, random_logps

import napo
from napo.backends import reference

Q_VALUES = [0.0, 1e-6, 0.3, 1.0]


def reference_loss_and_grads(logps: list[torch.Tensor], q: float, beta: float):
    """Loss and gradients through torch autograd of the reference formula (not napo's backward)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in logps]
    upcast = [t.to(torch.float64 if t.dtype == torch.float64 else torch.float32) for t in leaves]
    margins = (upcast[0] - upcast[2]) - (upcast[1] - upcast[3])
    loss, _ = reference.napo_loss(margins, torch.tensor(q, dtype=margins.dtype), beta)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    (loss * weights).sum().backward()
    return loss.detach(), leaves[0].grad, leaves[1].grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("q", Q_VALUES)
def test_napo_loss_matches_reference(dtype, batch, q, generator):
    logps = [random_logps(batch, dtype, generator) for _ in range(4)]
    beta = 0.1 + torch.rand((), generator=generator).item()
    expected_loss, expected_grad_chosen, expected_grad_rejected = reference_loss_and_grads(logps, q, beta)

    policy_chosen = logps[0].clone().requires_grad_(True)
    policy_rejected = logps[1].clone().requires_grad_(True)
    loss = napo.napo_loss(policy_chosen, policy_rejected, logps[2], logps[3], beta=beta, q=q)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    (loss * weights).sum().backward()

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert policy_chosen.grad.dtype == dtype
    assert_close(loss, expected_loss, **TOLERANCES[dtype], what="loss")
    assert_close(policy_chosen.grad, expected_grad_chosen, **GRAD_TOLERANCES[dtype], what="grad chosen")
    assert_close(policy_rejected.grad, expected_grad_rejected, **GRAD_TOLERANCES[dtype], what="grad rejected")


def test_q_zero_is_exactly_trl_sigmoid_loss(generator):
    margins = 20 * torch.randn(257, generator=generator, dtype=torch.float64)
    beta = 0.1
    zeros = torch.zeros_like(margins)
    loss = napo.napo_loss(margins, zeros, zeros, zeros, beta=beta, q=0.0)
    trl_sigmoid = -F.logsigmoid(beta * margins)
    assert_close(loss, trl_sigmoid, rtol=1e-15, atol=0, what="q=0 vs -logsigmoid")


def test_tiny_q_agrees_with_dpo_to_1e6_relative(generator):
    # (1 - s^q)/q = -log s * (1 + q log s / 2 + ...): within 1e-6 relative while q |log s| <= 2e-6.
    z = torch.cat([torch.linspace(-1.5, 50, 400, dtype=torch.float64), torch.rand(100, generator=generator) * 3 - 1.5])
    zeros = torch.zeros_like(z)
    for q in (1e-6, 1e-8, 1e-12):
        loss = napo.napo_loss(z, zeros, zeros, zeros, beta=1.0, q=q)
        dpo = -F.logsigmoid(z)
        assert torch.all(((loss - dpo).abs() / dpo) <= 1e-6), q


def test_tiny_q_float32_keeps_precision():
    # The naive (1 - s**q) / q in float32 loses everything at q = 1e-6; the stable form must not.
    z = torch.linspace(-1.5, 10, 101, dtype=torch.float32)
    zeros = torch.zeros_like(z)
    loss = napo.napo_loss(z, zeros, zeros, zeros, beta=1.0, q=1e-6)
    dpo = -F.logsigmoid(z.double())
    assert torch.all(((loss.double() - dpo).abs() / dpo) <= 2e-6)


def test_q_one_is_mae(generator):
    margins = 10 * torch.randn(257, generator=generator, dtype=torch.float64)
    zeros = torch.zeros_like(margins)
    loss = napo.napo_loss(margins, zeros, zeros, zeros, beta=0.5, q=1.0)
    assert_close(loss, 1 - torch.sigmoid(0.5 * margins), rtol=1e-13, atol=1e-15, what="q=1 vs 1 - sigmoid")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", Q_VALUES)
def test_finite_and_bounded_for_huge_margins(dtype, q):
    beta_m = torch.tensor([-1e30, -1e4, -1e3, -80.0, -1.0, 0.0, 1.0, 80.0, 1e3, 1e4, 1e30], dtype=dtype)
    margins = beta_m.clone().requires_grad_(True)
    zeros = torch.zeros_like(beta_m)
    loss = napo.napo_loss(margins, zeros, zeros, zeros, beta=1.0, q=q)
    loss.sum().backward()
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(margins.grad).all(), margins.grad
    assert (loss >= 0).all()
    if q > 0:
        assert (loss <= 1 / q).all()
    # Gradient magnitude: at most beta, vanishing at both ends for q > 0 (noisy pairs are ignored).
    assert (margins.grad.abs() <= 1.0).all()
    if q > 0:
        assert margins.grad[0].abs() < 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_adaptive_q_matches_reference(dtype, batch, generator):
    margins = (3 * torch.randn(batch, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    for gamma in (0.01, 0.5, 3.0):
        q = napo.adaptive_q(margins, gamma=gamma)
        expected = reference.adaptive_q(margins, gamma, 0.001, 1.0)
        assert q.shape == () and q.dtype == dtype
        assert_close(q, expected, **TOLERANCES[dtype], what=f"q gamma={gamma}")


def test_adaptive_q_closed_forms():
    zero = torch.zeros(8, dtype=torch.float64)
    assert napo.adaptive_q(zero, gamma=0.5).item() == 1.0  # step 0: pure MAE
    assert napo.adaptive_q(zero - 5, gamma=0.5).item() == 1.0  # negative margins clip to q_max
    assert napo.adaptive_q(zero + 1e6, gamma=0.5).item() == pytest.approx(0.001, abs=0)  # clip to q_min
    m = torch.tensor([1.0, 3.0], dtype=torch.float64)  # mean 2, gamma 0.5: q = 2 * sigmoid(-1)
    assert napo.adaptive_q(m, gamma=0.5).item() == pytest.approx(2 / (1 + math.e), rel=1e-15)
    assert napo.adaptive_q(m, gamma=0.5, q_max=0.5).item() == 0.5
    assert napo.q_from_mean(torch.tensor(2.0, dtype=torch.float64), gamma=0.5).item() == pytest.approx(
        2 / (1 + math.e), rel=1e-15
    )


def test_adaptive_q_accepts_half_precision_and_strided_margins(generator):
    base = torch.randn(40, generator=generator)
    strided = base[::3]
    expected = reference.adaptive_q(strided.contiguous(), 0.5, 0.001, 1.0)
    assert_close(napo.adaptive_q(strided, gamma=0.5), expected, rtol=1e-6, atol=1e-7, what="strided")
    half = base.to(torch.bfloat16)
    assert_close(
        napo.adaptive_q(half, gamma=0.5), reference.adaptive_q(half.float(), 0.5, 0.001, 1.0), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 257])
def test_dynamic_weights_match_reference(dtype, k, generator):
    rewards = (torch.randn(k, generator=generator, dtype=torch.float64) + 0.3).to(dtype)
    weights = napo.dynamic_weights(rewards)
    assert_close(weights, reference.dynamic_weights(rewards, 0.01, 1e-8), **TOLERANCES[dtype], what="weights")


def test_dynamic_weights_closed_forms():
    w = napo.dynamic_weights(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert w.tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 2], rel=1e-15)
    w = napo.dynamic_weights(torch.tensor([-1.0, 2.0, 0.5], dtype=torch.float64))  # sum 1.5
    assert w.tolist() == pytest.approx([0.01, 1.0, 1 / 3], rel=1e-15)
    for step0 in ([0.0, 0.0, 0.0], [-1.0, 0.5, 0.2], [1e-12, 0.0, 0.0]):  # sum <= eps: uniform
        assert napo.dynamic_weights(step0).tolist() == pytest.approx([1 / 3] * 3, rel=1e-7)
    assert napo.dynamic_weights([5.0]).tolist() == [1.0]


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_subnormal_q_is_dpo(backend):
    # q * logsigmoid(beta M) is subnormal for q = 5e-324 and -expm1(that) / q gave 1.0 at M = 0, not log 2.
    margins = torch.tensor([-30.0, -1.0, 0.0, 0.5, 20.0], dtype=torch.float64)
    op = torch.ops.napo.napo_loss if backend == "native" else reference.napo_loss
    dpo = -F.logsigmoid(margins)
    for q in (5e-324, 1e-310, 2.2250738585072014e-308, 1e-300):
        loss, factor = op(margins, torch.tensor(q, dtype=torch.float64), 1.0)
        assert_close(loss, dpo, rtol=4e-16, atol=0, what=f"{backend} loss q={q}")
        assert_close(factor, -torch.sigmoid(-margins), rtol=4e-16, atol=0, what=f"{backend} dL/dM q={q}")
        assert loss[2].item() == pytest.approx(math.log(2), rel=2e-16, abs=0)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_dynamic_weights_of_huge_margins(backend):
    # 3 * 1e308 overflows: the weights were 1e308 / inf = 0 -> w_min = 0.01 each instead of 1/3.
    op = torch.ops.napo.dynamic_weights if backend == "native" else reference.dynamic_weights
    f64 = torch.float64
    assert op(torch.tensor([1e308] * 3, dtype=f64), 0.01, 1e-8).tolist() == pytest.approx([1 / 3] * 3, rel=1e-15)
    # The running sum overflows but the total (1e308) does not.
    mixed = op(torch.tensor([1e308, 1e308, -1e308], dtype=f64), 0.01, 1e-8).tolist()
    assert mixed == pytest.approx([1.0, 1.0, 0.01], rel=1e-15)
    # A total below -DBL_MAX is still <= eps: uniform.
    assert op(torch.tensor([-1e308, -1e308, 5e307], dtype=f64), 0.01, 1e-8).tolist() == [1 / 3] * 3
    largest = torch.full((4,), torch.finfo(f64).max, dtype=f64)
    assert op(largest, 0.0, 0.0).tolist() == [0.25] * 4
    assert napo.dynamic_weights(torch.tensor([1e308] * 3, dtype=f64)).tolist() == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_adaptive_q_of_huge_margins(backend):
    # Found by tests/test_properties_ops.py: the running sum of finite margins overflowed, so a
    # batch with mean 0 got q = q_min instead of 1.
    op = torch.ops.napo.adaptive_q if backend == "native" else reference.adaptive_q
    cancelling = torch.tensor([1e308, 1e308, -1e308, -1e308], dtype=torch.float64)
    assert op(cancelling, 0.5, 0.001, 1.0).item() == 1.0
    huge = torch.tensor([1e308, 1e308], dtype=torch.float64)
    assert op(huge, 1e-310, 0.001, 1.0).item() == pytest.approx(2 / (1 + math.exp(0.01)), rel=1e-14)
    assert op(torch.tensor([math.inf, -1e308, -1e308], dtype=torch.float64), 0.5, 0.001, 1.0).item() == 0.001


def test_nan_propagates_without_crashing():
    nan_margins = torch.tensor([0.5, float("nan"), -2.0], requires_grad=True)
    zeros = torch.zeros(3)
    loss = napo.napo_loss(nan_margins, zeros, zeros, zeros, q=0.5)
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(nan_margins.grad[1]) and torch.isfinite(nan_margins.grad[[0, 2]]).all()
    assert torch.isnan(napo.adaptive_q(nan_margins.detach(), gamma=0.5))
    assert torch.isnan(napo.dynamic_weights([1.0, float("nan")])).all()
    nan_q = napo.napo_loss(zeros, zeros, zeros, zeros, q=torch.tensor(float("nan")))
    assert torch.isnan(nan_q).all()


def test_tensor_q_is_not_differentiated_but_used(generator):
    margins = torch.randn(5, generator=generator, dtype=torch.float64)
    zeros = torch.zeros_like(margins)
    q = torch.tensor(0.25, dtype=torch.float64)
    from_tensor = napo.napo_loss(margins, zeros, zeros, zeros, q=q)
    from_float = napo.napo_loss(margins, zeros, zeros, zeros, q=0.25)
    assert torch.equal(from_tensor, from_float)


def test_reference_backend_env_switch(tmp_path):
    import subprocess
    import sys

    code = (
        "import torch, napo\n"
        "z = torch.zeros(3)\n"
        "print(napo.napo_loss(z, z, z, z, q=1.0).tolist())\n"
        "print(torch._C._dispatch_has_kernel_for_dispatch_key('napo::napo_loss', 'CPU'))\n"
    )
    env = {**__import__("os").environ, "NAPO_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[0.5, 0.5, 0.5]", "False"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 1), (3, 257), (1, 5), (2, 0)])
def test_loss_op_on_stacked_terms_uses_one_q_per_row(dtype, shape, generator):
    # [K, B] margins, one q per row: what NaPOObjective sends in one kernel call. Non-contiguous (transposed).
    margins = (20 * torch.randn(shape[::-1], generator=generator, dtype=torch.float64)).to(dtype).t()
    q = torch.rand(shape[0], generator=generator, dtype=torch.float64).to(dtype)
    q[0] = 0.0  # a DPO row
    loss, grad_factor = torch.ops.napo.napo_loss(margins, q, 0.3)
    assert loss.shape == margins.shape and loss.is_contiguous() and grad_factor.shape == margins.shape
    for row in range(shape[0]):
        expected_loss, _ = reference.napo_loss(margins[row], q[row], 0.3)
        assert_close(loss[row], expected_loss, **TOLERANCES[dtype], what=f"loss row {row}")
        expected_factor = reference.napo_loss_grad_factor(margins[row], q[row], 0.3)
        assert_close(grad_factor[row], expected_factor, **TOLERANCES[dtype], what=f"dL/dM row {row}")
    grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    assert_close(
        torch.ops.napo.napo_loss_backward(grad, grad_factor), grad * grad_factor, rtol=0, atol=0, what="backward"
    )


def test_q_from_mean_is_elementwise():
    means = torch.tensor([0.0, 2.0, -3.0, 1e6], dtype=torch.float64)
    q = torch.ops.napo.q_from_mean(means, 0.5, 0.001, 1.0)
    assert q.tolist() == pytest.approx([1.0, 2 / (1 + math.e), 1.0, 0.001], rel=1e-15)
    assert_close(q, reference.q_from_mean(means, 0.5, 0.001, 1.0), rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_weights_of_infinite_margins(backend, dtype):
    # [inf, 1, 1] gave [nan, 0.01, 0.01] (inf / inf). The limit of R_k / sum R: the infinite terms
    # share 1 (clipped to [w_min, 1]), the finite ones get w_min.
    op = torch.ops.napo.dynamic_weights if backend == "native" else reference.dynamic_weights
    inf, nan = math.inf, math.nan
    cases = [
        ([inf, 1.0, 1.0], 0.01, [1.0, 0.01, 0.01]),
        ([inf, -5.0, inf, 3e38], 0.01, [0.5, 0.01, 0.5, 0.01]),
        ([inf, inf, inf], 0.5, [0.5, 0.5, 0.5]),  # 1/3 clipped up to w_min
        ([inf, -inf, 1.0], 0.01, [nan, nan, nan]),  # no limit
        ([inf, nan, 1.0], 0.01, [nan, nan, nan]),
        ([-inf, 1.0], 0.01, [0.5, 0.5]),  # a total <= eps: uniform, as before
    ]
    for margins, w_min, expected in cases:
        got = op(torch.tensor(margins, dtype=dtype), w_min, 1e-8)
        assert got.dtype == dtype
        assert_close(got, torch.tensor(expected, dtype=dtype), rtol=0, atol=0, what=str(margins))
    assert napo.dynamic_weights([inf, 1, 1]).tolist() == pytest.approx([1.0, 0.01, 0.01])
