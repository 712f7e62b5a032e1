"""The CUDA path's host-side logic, tested without a GPU (issue 11).

CUDA tensors are simulated with FakeTensorMode (tensors that report device "cuda" and run no
kernels), and the native module's runtime queries are monkeypatched: the dispatch decisions are
Python and must be right before any GPU sees them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import napo
from napo import _native
from napo.backends import label_check
from napo.backends import native as native_backend

TOO_OLD_DRIVER = {
    "runtime_version": 13000,
    "driver_version": 12040,
    "device_count": 0,
    "error": "CUDA driver version is insufficient for CUDA runtime version",
}


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """The backend's once-per-process CUDA decision and warning, reset for one test."""
    monkeypatch.setattr(native_backend, "_cuda_checked", False)
    monkeypatch.setattr(native_backend, "_cuda_problem", None)
    monkeypatch.setattr(native_backend, "_warned_cuda_fallback", False)
    return _native.native()


def _never(*args, **kwargs):
    raise AssertionError("a native CUDA kernel was called")


# ---- 1. driver fallback ----


def test_unusable_cuda_runtime_falls_back_with_one_warning(fresh_dispatch, monkeypatch):
    module = fresh_dispatch
    monkeypatch.setattr(module, "built_with_cuda", lambda: True)
    monkeypatch.setattr(module, "cuda_available", lambda: False)
    monkeypatch.setattr(module, "cuda_runtime_info", lambda: TOO_OLD_DRIVER)
    for name in ("loss_forward", "loss_backward", "q_from_mean", "token_logps", "set_cuda_debug"):
        monkeypatch.setattr(module, name, _never)
    with FakeTensorMode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        margins = torch.randn(8, device="cuda")
        q = torch.tensor(0.5, device="cuda")
        loss, factor = native_backend.napo_loss(margins, q, 0.1)
        native_backend.napo_loss_backward(torch.ones_like(loss), factor)
        means = native_backend.q_from_mean(torch.randn(3, device="cuda"), 0.5, 0.0, 1.0)
    assert loss.device.type == "cuda" and loss.shape == (8,) and means.shape == (3,)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "driver version is insufficient" in messages[0] and "CUDA 13.0 runtime" in messages[0]
    assert "supports CUDA 12.4" in messages[0]


def test_build_without_cuda_kernels_falls_back(fresh_dispatch, monkeypatch):
    monkeypatch.setattr(fresh_dispatch, "built_with_cuda", lambda: False)
    monkeypatch.setattr(fresh_dispatch, "loss_forward", _never)
    with FakeTensorMode(), pytest.warns(RuntimeWarning, match="built without CUDA kernels"):
        native_backend.napo_loss(torch.randn(4, device="cuda"), torch.tensor(0.0, device="cuda"), 0.1)


def test_usable_cuda_runtime_takes_the_native_path_and_applies_debug_mode(fresh_dispatch, monkeypatch):
    calls = []
    monkeypatch.setattr(fresh_dispatch, "built_with_cuda", lambda: True)
    monkeypatch.setattr(fresh_dispatch, "cuda_available", lambda: True)
    monkeypatch.setattr(fresh_dispatch, "set_cuda_debug", calls.append)
    monkeypatch.setenv("NAPO_CUDA_DEBUG", "1")
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        margins = torch.randn(4, device="cuda")
        assert not native_backend._cuda_fallback(margins)
        assert not native_backend._cuda_fallback(margins)
    assert calls == [True]  # applied once, on the first CUDA call
    assert not native_backend._cuda_fallback(torch.randn(4))  # CPU tensors never fall back


def test_this_machines_cuda_runtime_is_queried_without_a_gpu(fresh_dispatch):
    """The real queries: on a build with CUDA kernels and no usable driver, the reason is named."""
    if not fresh_dispatch.built_with_cuda():
        assert fresh_dispatch.cuda_runtime_info() is None
        pytest.skip("built without CUDA kernels")
    info = fresh_dispatch.cuda_runtime_info()
    assert info["runtime_version"] >= 11000
    if fresh_dispatch.cuda_available():
        assert info["error"] is None and info["device_count"] > 0
        assert native_backend._find_cuda_problem() is None
    else:
        assert "cannot start" in native_backend._find_cuda_problem()


# ---- 5. debug switch ----


@pytest.mark.parametrize(
    ("value", "expected"), [("", False), ("0", False), ("1", True), ("TRUE", True), ("off", False)]
)
def test_cuda_debug_env_var(monkeypatch, value, expected):
    monkeypatch.setenv("NAPO_CUDA_DEBUG", value)
    assert native_backend.cuda_debug_requested() is expected


def test_cuda_debug_env_var_rejects_other_values(monkeypatch):
    monkeypatch.setenv("NAPO_CUDA_DEBUG", "verbose")
    with pytest.raises(ValueError, match=r"NAPO_CUDA_DEBUG.*'verbose'"):
        native_backend.cuda_debug_requested()


def test_set_cuda_debug_is_accepted_by_the_native_module():
    module = _native.native()
    module.set_cuda_debug(True)
    module.set_cuda_debug(False)


# ---- 3. label checks: at most one sync per call, and a switch ----


@pytest.fixture
def labels_as_if_on_cuda(monkeypatch):
    """CPU labels take the CUDA label-check route; host checks (the syncs) are counted."""
    host_checks = []
    real_host_check = label_check.host_check
    monkeypatch.setattr(label_check, "on_cuda", lambda labels: True)
    monkeypatch.setattr(label_check, "_capturing", lambda: False)

    def counting(*args):
        host_checks.append(args)
        real_host_check(*args)

    monkeypatch.setattr(label_check, "host_check", counting)
    return host_checks


def _fused_inputs(rows_counted: int = 40):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, rows_counted // 2 + 1, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)
    labels = torch.randint(0, 50, (2, rows_counted // 2 + 1), generator=generator)
    return hidden, weight, labels


def test_fused_head_checks_labels_once_not_per_chunk(labels_as_if_on_cuda):
    hidden, weight, labels = _fused_inputs()
    flags = []
    real_flag = label_check.pending_flag

    def counting_flag(*args):
        flags.append(args)
        return real_flag(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(label_check, "pending_flag", counting_flag)
        napo.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=4)  # 10 chunks
    assert len(flags) == 1  # one device-side check for the whole batch...
    assert labels_as_if_on_cuda == []  # ...and no host check (sync) of its own, none per chunk


def test_fused_head_still_names_a_bad_label(labels_as_if_on_cuda):
    hidden, weight, labels = _fused_inputs()
    labels[1, 7] = 50
    with pytest.raises(ValueError, match=r"labels\[1, 7\] = 50"):
        napo.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=4)
    assert len(labels_as_if_on_cuda) == 1


def test_unfused_cuda_path_checks_once_per_call_and_can_be_switched_off(labels_as_if_on_cuda, monkeypatch):
    labels = torch.tensor([[1, 2, -100]])
    label_check.check_on_device(labels, 5, -100)
    assert len(labels_as_if_on_cuda) == 1
    monkeypatch.setenv("NAPO_CHECK_LABELS", "0")
    label_check.check_on_device(torch.tensor([[1, 9]]), 5, -100)  # not checked: the kernel gives NaN
    assert len(labels_as_if_on_cuda) == 1
    with pytest.raises(ValueError, match="NAPO_CHECK_LABELS"):
        monkeypatch.setenv("NAPO_CHECK_LABELS", "sometimes")
        label_check.check_on_device(labels, 5, -100)


def test_no_label_check_while_capturing_a_cuda_graph(labels_as_if_on_cuda, monkeypatch):
    monkeypatch.setattr(label_check, "_capturing", lambda: True)
    label_check.check_on_device(torch.tensor([[1, 9]]), 5, -100)
    assert labels_as_if_on_cuda == []


def test_cpu_labels_are_checked_by_the_c_kernels_even_when_switched_off(monkeypatch):
    monkeypatch.setenv("NAPO_CHECK_LABELS", "0")
    with pytest.raises(ValueError, match=r"labels\[0, 2\] = 9"):
        napo.sequence_logps(torch.zeros(1, 4, 5), torch.tensor([[0, 1, 9, 2]]))


# ---- 4. the fused head's weight gradient: half-precision matmul, float32 accumulation ----


def _weight_grad_inputs(dtype):
    generator = torch.Generator().manual_seed(4)
    grad_logits = (torch.randn(96, 300, generator=generator) / 10).to(dtype)  # [chunk, V]
    hidden = torch.randn(96, 48, generator=generator).to(dtype)  # [chunk, H]
    return grad_logits, hidden


def test_half_precision_weight_grad_takes_the_fp32_output_matmul_without_copies(monkeypatch):
    """Where torch has addmm(out_dtype=float32) (CUDA, torch >= 2.9), the half-precision operands go
    to it as they are: no float32 copy of the [chunk, V] gradient. CPU torch has no such kernel, so
    a dispatch mode logs the aten ops and stands in for it (float32 products of the same values)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from napo.backends import fused_linear

    class EmulatedFp32OutMatmul(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.ops.append(str(func))
            if func is torch.ops.aten.addmm.dtype_out:
                acc, a, b, out_dtype = args[:4]
                assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
                return kwargs["out"].copy_(acc + a.float() @ b.float())
            return func(*args, **kwargs)

    monkeypatch.setattr(fused_linear, "_has_fp32_out_matmul", lambda device, dtype: True)
    grad_logits, hidden = _weight_grad_inputs(torch.bfloat16)
    got = torch.zeros(300, 48)
    with EmulatedFp32OutMatmul() as mode:
        fused_linear._accumulate_weight_grad(got, grad_logits, hidden)
    assert [op for op in mode.ops if "mm" in op] == ["aten.addmm.dtype_out"], mode.ops
    assert not any("_to_copy" in op for op in mode.ops), mode.ops
    expected = grad_logits.t().double() @ hidden.double()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_fp32_output_matmul_is_detected_per_device():
    from napo.backends import fused_linear

    cpu = fused_linear._has_fp32_out_matmul(torch.device("cpu"), torch.bfloat16)
    assert cpu == fused_linear._has_fp32_out_matmul(torch.device("cpu"), torch.bfloat16)  # cached
    assert ("cpu", torch.bfloat16) in fused_linear._fp32_out_matmul


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weight_grad_matches_the_fp32_path(dtype):
    """Both paths of _accumulate_weight_grad against float32 products of the same half-precision
    values: they differ only in summation order, so within 1e-5 of the largest |entry| (float32
    rounding of a 96-term sum), accumulated over two chunks. On CPU torch has no out_dtype matmul,
    and the upcast path runs; on a GPU (make gpu-check) the out_dtype one."""
    from napo.backends import fused_linear

    grad_logits, hidden = _weight_grad_inputs(dtype)
    expected = 2 * (grad_logits.t().double() @ hidden.double())
    got = torch.zeros(300, 48)
    fused_linear._accumulate_weight_grad(got, grad_logits, hidden)
    fused_linear._accumulate_weight_grad(got, grad_logits, hidden)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * scale)


# ---- 6. the fused head's chunk size ----


def test_chunk_size_is_256_on_cpu_and_from_a_memory_budget_on_cuda():
    from napo.backends.fused_linear import choose_chunk_size

    assert choose_chunk_size("cpu", 128256, 2) == 256
    gib = 1 << 30
    # H200 (141 GiB total), bf16, V = 128256: 1/64 of 141 GiB over 6 bytes a logit -> 3074, so 3072 rows.
    assert choose_chunk_size("cuda", 128256, 2, 141 * gib) == 3072
    assert choose_chunk_size("cuda", 32000, 2, 141 * gib) == 4096  # capped
    assert choose_chunk_size("cuda", 128256, 2, 24 * gib) == 1024  # floored: a small card
    assert choose_chunk_size("cuda", 128256, 4, 80 * gib) == 1280  # float32 logits, 80 GiB
    assert choose_chunk_size("cuda", 128256, 2, None) == 1024  # memory unknown
    for memory in (8 * gib, 40 * gib, 80 * gib, 96 * gib, 141 * gib, 192 * gib):
        rows = choose_chunk_size("cuda", 50000, 2, memory)
        assert 1024 <= rows <= 4096 and rows % 256 == 0


def test_fused_head_without_chunk_size_uses_the_device_default(monkeypatch):
    from napo.backends import fused_linear

    seen = []
    real = fused_linear._logits_buffer

    def spy(rows, chunk_size, weight):
        seen.append(chunk_size)
        return real(rows, chunk_size, weight)

    monkeypatch.setattr(fused_linear, "_logits_buffer", spy)
    hidden, weight, labels = _fused_inputs()
    hidden.requires_grad_(True)
    logps, _ = napo.fused_linear_sequence_logps(hidden, weight, labels)
    logps.sum().backward()
    assert seen == [256, 256]  # forward and backward, CPU
    expected, _ = napo.fused_linear_sequence_logps(hidden.detach(), weight, labels, chunk_size=3)
    torch.testing.assert_close(logps.detach(), expected)
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
        napo.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=0)
