"""napo.sequence_logps and napo.fused_linear_sequence_logps against TRL's log_softmax + gather recipe."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import napo
from napo.backends import reference

IGNORE = -100

# Forward sums of ~100 float32 log-probs; gradients stored in the logits' dtype.
FORWARD_TOL = {"rtol": 2e-5, "atol": 2e-4}
GRAD_TOL = {
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-6},
    torch.float64: {"rtol": 1e-12, "atol": 1e-15},
}
# float32 gradients: within FLOAT32_GRAD_ULPS ulps of the largest gradient of the float64 truth
# (measured worst over 1000 inputs per shape, 8 and 4 lanes: 1.95), and never more than one such
# ulp further from it than TRL's own float32 recipe (measured worst: 0.44).
FLOAT32_GRAD_ULPS = 3.0


def trl_recipe(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE):
    """TRL's get_batch_logps: shift, log_softmax in float32, gather, masked sum and mean."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    mask = labels != ignore_index
    labels[~mask] = 0
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    per_token = torch.gather(logits.to(dtype).log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    logps = (per_token * mask).sum(-1)
    return logps, logps / mask.sum(-1)


def make_inputs(shape, dtype, generator, ignore_fraction=0.3, scale=3.0):
    batch, time, vocab = shape
    logits = (scale * torch.randn(shape, generator=generator)).to(dtype)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    labels[torch.rand(batch, time, generator=generator) < ignore_fraction] = IGNORE
    labels[:, 1] = torch.randint(0, vocab, (batch,), generator=generator)  # every row counts at least one token
    return logits, labels


def recipe_gradient(logits, labels, weights, dtype):
    """TRL's recipe and its gradient with respect to `logits` computed in `dtype`."""
    leaf = logits.detach().to(dtype).requires_grad_(True)
    logps, avg = trl_recipe(leaf, labels)
    (weights[0].to(logps.dtype) * logps + weights[1].to(logps.dtype) * avg).sum().backward()
    return logps, avg, leaf.grad


def compare(logits, labels, generator, dtype, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    logps, avg = napo.sequence_logps(leaf, labels, **kwargs)
    weights = torch.rand(2, logps.shape[0], generator=generator, dtype=logps.dtype)
    (weights[0] * logps + weights[1] * avg).sum().backward()

    # The oracle is TRL's recipe in float64: the float32 recipe has rounding errors of its own
    # that grow with the vocabulary (7e-6 absolute at V = 70000, measured), which napo's kernel,
    # summing in double and keeping the lse in float64, does not share.
    expected_logps, expected_avg, expected_grad = recipe_gradient(logits, labels, weights, torch.float64)

    assert logps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert leaf.grad.dtype == dtype
    assert_close(logps, expected_logps, **FORWARD_TOL, what="logps")
    assert_close(avg, expected_avg, **FORWARD_TOL, what="avg_logps")
    if dtype != torch.float32:
        assert_close(leaf.grad, expected_grad, **GRAD_TOL[dtype], what="grad logits")
        return
    # A float32 gradient's rounding error is relative to the row's scale, not to each element.
    ulp = torch.finfo(torch.float32).eps * expected_grad.abs().max().item()
    napo_error = (leaf.grad.double() - expected_grad).abs().max().item()
    _, _, trl_grad = recipe_gradient(logits, labels, weights, torch.float32)
    trl_error = (trl_grad.double() - expected_grad).abs().max().item()
    assert napo_error <= FLOAT32_GRAD_ULPS * ulp, f"grad logits off by {napo_error / ulp:.2f} ulps"
    assert napo_error <= trl_error + ulp, f"napo {napo_error / ulp:.2f} ulps off, TRL's recipe {trl_error / ulp:.2f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 96, 4099), (3, 47, 123), (4, 9, 13), (1, 2, 1), (2, 5, 70000)])
def test_matches_trl_recipe(dtype, shape, generator):
    logits, labels = make_inputs(shape, dtype, generator)
    compare(logits, labels, generator, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_logits(dtype, generator):
    big, labels = make_inputs((3, 20, 300), dtype, generator)
    compare(big[:, :, 17:140], labels.clamp(max=122), generator, dtype)  # a slice of the vocabulary
    compare(big.transpose(0, 1).contiguous().transpose(0, 1), labels, generator, dtype)  # batch-minor
    compare(big.transpose(1, 2).contiguous().transpose(1, 2), labels, generator, dtype)  # vocab stride != 1


def test_float64_and_in_place(generator):
    logits, labels = make_inputs((3, 11, 37), torch.float64, generator)
    compare(logits, labels, generator, torch.float64)
    compare(logits, labels, generator, torch.float64, inplace_backward=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_in_place_backward_gives_the_same_gradient(dtype, generator):
    _, labels = make_inputs((2, 33, 517), dtype, generator)
    hidden = torch.randn(2, 33, 8, generator=generator).to(dtype).requires_grad_(True)
    head = torch.randn(8, 517, generator=generator).to(dtype)

    def run(inplace):
        h = hidden.detach().clone().requires_grad_(True)
        logps, avg = napo.sequence_logps(h @ head, labels, inplace_backward=inplace)  # non-leaf logits
        (logps.sum() - 0.5 * avg.sum()).backward()
        return h.grad

    assert_close(run(True), run(False), rtol=0, atol=0, what="in-place vs out-of-place")


def test_in_place_backward_refuses_overlapping_logits(generator):
    # Expanded logits share memory across the batch: writing each position's gradient in place
    # overwrote the others' (off by up to 5.67). The refusal comes at the forward.
    logits, labels = make_inputs((1, 6, 11), torch.float32, generator)
    leaf = logits.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_backward=True needs logits whose memory does not overlap"):
        napo.sequence_logps(leaf.expand(3, 6, 11), labels.expand(3, 6), inplace_backward=True)
    with pytest.raises(ValueError, match="overlap"):
        napo.sequence_logps(leaf.expand(1, 6, 11).as_strided((1, 6, 11), (66, 1, 1)), labels, inplace_backward=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_overlapping_and_strided_logits_get_the_right_gradient(inplace, generator):
    logits, labels = make_inputs((1, 7, 13), torch.float64, generator)
    labels = torch.cat([labels, labels.flip(1), labels], 0)

    def gradient(fn, view):
        leaf = logits.clone().requires_grad_(True)
        logps, avg = fn(view(leaf), labels)
        (logps.sum() + 0.3 * avg.sum()).backward()
        return leaf.grad

    expected = gradient(trl_recipe, lambda x: x.expand(3, 7, 13))
    if inplace:  # a non-overlapping copy is fine in place
        got = gradient(lambda x, y: napo.sequence_logps(x, y, inplace_backward=True), lambda x: x.repeat(3, 1, 1))
    else:
        got = gradient(napo.sequence_logps, lambda x: x.expand(3, 7, 13))
    assert_close(got, expected, rtol=1e-12, atol=1e-14, what="gradient through expanded logits")


def test_native_backward_refuses_overlapping_grad_out(generator):
    C = pytest.importorskip("napo._C")
    logits, labels = make_inputs((3, 5, 7), torch.float32, generator)
    token = torch.empty(3, 4)
    lse = torch.empty(3, 4, dtype=torch.float64)
    aligned = labels[:, 1:].contiguous()
    C.token_logps(logits[:, :4], aligned, IGNORE, token, lse)
    grad_token = torch.ones(3, 4)

    def backward(grad_out, source=logits[:, :4]):
        C.token_logps_backward(source, aligned, IGNORE, lse, grad_token, grad_out)

    with pytest.raises(ValueError, match="'grad_out' overlaps itself"):
        backward(torch.empty(1, 4, 7).expand(3, 4, 7))
    with pytest.raises(ValueError, match="'grad_out' overlaps itself"):
        backward(torch.empty(100).as_strided((3, 4, 7), (7, 1, 1)))
    shifted = logits.clone()
    with pytest.raises(ValueError, match="'grad_out' overlaps 'logits'"):
        backward(shifted[:, 1:], source=shifted[:, :4])
    backward(torch.empty(3, 4, 7))  # a fresh buffer, a strided one and the logits themselves are fine
    backward(torch.empty(3, 4, 14)[:, :, ::2])
    in_place = logits[:, :4].clone()
    backward(in_place, source=in_place)


def test_double_backward_raises_not_zero(generator):
    # Without an autograd formula for the backward op, torch only warned and the second derivative
    # came out as zero (the truth is not).
    logits, labels = make_inputs((2, 5, 7), torch.float64, generator)
    leaf = logits.clone().requires_grad_(True)
    logps, _ = napo.sequence_logps(leaf, labels)
    (grad,) = torch.autograd.grad(logps.sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="sequence_logps does not support double backward"):
        (grad**2).sum().backward()

    logps, _ = napo.sequence_logps(leaf * 1.0, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match=r"inplace_backward=True\) does not support create_graph"):
        torch.autograd.grad(logps.sum(), leaf, create_graph=True)

    hidden = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    logps, _ = napo.fused_linear_sequence_logps(hidden, weight, labels)
    grads = torch.autograd.grad(logps.sum(), (hidden, weight), create_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_sequence_logps does not support double backward"):
        sum((g**2).sum() for g in grads).backward()


def test_sequence_without_counted_tokens_is_zero_not_nan(generator):
    logits, labels = make_inputs((3, 6, 10), torch.float32, generator)
    labels[1] = IGNORE
    leaf = logits.clone().requires_grad_(True)
    logps, avg = napo.sequence_logps(leaf, labels)
    (logps.sum() + avg.sum()).backward()
    assert logps[1].item() == 0.0 and avg[1].item() == 0.0
    assert torch.isfinite(logps).all() and torch.isfinite(avg).all()
    assert (leaf.grad[1] == 0).all() and leaf.grad[0].abs().sum() > 0
    # T = 1: nothing to score.
    one = torch.randn(2, 1, 5, requires_grad=True)
    logps, avg = napo.sequence_logps(one, torch.zeros(2, 1, dtype=torch.long))
    assert logps.tolist() == [0.0, 0.0] and avg.tolist() == [0.0, 0.0]


def test_last_position_and_first_label_do_not_count(generator):
    logits, labels = make_inputs((2, 8, 9), torch.float32, generator)
    leaf = logits.clone().requires_grad_(True)
    napo.sequence_logps(leaf, labels)[0].sum().backward()
    assert (leaf.grad[:, -1] == 0).all()  # the last position has no next label
    changed = labels.clone()
    changed[:, 0] = (labels[:, 0] + 1) % 9  # the first label is never scored
    torch.testing.assert_close(napo.sequence_logps(logits, changed)[0], napo.sequence_logps(logits, labels)[0])


def test_thread_count_does_not_change_results(generator):
    logits, labels = make_inputs((4, 64, 3001), torch.float32, generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = napo.sequence_logps(logits, labels)
        torch.set_num_threads(max(2, threads))
        many = napo.sequence_logps(logits, labels)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_native_matches_reference_backend(generator):
    logits, labels = make_inputs((3, 40, 777), torch.float32, generator)
    token, lse = torch.ops.napo.token_logps(logits, labels, IGNORE, 1, False)
    expected_token, expected_lse = reference.token_logps(logits, labels, IGNORE, 1, False)
    assert lse.dtype == expected_lse.dtype == torch.float64  # the backward needs it unrounded
    assert_close(token, expected_token, rtol=1e-5, atol=1e-5, what="token")
    assert_close(lse, expected_lse, rtol=1e-6, atol=1e-5, what="lse")
    grad = torch.randn(token.shape, generator=generator)
    assert_close(
        torch.ops.napo.token_logps_backward(grad, logits, labels, lse, IGNORE, 1),
        reference.token_logps_backward(grad, logits, labels, lse, IGNORE, 1),
        rtol=1e-5,
        atol=1e-7,
        what="backward",
    )


def test_reference_backward_keeps_float32_precision_at_large_logits():
    # Found by tests/test_properties_ops.py: the reference's backward rounded the float64 lse to
    # float32 before exp(x - lse), an error of an ulp of |lse| (1e-3 at logits of 1e4) in every
    # exponent: gradients of equal logits of 1e4 came out as -0.50011 / 0.49989 instead of -/+0.5.
    logits = torch.full((1, 1, 2), 1e4)
    labels = torch.tensor([[0]])
    token, lse = torch.ops.napo.token_logps(logits, labels, IGNORE, 0, False)
    grad = reference.token_logps_backward(torch.ones_like(token), logits, labels, lse, IGNORE, 0)
    assert grad.reshape(-1).tolist() == [0.5, -0.5]
    scaled = (1e4 + torch.randn(2, 6, 33)).double()  # float32 values, held in float64
    labels = torch.randint(0, 33, (2, 6))
    token, lse = torch.ops.napo.token_logps(scaled, labels, IGNORE, 1, False)
    exact = reference.token_logps_backward(torch.ones_like(token), scaled, labels, lse, IGNORE, 1)
    token32, lse32 = torch.ops.napo.token_logps(scaled.float(), labels, IGNORE, 1, False)
    approx = reference.token_logps_backward(torch.ones_like(token32), scaled.float(), labels, lse32, IGNORE, 1)
    assert (approx.double() - exact).abs().max().item() < 1e-6


def test_gradcheck_float64():
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 3, IGNORE, 6, 1], [2, IGNORE, IGNORE, 0, 4]])

    def both(x):
        logps, avg = napo.sequence_logps(x, labels)
        return logps, avg

    assert torch.autograd.gradcheck(both, (logits,), eps=1e-6, atol=1e-9)
    hidden = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def fused(h, w, b):
        return napo.fused_linear_sequence_logps(h, w, labels, bias=b, chunk_size=2)

    assert torch.autograd.gradcheck(fused, (hidden, weight, bias), eps=1e-6, atol=1e-9)


def _token_examples():
    labels = torch.tensor([[1, 2, IGNORE, 0], [IGNORE, 3, 3, 1]])
    base = torch.randn(2, 4, 9, dtype=torch.float64)
    return [
        (base.clone().requires_grad_(True), labels, IGNORE, 1, False),
        (base.float().clone().requires_grad_(True), labels, IGNORE, 0, False),
        (torch.randn(2, 4, 12)[:, :, 2:11].requires_grad_(False), labels, IGNORE, 1, False),
        (torch.randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long), IGNORE, 1, False),
        (base.bfloat16().clone().requires_grad_(True), labels, IGNORE, 1, False),
    ]


@pytest.mark.parametrize("example", range(5))
def test_opcheck_token_logps(example):
    torch.library.opcheck(torch.ops.napo.token_logps.default, _token_examples()[example])


def test_opcheck_fused_linear():
    labels = torch.tensor([[1, 2, IGNORE, 0], [IGNORE, 3, 3, 1]])
    hidden = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    for bias in (None, torch.randn(5, dtype=torch.float64, requires_grad=True)):
        torch.library.opcheck(
            torch.ops.napo.fused_linear_token_logps.default, (hidden, weight, bias, labels, IGNORE, 1, 3)
        )


def test_compile_fullgraph(generator):
    torch._dynamo.reset()
    logits, labels = make_inputs((2, 12, 50), torch.float32, generator)

    def step(x):
        logps, avg = napo.sequence_logps(x, labels)
        return (logps - avg).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_leaf, compiled_leaf = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    step(eager_leaf).backward()
    compiled(compiled_leaf).backward()
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)
    torch._dynamo.reset()


# ---- the fused LM head ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_fused_linear_matches_unfused(dtype, with_bias, chunk_size, generator):
    batch, time, width, vocab = 3, 21, 16, 301
    _, labels = make_inputs((batch, time, vocab), dtype, generator)
    hidden = torch.randn(batch, time, width, generator=generator).to(dtype)
    weight = (torch.randn(vocab, width, generator=generator) / 4).to(dtype)
    bias = torch.randn(vocab, generator=generator).to(dtype) if with_bias else None

    def run(fused):
        params = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
        b = params[2] if with_bias else None
        if fused:
            logps, avg = napo.fused_linear_sequence_logps(params[0], params[1], labels, bias=b, chunk_size=chunk_size)
        else:
            logits = params[0] @ params[1].t() + (b if b is not None else 0)
            logps, avg = trl_recipe(logits, labels)
        (logps.sum() + 0.3 * avg.sum()).backward()
        return (logps, avg), [p.grad for p in params]

    (logps, avg), grads = run(True)
    (expected_logps, expected_avg), expected_grads = run(False)
    tol = {"rtol": 2e-5, "atol": 2e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 0.2}
    assert_close(logps, expected_logps, **tol, what="logps")
    assert_close(avg, expected_avg, **tol, what="avg")
    grad_tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    for name, got, want in zip(("hidden", "weight", "bias"), grads, expected_grads, strict=False):
        assert got.dtype == dtype
        assert_close(got, want, **grad_tol, what=f"grad {name}")


def test_fused_linear_all_ignored_rows(generator):
    hidden = torch.randn(2, 4, 3, requires_grad=True)
    weight = torch.randn(6, 3, requires_grad=True)
    labels = torch.full((2, 4), IGNORE)
    logps, avg = napo.fused_linear_sequence_logps(hidden, weight, labels)
    (logps.sum() + avg.sum()).backward()
    assert logps.tolist() == [0.0, 0.0] and avg.tolist() == [0.0, 0.0]
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


# ---- bad input ----

L = torch.zeros(2, 5, 7)
Y = torch.zeros(2, 5, dtype=torch.long)


def _labels_with(b, t, value):
    labels = Y.clone()
    labels[b, t] = value
    return labels


BAD = [
    ("label = V", lambda: napo.sequence_logps(L, _labels_with(1, 3, 7)), ValueError,
     r"labels\[1, 3\] = 7 is outside the vocabulary \[0, 7\) and is not ignore_index \(-100\)"),
    ("label negative", lambda: napo.sequence_logps(L, _labels_with(0, 4, -1)), ValueError, r"labels\[0, 4\] = -1"),
    ("label -100 with other ignore", lambda: napo.sequence_logps(L, _labels_with(0, 2, -100), ignore_index=-1),
     ValueError, r"labels\[0, 2\] = -100 .* ignore_index \(-1\)"),
    ("fused label = V", lambda: napo.fused_linear_sequence_logps(torch.zeros(2, 5, 3), torch.zeros(7, 3),
                                                                 _labels_with(1, 1, 99)), ValueError,
     r"labels\[1, 1\] = 99"),
    ("int32 labels", lambda: napo.sequence_logps(L, Y.int()), TypeError, "int64"),
    ("labels shape", lambda: napo.sequence_logps(L, Y[:, :4]), ValueError, r"\[batch, time\] = \(2, 5\)"),
    ("labels on meta", lambda: napo.sequence_logps(L, Y.to("meta")), ValueError, "labels are on meta"),
    ("2-D logits", lambda: napo.sequence_logps(L[0], Y), ValueError, "3-D"),
    ("integer logits", lambda: napo.sequence_logps(L.long(), Y), TypeError, "float32, float64, bfloat16 or float16"),
    ("empty time", lambda: napo.sequence_logps(torch.zeros(2, 0, 7), Y[:, :0]), ValueError, "at least one position"),
    ("ignore_index float", lambda: napo.sequence_logps(L, Y, ignore_index=-100.0), TypeError, "ignore_index"),
    ("weight width", lambda: napo.fused_linear_sequence_logps(torch.zeros(2, 5, 3), torch.zeros(7, 4), Y),
     ValueError, "H = 3"),
    ("weight dtype", lambda: napo.fused_linear_sequence_logps(torch.zeros(2, 5, 3), torch.zeros(7, 3).double(), Y),
     TypeError, "weight has dtype"),
    ("bias shape", lambda: napo.fused_linear_sequence_logps(torch.zeros(2, 5, 3), torch.zeros(7, 3), Y,
                                                            bias=torch.zeros(6)), ValueError, "bias must be"),
    ("hidden size 0", lambda: napo.fused_linear_sequence_logps(torch.zeros(2, 5, 0), torch.zeros(7, 0), Y),
     ValueError, r"hidden size H >= 1, got hidden \(2, 5, 0\)"),
    ("chunk size", lambda: napo.fused_linear_sequence_logps(torch.zeros(2, 5, 3), torch.zeros(7, 3), Y,
                                                            chunk_size=0), ValueError, "chunk_size"),
]  # fmt: skip


@pytest.mark.parametrize("call,exception,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_raises(call, exception, match):
    with pytest.raises(exception, match=match):
        call()
