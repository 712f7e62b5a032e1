"""Property-based tests of napo's ops: the native (C) backend against the pure-PyTorch reference.

Hypothesis draws shapes, memory layouts (contiguous, strided, transposed and expanded views),
dtypes and values that include NaN, inf, signed zeros, subnormals and the float64 extremes, with
q, beta and gamma at their edges. Tolerances are stated per property: the C core computes in
double and rounds once, the reference in the tensor's dtype, and where the reference's own
rounding would dominate the oracle is the reference in float64 or exact rational arithmetic.

Budget: every property runs MAX_EXAMPLES examples (NAPO_HYPOTHESIS_EXAMPLES overrides it), with a
fixed derandomized seed, so CI sees the same examples on every run and a failure replays as is;
Hypothesis prints the falsifying example and a reproduction blob. To hunt for new examples:
NAPO_HYPOTHESIS_EXPLORE=1 NAPO_HYPOTHESIS_EXAMPLES=500 pytest tests/test_properties_ops.py
--hypothesis-seed=<N> (a failure prints the @seed that replays it).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import pytest

pytest.importorskip("hypothesis")  # in the test and dev extras; an older venv skips rather than errors
pytest.importorskip("napo._C")

import torch
from conftest import assert_close
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import napo
from napo.backends import reference

MAX_EXAMPLES = int(os.environ.get("NAPO_HYPOTHESIS_EXAMPLES", "60"))
BUDGET = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize="NAPO_HYPOTHESIS_EXPLORE" not in os.environ,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
F64, F32 = torch.float64, torch.float32
INF, NAN = math.inf, math.nan
IGNORE = -100

# ---------------------------------------------------------------------------- strategies

EDGE_VALUES = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1e-30, 1.0, -1.0, 745.0, -745.0, 1e30, -1e30]
EDGE_VALUES += [1e308, -1e308, 1.7976931348623157e308, -1.7976931348623157e308, INF, -INF, NAN]

moderate = st.floats(-60.0, 60.0, allow_nan=False)
any_float = st.one_of(moderate, st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EDGE_VALUES))
finite_float = st.one_of(moderate, st.floats(allow_nan=False, allow_infinity=False))
unit_q = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-310, 1e-12, 1e-8, 1.0000000000000002e-8, 0.5, 1.0]), st.floats(0, 1)
)
positive = st.one_of(st.floats(1e-6, 1e3), st.sampled_from([1e-300, 1e-10, 1.0, 1e10, 1e300]))
LAYOUTS = ["contiguous", "strided", "transposed", "expanded"]


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with `values`' shape in the given memory layout. "expanded" repeats values[0] along
    dim 0 (stride 0), so its values differ from `values` where dim 0 is longer than 1."""
    if layout == "strided":  # every other element of a wider buffer along the last dimension
        wide = torch.full((*values.shape[:-1], 2 * values.shape[-1]), 777.0, dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "transposed" and values.dim() >= 2:  # dims stored in reverse order
        order = list(range(values.dim()))[::-1]
        return values.permute(order).contiguous().permute(order)
    if layout == "expanded" and values.shape[0] > 0:
        return values[:1].expand(values.shape)
    return values.contiguous()


@st.composite
def float_tensors(draw, shape: tuple[int, ...], dtype: torch.dtype, elements=any_float) -> torch.Tensor:
    count = math.prod(shape)
    data = draw(st.lists(elements, min_size=count, max_size=count))
    return torch.tensor(data, dtype=torch.float64).reshape(shape).to(dtype)


def close(actual, expected, *, rtol: float, atol: float, what: str) -> None:
    assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol, what=what)


# ---------------------------------------------------------------------------- the objective

# float64: the two evaluations of the same formula; float32: one rounding of the float64 answer
# (2 ** -23 relative, or one subnormal step).
LOSS_TOL = {F64: {"rtol": 1e-12, "atol": 1e-300}, F32: {"rtol": 2.5e-7, "atol": 1.5e-45}}


@BUDGET
@given(
    data=st.data(),
    dtype=st.sampled_from([F64, F32]),
    rows=st.sampled_from([None, 1, 3]),
    batch=st.integers(0, 6),
    layout=st.sampled_from(LAYOUTS),
    beta=positive,
)
def test_napo_loss_native_matches_reference(data, dtype, rows, batch, layout, beta):
    shape = (batch,) if rows is None else (rows, batch)
    margins = laid_out(data.draw(float_tensors(shape, dtype)), layout)
    q_shape = () if rows is None else (rows,)
    q = torch.tensor(data.draw(st.lists(unit_q, min_size=rows or 1, max_size=rows or 1)), dtype=dtype).reshape(q_shape)
    note(f"margins={margins.tolist()} strides={margins.stride()} q={q.tolist()} beta={beta!r}")
    loss, factor = torch.ops.napo.napo_loss(margins, q, beta)
    # The C core computes in double and rounds once, so float32 results are compared with the
    # reference evaluated in float64: the float32 reference's own intermediates (beta * M with a
    # beta outside float32's range, subnormal sigmoid^q) are off by far more than one rounding.
    expected_loss, expected_factor = reference.napo_loss(margins.double(), q.double(), beta)
    close(loss, expected_loss, **LOSS_TOL[dtype], what="loss")
    close(factor, expected_factor, **LOSS_TOL[dtype], what="dL/dM")
    # The loss is in [0, 1/q] and its derivative in [-beta, 0] wherever the margin is a number.
    q_column = q.double().reshape(q_shape + (1,) * (margins.dim() - q.dim())).expand(margins.shape)
    known = ~torch.isnan(margins)
    value, slope = loss.double()[known], factor.double()[known]
    # (beta as the output dtype holds it: dL/dM = -beta / 2 at M = 0 is -inf in float32 for beta = 1e300.)
    steepest = torch.tensor(beta, dtype=dtype).double() * (1 + 1e-6)
    assert (value >= 0).all() and (slope <= 0).all() and (slope >= -steepest).all()
    positive_q = q_column[known] > 0
    bound = 1 / q_column[known][positive_q]
    assert (value[positive_q] <= bound * (1 + 1e-6)).all()


@BUDGET
@given(data=st.data(), batch=st.integers(1, 5), q=unit_q, beta=st.floats(0.01, 10.0))
def test_napo_loss_backward_native_matches_reference(data, batch, q, beta):
    """First and second derivatives through the op, in float64: the first against the reference's
    closed form, the second against torch autograd through the reference formula (which loses up
    to ~1e-12 relative in each derivative it takes, hence the looser tolerance)."""
    base = data.draw(float_tensors((batch,), F64, st.floats(-200, 200)))
    upstream = data.draw(float_tensors((batch,), F64, st.floats(-3, 3)))
    qt = torch.tensor(q, dtype=F64)

    def derivatives(op):
        margins = base.clone().requires_grad_(True)
        loss = op(margins, qt, beta)[0]
        (grad,) = torch.autograd.grad(loss, margins, upstream, create_graph=True)
        (second,) = torch.autograd.grad(grad.sum(), margins)
        return grad.detach(), second

    grad, second = derivatives(torch.ops.napo.napo_loss)
    _, expected_factor = reference.napo_loss(base, qt, beta)
    _, expected_second = derivatives(reference.napo_loss)
    close(grad, upstream * expected_factor, rtol=1e-13, atol=1e-300, what="gradient")
    close(second, expected_second, rtol=1e-8, atol=1e-13 * beta * beta, what="second derivative")


@BUDGET
@given(data=st.data(), dtype=st.sampled_from([F64, F32, torch.bfloat16]), batch=st.integers(0, 6))
def test_reward_margin_is_the_formula(data, dtype, batch):
    logps = [data.draw(float_tensors((batch,), dtype, finite_float)) for _ in range(4)]
    margins = napo.reward_margin(*logps)
    compute = F64 if dtype == F64 else F32
    assert margins.dtype == compute
    c = [t.to(compute) for t in logps]
    torch.testing.assert_close(margins, (c[0] - c[2]) - (c[1] - c[3]), rtol=0, atol=0, equal_nan=True)


def _mean_tolerance(margins: torch.Tensor, gamma: float) -> float:
    """|dq| <= gamma / 2 * |d mean|; both sums are accurate to a few ulps of sum |M| / n."""
    scale = margins.double().abs().sum().item() / margins.numel()
    return 0.5 * gamma * 8 * 2.0**-52 * scale


@BUDGET
@given(
    data=st.data(),
    dtype=st.sampled_from([F64, F32]),
    batch=st.integers(1, 8),
    layout=st.sampled_from(LAYOUTS),
    gamma=positive,
    bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
)
def test_adaptive_q_native_matches_reference(data, dtype, batch, layout, gamma, bounds):
    margins = laid_out(data.draw(float_tensors((batch,), dtype, any_float)), layout)
    q_min, q_max = bounds
    q = torch.ops.napo.adaptive_q(margins, gamma, q_min, q_max)
    if not torch.isfinite(margins).all():  # NaN, or an infinite mean: the reference's semantics
        close(q, reference.adaptive_q(margins, gamma, q_min, q_max), rtol=0, atol=0, what="non-finite q")
        return
    # The oracle: the exact mean (rational arithmetic), then the reference's q from it.
    exact_mean = float(sum(Fraction(v) for v in margins.double().tolist()) / batch)
    expected = reference.q_from_mean(torch.tensor(exact_mean, dtype=F64), gamma, q_min, q_max)
    atol = _mean_tolerance(margins, gamma) + (1e-15 if dtype == F64 else 1e-7)
    note(f"margins={margins.tolist()} exact mean={exact_mean!r}")
    close(q, expected, rtol=1e-14 if dtype == F64 else 1e-6, atol=atol, what="q")
    # Within the bounds as the output dtype stores them (q_min = 1e-300 is 0 in float32).
    assert torch.tensor(q_min, dtype=dtype).item() <= q.item() <= torch.tensor(q_max, dtype=dtype).item()


@BUDGET
@given(
    data=st.data(),
    dtype=st.sampled_from([F64, F32]),
    shape=st.sampled_from([(), (1,), (4,)]),
    layout=st.sampled_from(LAYOUTS),
    gamma=positive,
    bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
)
def test_q_from_mean_native_matches_reference(data, dtype, shape, layout, gamma, bounds):
    means = data.draw(float_tensors(shape, dtype))
    means = laid_out(means, layout) if means.dim() else means
    q = torch.ops.napo.q_from_mean(means, gamma, *bounds)
    expected = reference.q_from_mean(means, gamma, *bounds)
    # The reference's 1 - sigmoid cancels: up to an ulp of 1 (2.2e-16) off before doubling.
    close(q, expected, rtol=1e-15 if dtype == F64 else 1e-7, atol=5e-16, what="q")


def _exact_weights(margins: list[float], w_min: float, eps: float) -> list[float] | None:
    """Eq. 13 in rational arithmetic; None where the total sits within rounding of eps (either
    answer is right there)."""
    exact = [Fraction(v) for v in margins]
    total = sum(exact)
    if abs(total - Fraction(eps)) <= Fraction(4 * 2.0**-52) * sum(abs(v) for v in exact):
        return None
    if total <= eps:
        return [1 / len(margins)] * len(margins)
    return [min(max(float(v / total), w_min), 1.0) for v in exact]


@BUDGET
@given(
    data=st.data(),
    dtype=st.sampled_from([F64, F32]),
    k=st.integers(1, 6),
    layout=st.sampled_from(["contiguous", "strided"]),
    w_min=st.one_of(st.sampled_from([0.0, 0.01, 1.0]), st.floats(0, 1)),
    eps=st.one_of(st.sampled_from([0.0, 1e-8]), st.floats(0, 1e3)),
)
def test_dynamic_weights_native_matches_exact(data, dtype, k, layout, w_min, eps):
    margins = laid_out(data.draw(float_tensors((k,), dtype, any_float)), layout)
    values = margins.double().tolist()
    weights = torch.ops.napo.dynamic_weights(margins, w_min, eps)
    note(f"margins={values}")
    if not all(math.isfinite(v) for v in values):
        # NaN or inf: the documented semantics, which the reference spells out.
        close(weights, reference.dynamic_weights(margins, w_min, eps), rtol=0, atol=0, what="non-finite weights")
        return
    expected = _exact_weights(values, w_min, eps)
    assume(expected is not None)
    # Relative error of the compensated total: a few ulps, plus eps^2 * sum |R| / |sum R| from
    # the compensation's own rounding.
    exact_total = abs(sum(Fraction(v) for v in values))
    condition = float(sum(abs(Fraction(v)) for v in values) / exact_total) if exact_total else 1.0
    rtol = 4 * 2.0**-52 + 8 * k * 2.0**-104 * condition
    close(weights, torch.tensor(expected, dtype=F64), rtol=max(rtol, 1e-15 if dtype == F64 else 1e-7), atol=0,
          what="weights")  # fmt: skip
    # The reference agrees where its plain sum is well conditioned.
    if condition < 1e3:
        close(weights, reference.dynamic_weights(margins, w_min, eps), rtol=1e-12, atol=0, what="vs reference")


# ---------------------------------------------------------------------------- sequence log-probs

# Per-token log-probs in float32 (float64 for float64 logits); gradients in the logits' dtype.
TOKEN_TOL = {
    F64: {"rtol": 1e-12, "atol": 1e-12},
    F32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1e-5, "atol": 1e-5},
}
GRAD_TOL = {
    F64: {"rtol": 1e-12, "atol": 1e-13},
    F32: {"rtol": 1e-5, "atol": 2e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
}
logit_values = st.one_of(st.floats(-30, 30), st.sampled_from([0.0, -0.0, 1e4, -1e4, 88.0, -104.0]))
special_logits = st.one_of(logit_values, st.sampled_from([INF, -INF, NAN]))


@st.composite
def logits_and_labels(draw, special: bool = False):
    dtype = draw(st.sampled_from([F64, F32, torch.bfloat16]))
    batch, time, vocab = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 9))
    layout = draw(st.sampled_from(LAYOUTS))
    logits = laid_out(
        draw(float_tensors((batch, time, vocab), dtype, special_logits if special else logit_values)), layout
    )
    labels = draw(
        st.lists(st.one_of(st.integers(0, vocab - 1), st.just(IGNORE)), min_size=batch * time, max_size=batch * time)
    )
    return logits, torch.tensor(labels).reshape(batch, time), layout  # fmt: skip


@BUDGET
@given(case=logits_and_labels(), shift=st.sampled_from([0, 1]))
def test_token_logps_native_matches_reference(case, shift):
    logits, labels, layout = case
    dtype = logits.dtype
    assume(logits.shape[1] > shift)
    note(f"logits={logits.tolist()} strides={logits.stride()} labels={labels.tolist()}")
    token, lse = torch.ops.napo.token_logps(logits, labels, IGNORE, shift, False)
    expected_token, expected_lse = reference.token_logps(logits, labels, IGNORE, shift, False)
    close(token, expected_token, **TOKEN_TOL[dtype], what="token log-probs")
    close(lse, expected_lse, **TOKEN_TOL[dtype], what="log-sum-exp")
    grad_token = torch.linspace(-1, 2, token.numel(), dtype=token.dtype).reshape(token.shape)
    # Both backwards get napo's float64 lse: the reference's float32 one is off by an ulp of |lse|
    # (1e-3 at logits of 1e4), which exp(x - lse) would carry into the comparison.
    grad = torch.ops.napo.token_logps_backward(grad_token, logits, labels, lse, IGNORE, shift)
    expected_grad = reference.token_logps_backward(grad_token, logits, labels, lse, IGNORE, shift)
    close(grad, expected_grad, **GRAD_TOL[dtype], what="logits gradient")
    if layout != "expanded":  # in place into a copy of the logits: the out-of-place numbers, bit for bit
        buffer = logits.clone()  # a clone of a strided view is compact: another kernel path, compared with itself
        out_of_place = torch.ops.napo.token_logps_backward(grad_token, buffer, labels, lse, IGNORE, shift)
        torch.ops.napo.token_logps_backward_inplace(grad_token, buffer, labels, lse, IGNORE, shift)
        torch.testing.assert_close(buffer, out_of_place, rtol=0, atol=0, equal_nan=True)


@BUDGET
@given(case=logits_and_labels(special=True))
def test_sequence_logps_non_finite_logits(case):
    """NaN or inf logits at a counted position give NaN for that sequence in both backends, never
    a crash; other sequences are unaffected."""
    logits, labels, _ = case
    logps, avg = napo.sequence_logps(logits, labels)
    token, _ = reference.token_logps(logits, labels, IGNORE, 1, False)
    expected = token.sum(-1)
    close(logps, expected, **TOKEN_TOL[logits.dtype], what="sequence log-probs")
    counted = (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)
    close(avg, expected / counted, **TOKEN_TOL[logits.dtype], what="average log-probs")


@BUDGET
@given(case=logits_and_labels(), inplace=st.booleans())
def test_sequence_logps_gradient_matches_reference(case, inplace):
    logits, labels, layout = case
    if inplace and layout == "expanded" and logits.shape[0] > 1:
        with pytest.raises(ValueError, match="overlap"):
            napo.sequence_logps(logits.detach().requires_grad_(True), labels, inplace_backward=True)
        return
    dtype = logits.dtype

    def gradient(fn):
        leaf = logits.detach().clone().requires_grad_(True)
        view = leaf if layout != "expanded" else leaf[:1].expand(leaf.shape)
        logps, avg = fn(view * 1 if inplace else view)
        (logps.sum() - 0.5 * avg.sum()).backward()
        return logps.detach(), leaf.grad

    logps, grad = gradient(lambda x: napo.sequence_logps(x, labels, inplace_backward=inplace))

    def reference_fn(x):
        token, _ = reference.token_logps(x, labels, IGNORE, 1, False)
        counted = (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)
        return token.sum(-1), token.sum(-1) / counted

    expected_logps, expected_grad = gradient(reference_fn)
    close(logps, expected_logps, **TOKEN_TOL[dtype], what="log-probs")
    close(grad, expected_grad, **GRAD_TOL[dtype], what="gradient")


@BUDGET
@given(
    data=st.data(),
    dtype=st.sampled_from([F64, F32]),
    dims=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(1, 7)),
    hidden_layout=st.sampled_from(LAYOUTS),
    weight_layout=st.sampled_from(["contiguous", "strided", "transposed"]),
    with_bias=st.booleans(),
    chunk_size=st.integers(1, 6),
)
def test_fused_linear_matches_reference(data, dtype, dims, hidden_layout, weight_layout, with_bias, chunk_size):
    batch, time, width, vocab = dims
    hidden = laid_out(data.draw(float_tensors((batch, time, width), dtype, st.floats(-4, 4))), hidden_layout)
    weight = laid_out(data.draw(float_tensors((vocab, width), dtype, st.floats(-2, 2))), weight_layout)
    bias = data.draw(float_tensors((vocab,), dtype, st.floats(-3, 3))) if with_bias else None
    labels = torch.tensor(
        data.draw(st.lists(st.one_of(st.integers(0, vocab - 1), st.just(IGNORE)), min_size=batch * time,
                           max_size=batch * time))
    ).reshape(batch, time)  # fmt: skip

    def run(fused: bool):
        params = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
        b = bias.detach().clone().requires_grad_(True) if with_bias else None
        if fused:
            logps, avg = napo.fused_linear_sequence_logps(params[0], params[1], labels, bias=b, chunk_size=chunk_size)
        else:  # the reference in float64: logits, then TRL's log_softmax + gather
            logits = params[0].double() @ params[1].double().t() + (b.double() if with_bias else 0)
            token, _ = reference.token_logps(logits, labels, IGNORE, 1, False)
            counted = (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)
            logps, avg = token.sum(-1), token.sum(-1) / counted
        (logps.sum() + 0.25 * avg.sum()).backward()
        grads = [p.grad for p in params] + ([b.grad] if with_bias else [])
        return [logps.detach(), *grads]

    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-4}
    for name, got, expected in zip(["logps", "hidden", "weight", "bias"], run(True), run(False), strict=False):
        close(got, expected, **tol, what=name)
