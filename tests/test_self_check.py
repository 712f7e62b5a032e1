"""The self-check of napo's native kernels (napo/backends/native.py), tested on the CPU kernels.

On a GPU the first call of each op on each device and dtype compares the kernel with the reference
there. Without a GPU the same logic runs here on the CPU kernels, with a test-only hook that perturbs
a kernel's output: the check must catch it, warn once, and hand back the reference's result.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from napo.backends import native, reference


@pytest.fixture
def checked_cpu(monkeypatch):
    """CPU kernels checked on first use, with a fresh record of results."""
    monkeypatch.setattr(native, "_self_check_devices", frozenset({"cpu"}))
    monkeypatch.setattr(native, "_self_check_results", {})
    monkeypatch.setattr(native, "_self_check_on", None)
    monkeypatch.delenv("NAPO_CUDA_SELF_CHECK", raising=False)
    return monkeypatch


def _break(op_name: str, offset: float = 0.5):
    return lambda op, out: out + offset if op == op_name else out


def _loss_inputs():
    margins = torch.linspace(-3, 3, 40, dtype=torch.float64).reshape(2, 20)
    return margins, torch.tensor([0.2, 0.7], dtype=torch.float64)


def test_a_kernel_that_disagrees_warns_once_and_the_reference_is_used(checked_cpu):
    checked_cpu.setattr(native, "_test_perturbation", _break("napo_loss"))
    margins, q = _loss_inputs()
    with pytest.warns(RuntimeWarning) as caught:
        loss, factor = torch.ops.napo.napo_loss(margins, q, 0.5)
    messages = [str(w.message) for w in caught if "disagrees" in str(w.message)]
    assert len(messages) == 1
    assert "napo_loss" in messages[0] and "cpu" in messages[0] and "float64" in messages[0]
    assert "max error 0.5" in messages[0] and "NAPO_CUDA_SELF_CHECK=0" in messages[0]
    want_loss, want_factor = reference.napo_loss(margins, q, 0.5)
    assert torch.equal(loss, want_loss) and torch.equal(factor, want_factor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, still the reference
        again, _ = torch.ops.napo.napo_loss(margins, q, 0.5)
        assert torch.equal(again, want_loss)
        # Only that op, device and dtype falls back: other ops (and dtypes) are checked on their own.
        weights = torch.ops.napo.dynamic_weights(torch.tensor([1.0, 3.0], dtype=torch.float64), 0.01, 1e-8)
        assert weights.tolist() == [0.25, 0.75]
    with pytest.warns(RuntimeWarning, match="napo_loss .* dtype float32"):
        torch.ops.napo.napo_loss(margins.float(), q.float(), 0.5)
    assert native._self_check_results == {
        ("napo_loss", "cpu", None, torch.float64): False,
        ("dynamic_weights", "cpu", None, torch.float64): True,
        ("napo_loss", "cpu", None, torch.float32): False,
    }


def test_without_the_check_the_broken_kernel_result_would_reach_the_user(checked_cpu):
    """What the check protects against: NAPO_CUDA_SELF_CHECK=0 returns the perturbed kernel output."""
    checked_cpu.setenv("NAPO_CUDA_SELF_CHECK", "0")
    checked_cpu.setattr(native, "_test_perturbation", _break("napo_loss"))
    margins, q = _loss_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = torch.ops.napo.napo_loss(margins, q, 0.5)
    assert torch.allclose(loss, reference.napo_loss(margins, q, 0.5)[0] + 0.5)


def test_kernels_that_agree_pass_silently_and_keep_their_own_results(checked_cpu):
    logits = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    labels = torch.randint(0, 64, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token, lse = torch.ops.napo.token_logps(logits, labels, -100, 1, False)
    assert native._self_check_results == {("token_logps", "cpu", None, torch.bfloat16): True}
    assert token.shape == (2, 4) and torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_broken_logps_backward_falls_back_in_place_too(checked_cpu, dtype):
    checked_cpu.setattr(native, "_test_perturbation", _break("token_logps_backward", 0.25))
    logits = torch.randn(2, 5, 64).to(dtype)
    labels = torch.randint(0, 64, (2, 5))
    _, lse = reference.token_logps(logits, labels, -100, 1, False)
    grad_token = torch.randn(2, 4)
    want = reference.token_logps_backward(grad_token, logits, labels, lse, -100, 1)
    with pytest.warns(RuntimeWarning, match=f"token_logps_backward .* dtype {str(dtype)[6:]}"):
        native.token_logps_backward_inplace(grad_token, logits, labels, lse, -100, 1)
    assert torch.equal(logits, want)


def test_every_check_passes_on_the_cpu_kernels_and_is_cheap():
    results = [
        native.run_self_check(op, torch.device("cpu"), dtype)
        for op, dtypes in native.SELF_CHECK_OPS.items()
        for dtype in dtypes
    ]
    assert len(results) == 18 and all(r.ok for r in results), [r for r in results if not r.ok]
    assert sum(r.seconds for r in results) < 5.0


def test_a_nan_from_the_kernel_fails_the_check(checked_cpu):
    checked_cpu.setattr(
        native, "_test_perturbation", lambda op, out: out * float("nan") if op == "q_from_mean" else out
    )
    result = native.run_self_check("q_from_mean", torch.device("cpu"), torch.float32)
    assert not result.ok and result.max_error == float("inf")


def test_the_check_runs_under_torch_compile(checked_cpu):
    checked_cpu.setattr(native, "_test_perturbation", _break("napo_loss"))
    margins, q = _loss_inputs()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def loss_of(m, q):
        return torch.ops.napo.napo_loss(m, q, 0.5)[0].sum()

    with pytest.warns(RuntimeWarning, match="disagrees"):
        total = loss_of(margins, q)
    assert torch.allclose(total, reference.napo_loss(margins, q, 0.5)[0].sum())


def test_a_first_call_during_cuda_graph_capture_skips_the_check_with_a_warning(checked_cpu):
    """The capture branch, driven without a GPU: a stand-in CUDA tensor and a stubbed capture state."""

    class CudaStandIn:
        device = torch.device("cuda", 0)
        dtype = torch.float32

    checked_cpu.setattr(native, "_self_check_devices", frozenset({"cuda"}))
    checked_cpu.setattr(native, "_warned_capture", False)
    checked_cpu.setattr(native, "describe_device", lambda device: "cuda:0 (stand-in)")
    capturing = [True]
    checked_cpu.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    ran = []

    def fake_check(op, device, dtype):
        ran.append((op, device, dtype))
        return native.SelfCheckResult(op, "cuda:0 (stand-in)", dtype, 0.0, 1e-5, 0.001)

    checked_cpu.setattr(native, "run_self_check", fake_check)
    with pytest.warns(RuntimeWarning, match="during a CUDA-graph capture, where the check cannot run"):
        assert native._kernel_trusted("napo_loss", CudaStandIn())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process
        assert native._kernel_trusted("token_logps", CudaStandIn())
    assert ran == [] and native._self_check_results == {}
    capturing[0] = False  # the next eager call checks, once
    assert native._kernel_trusted("napo_loss", CudaStandIn()) and native._kernel_trusted("napo_loss", CudaStandIn())
    assert ran == [("napo_loss", torch.device("cuda", 0), torch.float32)]
    assert native._self_check_results == {("napo_loss", "cuda", 0, torch.float32): True}
