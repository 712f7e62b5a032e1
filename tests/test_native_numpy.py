"""The native functions on NumPy arrays, without torch in the loop (analysis code does this)."""

from __future__ import annotations

import math

import pytest
import torch

from napo.backends import reference

np = pytest.importorskip("numpy")
C = pytest.importorskip("napo._C")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_forward_and_backward_on_numpy(dtype):
    rng = np.random.default_rng()
    margins = (rng.standard_normal(33) * 20).astype(dtype)
    q = np.array(0.35, dtype=dtype)
    loss, factor = np.empty_like(margins), np.empty_like(margins)
    C.loss_forward(margins, q, 0.1, loss, factor)
    expected_loss, expected_factor = reference.napo_loss(
        torch.from_numpy(margins.copy()), torch.from_numpy(q.copy()), 0.1
    )
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(loss, expected_loss.numpy(), rtol=rtol)
    np.testing.assert_allclose(factor, expected_factor.numpy(), rtol=rtol, atol=1e-12)
    loss_only = np.empty_like(margins)
    C.loss_forward(margins, q, 0.1, loss_only)  # the derivative is optional
    np.testing.assert_array_equal(loss_only, loss)

    grad_loss = rng.standard_normal(33).astype(dtype)
    grad = np.empty_like(margins)
    C.loss_backward(grad_loss, factor, grad)
    np.testing.assert_array_equal(grad, grad_loss * factor)


def test_strided_and_reversed_numpy_inputs():
    base = np.linspace(-5, 5, 40)
    for view in (base[::4], base[::-3]):
        out = np.empty(len(view))
        C.loss_forward(view, np.array(1.0), 1.0, out)
        np.testing.assert_allclose(out, 1 / (1 + np.exp(view)), rtol=1e-14)
        q = np.empty(())
        C.adaptive_q(view, 0.5, 0.001, 1.0, q)
        assert q == pytest.approx(min(1.0, 2 / (1 + math.exp(0.5 * view.mean()))), rel=1e-14)


def test_q_from_mean_and_weights_on_numpy():
    q = np.empty((), dtype=np.float32)
    C.q_from_mean(np.array(0.0, dtype=np.float32), 0.5, 0.001, 1.0, q)
    assert q == 1.0
    weights = np.empty(3)
    C.dynamic_weights(np.array([2.0, 1.0, 1.0]), 0.01, 1e-8, weights)
    np.testing.assert_allclose(weights, [0.5, 0.25, 0.25], rtol=1e-15)
    assert not C.built_with_cuda() or isinstance(C.cuda_available(), bool)


def test_arrays_stay_alive_and_unchanged():
    # The exported capsules are released after each call: inputs are neither freed nor written.
    margins = np.arange(5, dtype=np.float64)
    before = margins.copy()
    for _ in range(1000):
        C.loss_forward(margins, np.array(0.5), 0.1, np.empty(5))
    np.testing.assert_array_equal(margins, before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_out_of_range_q_is_named_by_its_own_value_not_the_first_rows(dtype):
    margins = np.zeros((3, 4), dtype=dtype)
    q = np.array([0.5, 0.25, 1.5], dtype=dtype)[::-1].copy()[::-1]  # a negative stride: values in row order
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\], got 1\.5"):
        C.loss_forward(margins, q, 0.1, np.empty_like(margins))
    with pytest.raises(ValueError, match=r"got nan"):
        C.loss_forward(margins, np.array([0.5, math.nan, 2.0], dtype=dtype), 0.1, np.empty_like(margins))


def _cpu_capsule(buffer: np.ndarray, shape: tuple[int, ...]):
    """A 'dltensor' capsule over ``buffer`` (host memory) that claims ``shape``, compact (NULL strides): what a
    producer with a corrupt or hostile shape hands napo."""
    import ctypes

    class Device(ctypes.Structure):
        _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]

    class DataType(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

    class Managed(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device", Device), ("ndim", ctypes.c_int32), ("dtype", DataType),
                    ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.c_void_p),
                    ("byte_offset", ctypes.c_uint64), ("manager_ctx", ctypes.c_void_p),
                    ("deleter", ctypes.c_void_p)]  # fmt: skip

    extents = (ctypes.c_int64 * len(shape))(*shape)
    managed = Managed(buffer.ctypes.data, Device(1, 0), len(shape), DataType(2, 32, 1), extents, None, 0, None, None)
    name = ctypes.create_string_buffer(b"dltensor")
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    capsule = new(ctypes.addressof(managed), ctypes.addressof(name), None)
    return capsule, (buffer, extents, managed, name)  # the second keeps what the capsule points into alive


@pytest.mark.parametrize("shape", [(2**40, 2**40, 2**40), (4, -1, 8), (2**62, 2, 2)])
def test_a_shape_whose_element_count_overflows_is_refused_before_any_arithmetic(shape):
    # Compact strides are products of the extents: (2**40)**2 already overflows int64 (undefined behaviour in C).
    buffer = np.zeros(64, dtype=np.float32)
    logits, alive = _cpu_capsule(buffer, shape)
    labels = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="argument 'logits' has a malformed shape"):
        C.token_logps(logits, labels, -100, np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float64))
    del alive
