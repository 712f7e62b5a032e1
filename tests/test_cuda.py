"""CUDA kernels against the reference, no host synchronisation, and CUDA-graph capture.

Skipped (and reported as skipped, not passed) on machines without a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TOLERANCES, assert_close
from test_objective import call, make_batch

import napo
from napo.backends import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_kernels_are_built():
    from napo import _C

    assert _C.built_with_cuda() and _C.cuda_available()


def _assert_loss_matches_reference(margins, q, dtype):
    loss, factor = torch.ops.napo.napo_loss(margins, q, 0.1)
    expected_loss, expected_factor = reference.napo_loss(margins, q, 0.1)
    assert_close(loss, expected_loss, **TOLERANCES[dtype], what="loss")
    assert_close(factor, expected_factor, **TOLERANCES[dtype], what="dL/dM")
    grad = torch.randn_like(loss)
    assert_close(torch.ops.napo.napo_loss_backward(grad, factor), grad * factor, rtol=0, atol=0, what="backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 257, 100_003])
@pytest.mark.parametrize("q", [0.0, 1e-6, 0.3, 1.0])
def test_loss_forward_backward_match_reference(dtype, batch, q):
    margins = (torch.randn(2 * batch, dtype=dtype, device="cuda") * 30)[::2]  # strided too
    qt = torch.tensor(q, dtype=dtype, device="cuda")
    _assert_loss_matches_reference(margins, qt, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_terms_with_row_q_match_reference(dtype):
    margins = (torch.randn(257, 3, dtype=dtype, device="cuda") * 30).t()  # [3, 257], transposed
    q = torch.tensor([0.0, 0.4, 1.0], dtype=dtype, device="cuda")
    _assert_loss_matches_reference(margins, q, dtype)
    grad = torch.ones(1, 1, dtype=dtype, device="cuda").expand(3, 257)  # zero strides
    _, factor = torch.ops.napo.napo_loss(margins, q, 0.1)
    assert_close(torch.ops.napo.napo_loss_backward(grad, factor), factor, rtol=0, atol=0, what="backward")
    means = torch.tensor([0.0, 2.0, -1.0, 1e6], dtype=dtype, device="cuda")
    assert_close(torch.ops.napo.q_from_mean(means, 0.5, 0.001, 1.0), reference.q_from_mean(means, 0.5, 0.001, 1.0),
                 **TOLERANCES[dtype], what="q_from_mean")  # fmt: skip


def test_tensors_on_a_second_gpu_use_that_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    margins = torch.randn(8, device="cuda:1")
    q = torch.tensor(0.5, device="cuda:1")
    _assert_loss_matches_reference(margins, q, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 3, 257, 100_003])
def test_q_and_weights_match_reference(dtype, n):
    margins = torch.randn(n, dtype=dtype, device="cuda") + 0.2
    assert_close(torch.ops.napo.adaptive_q(margins, 0.5, 0.001, 1.0), reference.adaptive_q(margins, 0.5, 0.001, 1.0),
                 **TOLERANCES[dtype], what="q")  # fmt: skip
    mean = margins.mean()
    assert_close(torch.ops.napo.q_from_mean(mean, 0.5, 0.0, 1.0), reference.q_from_mean(mean, 0.5, 0.0, 1.0),
                 **TOLERANCES[dtype], what="q_from_mean")  # fmt: skip
    k = min(n, 300)
    assert_close(torch.ops.napo.dynamic_weights(margins[:k], 0.01, 1e-8),
                 reference.dynamic_weights(margins[:k], 0.01, 1e-8), **TOLERANCES[dtype], what="weights")  # fmt: skip


def test_out_of_range_tensor_q_gives_nan_on_cuda():
    margins = torch.randn(4, device="cuda")
    loss, factor = torch.ops.napo.napo_loss(margins, torch.tensor(1.5, device="cuda"), 0.1)
    assert torch.isnan(loss).all() and torch.isnan(factor).all()


def _cuda_batch(batch_size: int = 64):
    cpu = make_batch(batch_size, torch.float32, torch.Generator().manual_seed(0), requires_grad=False)
    return {k: v.cuda().requires_grad_(k.startswith("policy")) for k, v in cpu.items()}


def test_objective_step_never_syncs_with_host():
    batch = _cuda_batch()
    objective = napo.NaPOObjective()
    call(objective, batch).loss.backward()  # warm-up: allocator, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = call(objective, batch)
        out.loss.backward()
        out.metrics()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize(
    "objective",
    [
        napo.NaPOObjective(),
        napo.NaPOObjective(language=napo.TermConfig(q=0.5), weights=[1.0, 0.5, 0.5]),
    ],
    ids=["paper", "fixed-q-and-weights"],
)
def test_objective_step_cuda_graph_capture_and_replay(objective):
    static = _cuda_batch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up on a side stream, as torch.cuda.graphs recommends
            for v in static.values():
                v.grad = None
            call(objective, static).loss.backward()
    torch.cuda.current_stream().wait_stream(side)
    for v in static.values():
        v.grad = None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(objective, static)
        captured.loss.backward()

    fresh = _cuda_batch()
    with torch.no_grad():
        for key, value in fresh.items():
            static[key].copy_(value.detach() * 1.01)
    graph.replay()
    torch.cuda.synchronize()

    eager_inputs = {k: (v.detach() * 1.01).requires_grad_(k.startswith("policy")) for k, v in fresh.items()}
    eager = call(objective, eager_inputs)
    eager.loss.backward()
    assert_close(captured.loss, eager.loss, rtol=1e-5, atol=1e-6, what="replayed loss")
    for term in napo.TERMS:
        assert_close(captured.q[term], eager.q[term], rtol=1e-5, atol=1e-6, what=f"q {term}")
        assert_close(captured.weights[term], eager.weights[term], rtol=1e-5, atol=1e-6, what=f"w {term}")
    for key, value in eager_inputs.items():
        if value.grad is not None:
            assert_close(static[key].grad, value.grad, rtol=1e-5, atol=1e-6, what=key)


# ---- sequence log-probs on the GPU ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 47, 123), (2, 64, 32000), (1, 2, 7)])
@pytest.mark.parametrize("inplace", [False, True])
def test_sequence_logps_cuda_matches_trl_recipe(dtype, shape, inplace):
    from test_logps import GRAD_TOL, make_inputs, recipe_gradient

    logits, labels = make_inputs(shape, dtype, torch.Generator().manual_seed(1))
    logits, labels = logits.cuda(), labels.cuda()
    hidden = torch.ones(1, device="cuda", dtype=dtype, requires_grad=True)
    got_leaf = logits.clone().requires_grad_(True)
    logps, avg = napo.sequence_logps(got_leaf * hidden, labels, inplace_backward=inplace)  # non-leaf logits
    (logps.sum() + avg.sum()).backward()
    # TRL's recipe in float64 (the truth); the CUDA kernel sums in float32, so float32 gradients
    # get an absolute tolerance of a few float32 ulps of the largest (~1) gradient.
    ones = torch.ones(2, shape[0], device="cuda", dtype=torch.float64)
    expected_logps, expected_avg, expected_grad = recipe_gradient(logits, labels, ones, torch.float64)
    assert_close(logps, expected_logps, rtol=2e-5, atol=2e-4, what="logps")
    assert_close(avg, expected_avg, rtol=2e-5, atol=2e-4, what="avg")
    tolerance = GRAD_TOL.get(dtype, {"rtol": 1e-5, "atol": 1e-6})
    assert_close(got_leaf.grad, expected_grad, **tolerance, what="grad")


def test_fused_linear_cuda_matches_unfused():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 33, 64, generator=generator).cuda().requires_grad_(True)
    weight = (torch.randn(1000, 64, generator=generator) / 8).cuda().requires_grad_(True)
    labels = torch.randint(0, 1000, (2, 33), generator=generator).cuda()
    labels[:, :5] = -100
    logps, _ = napo.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=16)
    logps.sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    from test_logps import trl_recipe

    trl_recipe(hidden @ weight.t(), labels)[0].sum().backward()
    assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-5, what="grad hidden")
    assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-5, what="grad weight")


def test_bad_label_on_cuda_raises_value_error():
    logits = torch.zeros(1, 4, 5, device="cuda")
    labels = torch.tensor([[0, 1, 9, 2]], device="cuda")
    with pytest.raises(ValueError, match=r"labels\[0, 2\] = 9"):
        napo.sequence_logps(logits, labels)


# ---- issue 11: NaN propagation, label checks, weight gradient, chunk size, debug mode ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [7, 123, 1000])
def test_one_nan_logit_gives_nan_on_cuda_in_every_position(dtype, vocab):
    """The block reduction used to drop a thread whose logits were all NaN (max -inf, sum NaN)."""
    logits = torch.randn(1, vocab, vocab, device="cuda").to(dtype)
    logits[0, torch.arange(vocab), torch.arange(vocab)] = float("nan")
    labels = torch.full((1, vocab), (vocab - 1) // 2, device="cuda")
    token, lse = torch.ops.napo.token_logps(logits, labels, -100, 0, False)
    assert torch.isnan(token).all() and torch.isnan(lse).all()


def test_unchecked_bad_label_gives_nan_not_an_out_of_bounds_read(monkeypatch):
    monkeypatch.setenv("NAPO_CHECK_LABELS", "0")
    logits = torch.randn(2, 5, 11, device="cuda", requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 10**9, -7, 5]], device="cuda")
    logps, _ = napo.sequence_logps(logits, labels)
    logps.sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(logps[0]) and torch.isnan(logps[1])
    assert torch.isfinite(logits.grad[0]).all()


def test_sequence_logps_captures_in_a_cuda_graph():
    """While a stream is captured the label check (a sync) is skipped."""
    logits = torch.randn(2, 9, 50, device="cuda")
    labels = torch.randint(0, 50, (2, 9), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        napo.sequence_logps(logits, labels)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = napo.sequence_logps(logits, labels)
    logits.mul_(1.5)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, napo.sequence_logps(logits, labels)[0], rtol=1e-6, atol=1e-5, what="replayed logps")


def test_fused_head_forward_syncs_once():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 64, 32, generator=generator).cuda()
    weight = torch.randn(500, 32, generator=generator).cuda()
    labels = torch.randint(0, 500, (4, 64), generator=generator).cuda()
    napo.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=16)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            napo.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=16)  # 16 chunks
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weight_grad_on_cuda_matches_float64(dtype):
    from napo.backends import fused_linear

    grad_logits = (torch.randn(256, 1000, device="cuda") / 10).to(dtype)
    hidden = torch.randn(256, 64, device="cuda").to(dtype)
    got = torch.zeros(1000, 64, device="cuda")
    fused_linear._accumulate_weight_grad(got, grad_logits, hidden)
    expected = grad_logits.t().double() @ hidden.double()
    assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item(), what="grad weight")


def test_default_chunk_size_on_this_gpu():
    from napo.backends import fused_linear

    weight = torch.empty(128256, 8, device="cuda", dtype=torch.bfloat16)
    assert 1024 <= fused_linear.default_chunk_size(weight) <= 4096


def test_debug_mode_runs_and_syncs():
    from napo import _C

    _C.set_cuda_debug(True)
    try:
        logits = torch.randn(2, 5, 50, device="cuda")
        labels = torch.randint(0, 50, (2, 5), device="cuda")
        assert torch.isfinite(napo.sequence_logps(logits, labels)[0]).all()
    finally:
        _C.set_cuda_debug(False)


def test_numeric_edges_match_the_cpu_kernels():
    """Issue 15's D12 and the adaptive_q overflow, through the CUDA kernels: a subnormal q, and
    sums of finite margins that overflow (more margins than threads, so the block reductions and
    the rescaled second pass are exercised)."""
    f64 = torch.float64
    margins = torch.tensor([-30.0, -1.0, 0.0, 0.5, 20.0], dtype=f64)
    q = torch.tensor(5e-324, dtype=f64)
    for got, expected in zip(
        torch.ops.napo.napo_loss(margins.cuda(), q.cuda(), 1.0), torch.ops.napo.napo_loss(margins, q, 1.0), strict=True
    ):
        assert_close(got, expected, rtol=1e-15, atol=0, what="subnormal q")
    huge = torch.full((1000,), 1e308, dtype=f64)
    weights = torch.ops.napo.dynamic_weights(huge.cuda(), 0.0, 1e-8)
    assert_close(weights, torch.full_like(huge, 1e-3), rtol=1e-14, atol=0, what="weights of huge margins")
    cancelling = torch.cat([huge, -huge])
    assert torch.ops.napo.adaptive_q(cancelling.cuda(), 0.5, 0.001, 1.0).item() == 1.0
    mixed = torch.tensor([1e308, 1e308, -1e308], dtype=f64)
    assert_close(torch.ops.napo.dynamic_weights(mixed.cuda(), 0.01, 1e-8), torch.tensor([1.0, 1.0, 0.01], dtype=f64),
                 rtol=1e-15, atol=0, what="overflowing partial sum")  # fmt: skip


def test_napo_loss_double_backward():
    margins = (torch.randn(33, dtype=torch.float64, device="cuda") * 5).requires_grad_(True)
    q = torch.tensor(0.3, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradgradcheck(lambda m: torch.ops.napo.napo_loss(m, q, 0.4)[0], (margins,), eps=1e-6)
