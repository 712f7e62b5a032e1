"""A table of bad inputs to the public API and the exception each raises (never a crash)."""

from __future__ import annotations

import pytest
import torch

import napo

f = torch.zeros(4)
logps4 = (f, f, f, f)


def loss(*args, **kwargs):
    return lambda: napo.napo_loss(*args, **kwargs)


CASES = [
    # (id, call, exception, message fragment)
    ("mismatched shapes", loss(torch.zeros(4), torch.zeros(3), f, f), ValueError, "policy_rejected_logps has shape"),
    ("2-D log-probs", loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2)), ValueError,
     "must be 1-D"),
    ("empty batch", loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0)), ValueError, "empty batch"),
    ("integer dtype", loss(torch.zeros(4, dtype=torch.int64), f, f, f), TypeError, "floating-point dtype"),
    ("complex dtype", loss(torch.zeros(4, dtype=torch.complex64), f, f, f), TypeError, "floating-point dtype"),
    ("not a tensor", loss([0.0] * 4, f, f, f), TypeError, "must be a torch.Tensor"),
    ("different devices", loss(f, f, f, torch.zeros(4, device="meta")), ValueError, "is on meta"),
    ("q above 1", loss(*logps4, q=1.5), ValueError, "q must be in \\[0, 1\\], got 1.5"),
    ("q negative", loss(*logps4, q=-0.1), ValueError, "q must be in \\[0, 1\\]"),
    ("q tensor above 1", loss(*logps4, q=torch.tensor(2.0)), ValueError, "q must be in \\[0, 1\\], got 2.0"),
    ("q tensor not scalar", loss(*logps4, q=torch.ones(2)), ValueError, "0-dim"),
    ("q integer tensor", loss(*logps4, q=torch.tensor(1)), TypeError, "q must have a floating-point dtype"),
    ("q on another device", loss(*logps4, q=torch.tensor(0.5, device="meta")), ValueError, "q is on meta"),
    ("beta zero", loss(*logps4, beta=0.0), ValueError, "beta must be a finite number > 0, got 0.0"),
    ("beta inf", loss(*logps4, beta=float("inf")), ValueError, "beta must be"),
    ("beta string", loss(*logps4, beta="0.1"), TypeError, "beta must be a float"),
    ("gamma zero", lambda: napo.adaptive_q(f, gamma=0.0), ValueError, "gamma must be a finite number > 0, got 0.0"),
    ("gamma negative", lambda: napo.adaptive_q(f, gamma=-1.0), ValueError, "gamma"),
    ("gamma nan", lambda: napo.adaptive_q(f, gamma=float("nan")), ValueError, "gamma"),
    ("q_min above q_max", lambda: napo.adaptive_q(f, gamma=0.5, q_min=0.6, q_max=0.5), ValueError, "q_min must be <="),
    ("q_max above 1", lambda: napo.adaptive_q(f, gamma=0.5, q_max=1.5), ValueError, "q_max must be in"),
    ("adaptive q of empty", lambda: napo.adaptive_q(torch.zeros(0), gamma=0.5), ValueError, "empty"),
    ("adaptive q of 2-D", lambda: napo.adaptive_q(torch.zeros(2, 2), gamma=0.5), ValueError, "1-D"),
    ("adaptive q of ints", lambda: napo.adaptive_q(torch.arange(3), gamma=0.5), TypeError, "floating-point"),
    ("K = 0", lambda: napo.dynamic_weights(torch.zeros(0)), ValueError, "K = 0"),
    ("w_min above 1", lambda: napo.dynamic_weights([1.0, 2.0], w_min=2.0), ValueError, "w_min must be in"),
    ("eps negative", lambda: napo.dynamic_weights([1.0, 2.0], eps=-1.0), ValueError, "eps must be"),
    ("weights of complex", lambda: napo.dynamic_weights(torch.zeros(2, dtype=torch.complex64)), TypeError,
     "floating-point"),
    ("q_from_mean of a vector", lambda: napo.q_from_mean(torch.zeros(3), gamma=0.5), ValueError, "0-dim"),
]  # fmt: skip


@pytest.mark.parametrize("call,exception,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises(call, exception, match):
    with pytest.raises(exception, match=match):
        call()


# The native module itself checks everything again, for callers that skip the Python layer.
np = pytest.importorskip("numpy")
C = pytest.importorskip("napo._C")

v3 = np.zeros(3)


def _used_capsule():
    capsule = torch.zeros(3).__dlpack__()
    torch.from_dlpack(capsule)  # consuming renames it to "used_dltensor"
    return capsule


def _logps_args(token=None, lse=None):
    """token_logps arguments for float32 logits [2, 3, 5], with a buffer replaced."""
    token = np.zeros((2, 3), dtype=np.float32) if token is None else token
    lse = np.zeros((2, 3)) if lse is None else lse
    return np.zeros((2, 3, 5), dtype=np.float32), np.zeros((2, 3), dtype=np.int64), -100, token, lse


NATIVE_CASES = [
    ("not an array", lambda: C.loss_forward([0.0], np.array(0.5), 0.1, v3), TypeError, "must be an array"),
    ("int margins", lambda: C.loss_forward(np.zeros(3, dtype=np.int32), np.array(0.5), 0.1, v3), TypeError,
     "floating-point"),
    ("float16 margins", lambda: C.loss_forward(np.zeros(3, dtype=np.float16), np.array(0.5), 0.1, v3), LookupError,
     "float16"),
    ("mixed dtypes", lambda: C.loss_forward(np.zeros(3, dtype=np.float32), np.array(0.5), 0.1, v3), LookupError,
     "must match"),
    ("out too short", lambda: C.loss_forward(v3, np.array(0.5), 0.1, np.zeros(2)), ValueError,
     "'out' must have the shape of 'margins' \\(3,\\), got \\(2,\\)"),
    ("out strided", lambda: C.loss_forward(v3, np.array(0.5), 0.1, np.zeros(6)[::2]), ValueError, "contiguous"),
    ("q vector", lambda: C.loss_forward(v3, np.zeros(2), 0.1, v3), ValueError, "exactly one value"),
    ("q out of range", lambda: C.loss_forward(v3, np.array(1.5), 0.1, v3), ValueError,
     "q must be in \\[0, 1\\], got 1.5"),
    ("beta negative", lambda: C.loss_forward(v3, np.array(0.5), -1.0, v3), ValueError, "beta must be"),
    ("2-D margins", lambda: C.loss_forward(np.zeros((3, 1)), np.array(0.5), 0.1, v3), ValueError, "1-D"),
    ("backward length", lambda: C.loss_backward(np.zeros(2), v3, v3), ValueError,
     "'grad_loss' must have the shape of 'grad_factor' \\(3,\\), got \\(2,\\)"),
    ("backward out shape", lambda: C.loss_backward(v3, v3, np.zeros(4)), ValueError, "'out' must have the shape"),
    ("grad_out strided", lambda: C.loss_forward(v3, np.array(0.5), 0.1, v3, np.zeros(6)[::2]), ValueError,
     "'grad_out' must be contiguous"),
    ("q per row missing", lambda: C.loss_forward(np.zeros((2, 3)), np.array(0.5), 0.1, np.zeros((2, 3))), ValueError,
     "one value per row"),
    ("3-D margins", lambda: C.loss_forward(np.zeros((2, 2, 2)), np.zeros(2), 0.1, np.zeros((2, 2, 2))), ValueError,
     "1-D \\[batch\\] or 2-D"),
    ("2-D out transposed", lambda: C.loss_forward(np.zeros((2, 3)), np.zeros(2), 0.1, np.zeros((3, 2)).T), ValueError,
     "contiguous"),
    ("consumed capsule", lambda: C.adaptive_q(_used_capsule(), 0.5, 0.0, 1.0, np.zeros(())), TypeError,
     "not an unconsumed 'dltensor' capsule"),
    ("q of empty", lambda: C.adaptive_q(np.zeros(0), 0.5, 0.0, 1.0, np.zeros(())), ValueError, "empty"),
    ("gamma zero", lambda: C.adaptive_q(v3, 0.0, 0.0, 1.0, np.zeros(())), ValueError, "gamma must be"),
    ("q_max below q_min", lambda: C.adaptive_q(v3, 0.5, 0.5, 0.1, np.zeros(())), ValueError, "q_max must be"),
    ("weights K = 0", lambda: C.dynamic_weights(np.zeros(0), 0.01, 1e-8, np.zeros(0)), ValueError, "K >= 1"),
    ("w_min", lambda: C.dynamic_weights(v3, -0.1, 1e-8, v3), ValueError, "w_min must be"),
    ("missing argument", lambda: C.loss_forward(v3, np.array(0.5), 0.1), TypeError, "out"),
    ("lse_out float32", lambda: C.token_logps(*_logps_args(lse=np.zeros((2, 3), dtype=np.float32))), LookupError,
     "'lse_out' must be float64 \\(for float32 logits\\), got float32"),
    ("token_out float64", lambda: C.token_logps(*_logps_args(token=np.zeros((2, 3)))), LookupError,
     "'token_out' must be float32"),
    ("backward lse float32", lambda: C.token_logps_backward(
        np.zeros((2, 3, 5), dtype=np.float32), np.zeros((2, 3), dtype=np.int64), -100,
        np.zeros((2, 3), dtype=np.float32), np.zeros((2, 3), dtype=np.float32), np.zeros((2, 3, 5), dtype=np.float32)),
     LookupError, "'lse' must be float64"),
    ("read-only export", lambda: C.loss_forward(v3, np.array(0.5), 0.1, torch.zeros(3, requires_grad=True)),
     TypeError, "argument 'out' could not be exported through DLPack"),
]  # fmt: skip


@pytest.mark.parametrize("call,exception,match", [c[1:] for c in NATIVE_CASES], ids=[c[0] for c in NATIVE_CASES])
def test_native_bad_input_raises(call, exception, match):
    with pytest.raises(exception, match=match):
        call()
