"""napo's CUDA kernels on the CPU emulation of CUDA (csrc/cuda/emu), from Python.

``make test-cuda-emu`` runs the kernels under the sanitizers against the C CPU kernels; here the same
kernel sources, built by the Makefile into a shared library and loaded with ctypes, are compared with
napo's PyTorch reference; the emulator's 16-bit conversions are checked against torch's over every bit
pattern; and mutated copies of the kernel sources must make the emulated suite fail (a harness that
cannot fail is not a check).
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import GRAD_TOLERANCES, assert_close

from napo.backends import reference

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "csrc/tests/build/emu/libnapo_cuda_emu.so"
IGNORE = -100
I64 = ctypes.c_int64
P = ctypes.c_void_p
# The 16-bit logits dtypes as napo's C API numbers them (napo_logits_dtype).
LOGITS_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# Emulated kernel against the reference: log-probs accumulate in float32 on the GPU and in the
# reference (float64 for float64 logits), in another order.
LOGPS_TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


class Layout(ctypes.Structure):
    _fields_ = [("rows", I64), ("cols", I64), ("row_stride", I64), ("col_stride", I64)]


class LogitsLayout(ctypes.Structure):
    _fields_ = [(name, I64) for name in ("batch", "time", "vocab", "stride_b", "stride_t", "stride_v")]


class Labels(ctypes.Structure):
    _fields_ = [("data", P), ("stride_b", I64), ("stride_t", I64)]


def _make(*targets: str, **variables: str) -> None:
    assert shutil.which("c++") or shutil.which("g++"), "the emulated CUDA tests need a C++17 compiler (c++/g++)"
    args = ["make", "-s", "-C", str(ROOT), *targets, *(f"{k}={v}" for k, v in variables.items())]
    subprocess.run(args, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def emu() -> ctypes.CDLL:
    return load_emulated_kernels()


def load_emulated_kernels() -> ctypes.CDLL:
    """The CUDA kernels built against the emulator as a shared library, with their C signatures."""
    _make(LIBRARY)
    lib = ctypes.CDLL(str(ROOT / LIBRARY))
    status = ctypes.c_int
    lib.napo_token_logps_cuda.argtypes = [P, LogitsLayout, ctypes.c_int, Labels, I64, P, P, ctypes.c_int, P, P]
    lib.napo_token_logps_backward_cuda.argtypes = [
        P, LogitsLayout, ctypes.c_int, Labels, I64, P, P, P, LogitsLayout, ctypes.c_int, P, P,
    ]  # fmt: skip
    for dtype in ("f32", "f64"):
        d = ctypes.c_double
        getattr(lib, f"napo_loss_forward_{dtype}_cuda").argtypes = [P, Layout, P, I64, d, P, P, ctypes.c_int, P, P]
        getattr(lib, f"napo_loss_backward_{dtype}_cuda").argtypes = [P, Layout, P, P, ctypes.c_int, P, P]
        getattr(lib, f"napo_adaptive_q_{dtype}_cuda").argtypes = [P, I64, I64, d, d, d, P, ctypes.c_int, P, P]
        getattr(lib, f"napo_q_from_mean_{dtype}_cuda").argtypes = [P, I64, I64, d, d, d, P, ctypes.c_int, P, P]
        getattr(lib, f"napo_dynamic_weights_{dtype}_cuda").argtypes = [P, I64, I64, d, d, P, ctypes.c_int, P, P]
    for name in [n for n in dir(lib) if n.startswith("napo_")] + ["napo_token_logps_cuda"]:
        getattr(lib, name).restype = status
    lib.napo_emu_half_to_float.argtypes = lib.napo_emu_bfloat16_to_float.argtypes = [ctypes.c_uint16]
    lib.napo_emu_half_to_float.restype = lib.napo_emu_bfloat16_to_float.restype = ctypes.c_float
    lib.napo_emu_float_to_half.argtypes = lib.napo_emu_float_to_bfloat16.argtypes = [ctypes.c_float]
    lib.napo_emu_float_to_half.restype = lib.napo_emu_float_to_bfloat16.restype = ctypes.c_uint16
    return lib


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# ---- CUDA's 16-bit conversions, every bit pattern ----


def _all_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversions_match_torch_on_every_bit_pattern(emu, dtype):
    to_float = emu.napo_emu_half_to_float if dtype == torch.float16 else emu.napo_emu_bfloat16_to_float
    from_float = emu.napo_emu_float_to_half if dtype == torch.float16 else emu.napo_emu_float_to_bfloat16
    values = _all_patterns(dtype)
    bits = values.view(torch.int16).to(torch.int32) & 0xFFFF
    # 16-bit -> float: exact; a NaN stays a NaN (its payload is not compared: a float NaN crossing
    # ctypes becomes a Python double, which quiets a signalling one).
    want = values.float()
    got = torch.tensor([to_float(int(b)) for b in bits.tolist()], dtype=torch.float32)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite_or_inf = ~torch.isnan(want)
    assert torch.equal(got[finite_or_inf].view(torch.int32), want[finite_or_inf].view(torch.int32))
    # float -> 16-bit, round to nearest even: every representable value, every midpoint between
    # neighbours (the ties) and the floats just either side of each midpoint.
    finite = want[torch.isfinite(want)].double().unique()
    mids = ((finite[1:] + finite[:-1]) / 2).float()
    above = torch.nextafter(mids, torch.tensor(math.inf))
    below = torch.nextafter(mids, torch.tensor(-math.inf))
    big = torch.tensor([math.inf, -math.inf, math.nan, 3e38, -3e38, 65519.996, 65520.0, 1e-30, -1e-30])
    inputs = torch.cat([want, mids, above, below, big])
    expected = inputs.to(dtype)
    got = torch.tensor([from_float(x) for x in inputs.tolist()], dtype=torch.int32).to(torch.int16).view(dtype)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    mismatch = (got.view(torch.int16) != expected.view(torch.int16)) & ~nan
    assert not mismatch.any(), f"{int(mismatch.sum())} of {len(inputs)}: first {inputs[mismatch][:5].tolist()}"


# ---- the emulated kernels against napo's PyTorch reference ----


def _logps(emu, logits, labels):
    batch, time, vocab = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    token = torch.full((batch, time), 7.0, dtype=acc)
    lse = torch.full((batch, time), 7.0, dtype=torch.float64)
    layout = LogitsLayout(batch, time, vocab, *logits.stride())
    lab = Labels(_ptr(labels), *labels.stride())
    err = ctypes.c_int(0)
    status = emu.napo_token_logps_cuda(
        _ptr(logits), layout, LOGITS_DTYPES[logits.dtype], lab, IGNORE, _ptr(token), _ptr(lse), 0, None,
        ctypes.byref(err),
    )  # fmt: skip
    assert status == 0, (status, err.value)
    return token, lse, layout, lab


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 257, 32000])
def test_token_logps_and_backward_match_reference(emu, dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    # A transposed view: memory [time, batch, vocab].
    logits = (torch.randn(3, 2, vocab, generator=gen) * 3).to(dtype).transpose(0, 1)
    labels = torch.randint(0, vocab, (2, 3), generator=gen)
    labels[0, 0], labels[1, 2], labels[1, 1] = 0, vocab - 1, IGNORE
    token, lse, layout, lab = _logps(emu, logits, labels)
    want_token, want_lse = reference.token_logps(logits, labels, IGNORE, 0, False)
    tol = LOGPS_TOLERANCES[dtype]
    assert_close(token, want_token, rtol=tol, atol=tol, what="token_logps")
    assert_close(lse, want_lse, rtol=tol, atol=tol, what="lse")
    grad_token = torch.randn(token.shape, generator=gen, dtype=token.dtype)
    grad = torch.full_like(logits, 5.0)
    err = ctypes.c_int(0)
    grad_layout = LogitsLayout(*layout_of(grad))
    status = emu.napo_token_logps_backward_cuda(
        _ptr(logits), layout, LOGITS_DTYPES[dtype], lab, IGNORE, _ptr(want_lse), _ptr(grad_token), _ptr(grad),
        grad_layout, 0, None, ctypes.byref(err),
    )  # fmt: skip
    assert status == 0
    want = reference.token_logps_backward(grad_token, logits, labels, want_lse, IGNORE, 0)
    assert_close(grad, want, **GRAD_TOLERANCES[dtype], what="grad_logits")


def layout_of(t: torch.Tensor) -> tuple[int, ...]:
    return (*t.shape, *t.stride())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_objective_kernels_match_reference(emu, dtype):
    name = "f32" if dtype == torch.float32 else "f64"
    gen = torch.Generator().manual_seed(3)
    err = ctypes.byref(ctypes.c_int(0))
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-7}
    # Loss and its backward: 3 terms x 300 pairs (two blocks), one q per term, a transposed view.
    margins = (torch.randn(300, 3, generator=gen, dtype=torch.float64) * 5).to(dtype).t()
    q = torch.tensor([0.0, 0.4, 1.0], dtype=dtype)
    loss, factor = torch.empty(3, 300, dtype=dtype), torch.empty(3, 300, dtype=dtype)
    layout = Layout(3, 300, *margins.stride())
    fn = getattr(emu, f"napo_loss_forward_{name}_cuda")
    assert fn(_ptr(margins), layout, _ptr(q), 1, 0.5, _ptr(loss), _ptr(factor), 0, None, err) == 0
    want_loss, want_factor = reference.napo_loss(margins, q, 0.5)
    assert_close(loss, want_loss, **tol, what="loss")
    assert_close(factor, want_factor, **tol, what="grad_factor")
    upstream, back = torch.rand(3, 300, generator=gen, dtype=dtype), torch.empty(3, 300, dtype=dtype)
    fn = getattr(emu, f"napo_loss_backward_{name}_cuda")
    assert fn(_ptr(upstream), Layout(3, 300, 300, 1), _ptr(factor), _ptr(back), 0, None, err) == 0
    assert_close(back, reference.napo_loss_backward(upstream, factor), **tol, what="loss backward")
    # adaptive q and q from means, over more values than one block has threads.
    values = torch.randn(1000, generator=gen, dtype=torch.float64).to(dtype)
    q_out = torch.empty((), dtype=dtype)
    fn = getattr(emu, f"napo_adaptive_q_{name}_cuda")
    assert fn(_ptr(values), 1, 1000, 0.7, 0.0, 1.0, _ptr(q_out), 0, None, err) == 0
    assert_close(q_out, reference.adaptive_q(values, 0.7, 0.0, 1.0), **tol, what="adaptive_q")
    means = torch.empty(1000, dtype=dtype)
    fn = getattr(emu, f"napo_q_from_mean_{name}_cuda")
    assert fn(_ptr(values), 1000, 1, 0.7, 0.05, 0.95, _ptr(means), 0, None, err) == 0
    assert_close(means, reference.q_from_mean(values, 0.7, 0.05, 0.95), **tol, what="q_from_mean")
    # Dynamic weights, with the step-0, sum <= 0 and infinite-margin edges.
    inf = math.inf
    for rewards in ([1.0, 2.0, 3.0], [0.0] * 5, [-1.0, 0.5, 0.2], [inf, 1.0, 1.0], [inf, -2.0, inf], [inf, -inf]):
        r = torch.tensor(rewards, dtype=dtype)
        w = torch.empty_like(r)
        fn = getattr(emu, f"napo_dynamic_weights_{name}_cuda")
        assert fn(_ptr(r), 1, len(rewards), 0.01, 1e-8, _ptr(w), 0, None, err) == 0
        assert_close(w, reference.dynamic_weights(r, 0.01, 1e-8), **tol, what=f"dynamic_weights {rewards}")


# ---- planted faults: each must make the emulated suite fail ----

MUTANTS = {
    # The barrier inside the forward's tree reduction: a data race ThreadSanitizer reports (and, in
    # most runs, wrong sums; TSan's detection depends on the interleaving, so either symptom counts).
    "syncthreads removed": (
        "cuda/logps_kernels.cuh",
        r"(shared_sum\[threadIdx\.x\] = s;\n    \}\n)    __syncthreads\(\);\n",
        r"\1",
        "tsan",
        "ThreadSanitizer: data race|FAILED",
    ),
    # The reduction's first stride one short: the last two partial sums are never merged.
    "reduction stride off by one": (
        "cuda/logps_kernels.cuh",
        r"for \(int width = blockDim\.x / 2; width > 0; width /= 2\)",
        "for (int width = blockDim.x / 2 - 1; width > 0; width /= 2)",
        "plain",
        "FAILED",
    ),
    # The gradient's float -> half conversion truncating instead of rounding to nearest even.
    "half conversion truncates": (
        "cuda/logps_kernels.cuh",
        r"return __float2half\(x\);",
        "return __float2half_rz(x);",
        "plain",
        "not rounded as the CPU rounds",
    ),
    # One thread leaving before a barrier the others wait at: undefined on CUDA, stopped by the emulator.
    "divergent barrier": (
        "cuda/logps_kernels.cuh",
        r"(  __shared__ A shared_max\[kThreads\], shared_sum\[kThreads\];\n)",
        r"  if (threadIdx.x == 3) {\n    return;\n  }\n\1",
        "plain",
        "divergent barrier in kernel forward_kernel",
    ),
}


def _mutated_tree(tmp_path: Path, relative: str, pattern: str, replacement: str) -> Path:
    tree = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", tree, ignore=shutil.ignore_patterns("build"))
    source = tree / relative
    text, count = re.subn(pattern, replacement, source.read_text())
    assert count == 1, f"the mutation of {relative} no longer applies ({count} matches): update the pattern"
    source.write_text(text)
    return tree


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_each_planted_fault_fails_the_emulated_suite(tmp_path, mutant):
    relative, pattern, replacement, sanitizer, symptom = MUTANTS[mutant]
    tree = _mutated_tree(tmp_path, relative, pattern, replacement)
    build = tmp_path / "build"
    driver = build / f"test_cuda_emu_{sanitizer}"
    _make(str(driver), EMU_SRC=str(tree), EMU_BUILD=str(build))
    run = subprocess.run([str(driver), "--quick"], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0, f"the emulated suite passed with the fault '{mutant}' planted:\n{run.stdout}"
    assert re.search(symptom, run.stderr), run.stderr[-3000:]


def test_a_kernel_using_an_unmodelled_feature_does_not_compile(tmp_path):
    """Warp shuffles and atomics are not emulated: using one must fail the build, not run something else."""
    tree = _mutated_tree(
        tmp_path,
        "cuda/objective_kernels.cuh",
        r"(  const double result = partial\[0\];\n)",
        r"\1  (void)__shfl_down_sync(0xffffffffu, result, 1);\n",
    )
    build = tmp_path / "build"
    with pytest.raises(subprocess.CalledProcessError) as failure:
        _make(str(build / "test_cuda_emu_plain"), EMU_SRC=str(tree), EMU_BUILD=str(build))
    assert "warp shuffles are not modelled by napo's CUDA emulator" in failure.value.stderr
