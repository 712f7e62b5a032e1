"""C (CPU) and CUDA C kernels of napo's ops, called through ``napo._C``.

Tensors cross into C as DLPack capsules made by ``torch.utils.dlpack.to_dlpack``
(detached: the op's autograd is registered separately, and DLPack refuses
tensors that require grad). The capsule path skips the two Python-level
``__dlpack__``/``__dlpack_device__`` calls per tensor and never synchronises
streams. Outputs are allocated here, by torch, so that on CUDA they come from
the caching allocator and a graph capture sees only kernel launches on the
current stream. A CUDA tensor on a build without CUDA kernels falls back to the
reference kernels, with one warning; so does every CUDA tensor when the CUDA runtime napo links
cannot start (a driver older than that runtime).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.dlpack import to_dlpack

from napo._native import env_flag, native
from napo._ops import LSE_DTYPE, accumulation_dtype
from napo.backends import label_check, reference


def _capsule(tensor: torch.Tensor) -> Any:
    return to_dlpack(tensor.detach())


def _launch(tensor: torch.Tensor) -> dict[str, int]:
    """The stream to launch on: the current one of the tensor's device (the kernels set the device)."""
    if tensor.device.type != "cuda":
        return {}
    return {"stream": torch.cuda.current_stream(tensor.device).cuda_stream}


# Why CUDA tensors cannot use napo's CUDA kernels in this process (None: they can), decided once.
_cuda_problem: str | None = None
_cuda_checked = False
_warned_cuda_fallback = False


def _find_cuda_problem() -> str | None:
    """None when napo's CUDA kernels can run here; otherwise why not and what to do, for the warning."""
    module = native()
    if not module.built_with_cuda():
        return (
            "napo was built without CUDA kernels (no nvcc at build time). Reinstall with nvcc on PATH "
            "(NAPO_CUDA=1) for the fused kernels."
        )
    if module.cuda_available():
        return None
    info = module.cuda_runtime_info() or {}
    runtime, driver = info.get("runtime_version", 0), info.get("driver_version", 0)
    built = f"{runtime // 1000}.{runtime % 1000 // 10}"
    supports = f"CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else "no CUDA (no driver found)"
    return (
        f"napo's CUDA kernels cannot start: {info.get('error') or 'no CUDA device visible to them'}. They link "
        f"the CUDA {built} runtime statically, and this machine's driver supports {supports}; torch uses CUDA "
        f"{torch.version.cuda}. Rebuild napo with a CUDA toolkit no newer than the driver (the major version "
        f"torch reports) on PATH: pip install --no-build-isolation --force-reinstall ."
    )


def _cuda_fallback(tensor: torch.Tensor) -> bool:
    """True when a CUDA tensor must take the pure-PyTorch path: no CUDA kernels built, or the CUDA
    runtime they link cannot start here (e.g. a driver older than that runtime). One warning per
    process. The first CUDA call also applies NAPO_CUDA_DEBUG."""
    global _cuda_problem, _cuda_checked, _warned_cuda_fallback
    if tensor.device.type != "cuda":
        return False
    if not _cuda_checked:
        _cuda_problem = _find_cuda_problem()
        if _cuda_problem is None:
            native().set_cuda_debug(cuda_debug_requested())
        _cuda_checked = True
    if _cuda_problem is None:
        return False
    if not _warned_cuda_fallback:
        _warned_cuda_fallback = True
        warnings.warn(
            f"{_cuda_problem} Until then CUDA tensors use napo's pure-PyTorch implementation (slower, same results).",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def cuda_debug_requested() -> bool:
    """NAPO_CUDA_DEBUG=1: napo synchronises and checks for errors after each of its CUDA kernels, so a
    fault is reported by the call that caused it (and one pending from earlier work is named as not
    napo's). Read on the first CUDA call; ``native().set_cuda_debug`` changes it later."""
    return env_flag("NAPO_CUDA_DEBUG", False)


# ---- the kernels themselves (each op below adds the fallbacks) ----


def _loss_kernel(margins: torch.Tensor, q: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad_factor = margins.new_empty(margins.shape), margins.new_empty(margins.shape)
    native().loss_forward(
        _capsule(margins), _capsule(q), beta, _capsule(loss), _capsule(grad_factor), **_launch(margins)
    )
    return _perturbed("napo_loss", loss), _perturbed("napo_loss", grad_factor)


def _loss_backward_kernel(grad_loss: torch.Tensor, grad_factor: torch.Tensor) -> torch.Tensor:
    out = grad_factor.new_empty(grad_factor.shape)
    native().loss_backward(_capsule(grad_loss), _capsule(grad_factor), _capsule(out), **_launch(grad_factor))
    return _perturbed("napo_loss_backward", out)


def _adaptive_q_kernel(margins: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    out = margins.new_empty(())
    native().adaptive_q(_capsule(margins), gamma, q_min, q_max, _capsule(out), **_launch(margins))
    return _perturbed("adaptive_q", out)


def _q_from_mean_kernel(means: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    out = means.new_empty(means.shape)
    native().q_from_mean(_capsule(means), gamma, q_min, q_max, _capsule(out), **_launch(means))
    return _perturbed("q_from_mean", out)


def _dynamic_weights_kernel(reward_margins: torch.Tensor, w_min: float, eps: float) -> torch.Tensor:
    out = reward_margins.new_empty(reward_margins.shape)
    native().dynamic_weights(_capsule(reward_margins), w_min, eps, _capsule(out), **_launch(reward_margins))
    return _perturbed("dynamic_weights", out)


def _token_logps_kernel(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    scored = logits.shape[1] - shift
    token = logits.new_empty((logits.shape[0], scored), dtype=accumulation_dtype(logits.dtype))
    lse = torch.empty_like(token, dtype=LSE_DTYPE)
    aligned = labels[:, shift:]
    # The CUDA kernel never reads out of bounds (a bad label gives NaN), but the ValueError that
    # names the label needs the host: one sync per call, or none (see label_check). The C kernel
    # checks CPU labels itself.
    label_check.check_on_device(aligned, logits.shape[-1], ignore_index, shift)
    native().token_logps(
        _capsule(logits[:, :scored]), _capsule(aligned), ignore_index, _capsule(token), _capsule(lse),
        num_threads=torch.get_num_threads(), position_offset=shift, **_launch(logits),
    )  # fmt: skip
    return _perturbed("token_logps", token), lse


def _token_backward_into(out: torch.Tensor, grad_token, logits, labels, lse, ignore_index: int, shift: int) -> None:
    scored = logits.shape[1] - shift
    native().token_logps_backward(
        _capsule(logits[:, :scored]), _capsule(labels[:, shift:]), ignore_index, _capsule(lse),
        _capsule(grad_token.contiguous()), _capsule(out[:, :scored]), num_threads=torch.get_num_threads(),
        **_launch(logits),
    )  # fmt: skip
    if shift:
        out[:, scored:].zero_()  # positions with no label to score (the last one, causally)
    if _test_perturbation is not None:
        out.copy_(_perturbed("token_logps_backward", out))


def _token_logps_backward_kernel(grad_token, logits, labels, lse, ignore_index: int, shift: int) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _token_backward_into(out, grad_token, logits, labels, lse, ignore_index, shift)
    return out


# ---- the ops ----


def napo_loss(margins: torch.Tensor, q: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _cuda_fallback(margins) or not _kernel_trusted("napo_loss", margins):
        return reference.napo_loss(margins, q, beta)
    return _loss_kernel(margins, q, beta)


def napo_loss_backward(grad_loss: torch.Tensor, grad_factor: torch.Tensor) -> torch.Tensor:
    if _cuda_fallback(grad_factor) or not _kernel_trusted("napo_loss_backward", grad_factor):
        return reference.napo_loss_backward(grad_loss, grad_factor)
    return _loss_backward_kernel(grad_loss, grad_factor)


def adaptive_q(margins: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    if _cuda_fallback(margins) or not _kernel_trusted("adaptive_q", margins):
        return reference.adaptive_q(margins, gamma, q_min, q_max)
    return _adaptive_q_kernel(margins, gamma, q_min, q_max)


def q_from_mean(means: torch.Tensor, gamma: float, q_min: float, q_max: float) -> torch.Tensor:
    if _cuda_fallback(means) or not _kernel_trusted("q_from_mean", means):
        return reference.q_from_mean(means, gamma, q_min, q_max)
    return _q_from_mean_kernel(means, gamma, q_min, q_max)


def dynamic_weights(reward_margins: torch.Tensor, w_min: float, eps: float) -> torch.Tensor:
    if _cuda_fallback(reward_margins) or not _kernel_trusted("dynamic_weights", reward_margins):
        return reference.dynamic_weights(reward_margins, w_min, eps)
    return _dynamic_weights_kernel(reward_margins, w_min, eps)


# ---- sequence log-probs ----


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: int, inplace_backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if _cuda_fallback(logits) or not _kernel_trusted("token_logps", logits):
        return reference.token_logps(logits, labels, ignore_index, shift, inplace_backward)
    return _token_logps_kernel(logits, labels, ignore_index, shift)


def token_logps_backward(
    grad_token: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: int,
) -> torch.Tensor:
    if _cuda_fallback(logits) or not _kernel_trusted("token_logps_backward", logits):
        return reference.token_logps_backward(grad_token, logits, labels, lse, ignore_index, shift)
    return _token_logps_backward_kernel(grad_token, logits, labels, lse, ignore_index, shift)


def token_logps_backward_inplace(
    grad_token: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    shift: int,
) -> None:
    if _cuda_fallback(logits) or not _kernel_trusted("token_logps_backward", logits):
        return reference.token_logps_backward_inplace(grad_token, logits, labels, lse, ignore_index, shift)
    _token_backward_into(logits, grad_token, logits, labels, lse, ignore_index, shift)
    return None


# ---- the self-check: a kernel is used on a device and dtype only after it agreed with the reference there ----
#
# The first call of each op on each CUDA device and dtype runs one small case through the kernel and
# through the reference ops on the same device and compares them. On disagreement napo warns once (op,
# device, compute capability, dtype, max error) and that op uses the reference on that device and dtype
# from then on, so the result is the reference's, never the wrong one. NAPO_CUDA_SELF_CHECK=0 turns it
# off. During a CUDA-graph capture a check cannot run (it allocates and reads its result on the host):
# the kernel is used unchecked, with a warning saying to run one step before capturing. `napo doctor`
# runs the same check for every op, visible GPU and dtype (and, without a GPU, on the CPU kernels).

# Test-only: a function (op, kernel output) -> perturbed output applied to every native kernel's output,
# so the check, the warning and the fallback can be tested on the CPU kernels (tests/test_self_check.py).
_test_perturbation: Callable[[str, torch.Tensor], torch.Tensor] | None = None
# Device types whose kernels are checked on first use: CUDA in production; tests add "cpu".
_self_check_devices: frozenset[str] = frozenset({"cuda"})
_self_check_results: dict[tuple[str, str, int | None, torch.dtype], bool] = {}
_self_check_on: bool | None = None
_warned_capture = False

OBJECTIVE_DTYPES = (torch.float32, torch.float64)
LOGPS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SELF_CHECK_OPS = {
    "napo_loss": OBJECTIVE_DTYPES,
    "napo_loss_backward": OBJECTIVE_DTYPES,
    "adaptive_q": OBJECTIVE_DTYPES,
    "q_from_mean": OBJECTIVE_DTYPES,
    "dynamic_weights": OBJECTIVE_DTYPES,
    "token_logps": LOGPS_DTYPES,
    "token_logps_backward": LOGPS_DTYPES,
}
# Largest error allowed, relative to max(1, |reference|), by the dtype of the compared output: a few
# roundings of that dtype (the kernels and the reference round in other orders). A wrong index, a
# missing barrier or a bad conversion is off by far more.
SELF_CHECK_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _perturbed(op: str, out: torch.Tensor) -> torch.Tensor:
    return out if _test_perturbation is None else _test_perturbation(op, out)


@dataclass(frozen=True)
class SelfCheckResult:
    op: str
    device: str  # e.g. "cuda:0 (NVIDIA H200, compute capability 9.0)" or "cpu"
    dtype: torch.dtype
    max_error: float
    tolerance: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance  # a NaN error is a failure


def self_check_enabled() -> bool:
    """NAPO_CUDA_SELF_CHECK (default on), read once per process."""
    global _self_check_on
    if _self_check_on is None:
        _self_check_on = env_flag("NAPO_CUDA_SELF_CHECK", True)
    return _self_check_on


def describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor})"


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double().to(got.device)
    same_nan = torch.isnan(got) & torch.isnan(want)
    diff = ((got - want).abs() / want.abs().clamp(min=1.0)).masked_fill(same_nan | (got == want), 0.0)
    return float(diff.max().nan_to_num(nan=float("inf"))) if diff.numel() else 0.0


def _case(op: str, device: torch.device, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(kernel output, reference output) pairs of one small case of `op`, covering more than one
    block of 256 threads, ignored labels and the first and last vocabulary entries."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0, low: float = 0.0) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * scale + low).to(device=device, dtype=dtype)

    if op == "napo_loss":
        margins, q = rand(2, 300, scale=12.0, low=-6.0), torch.tensor([0.0, 0.4], dtype=dtype, device=device)
        return list(zip(_loss_kernel(margins, q, 0.7), reference.napo_loss(margins, q, 0.7), strict=True))
    if op == "napo_loss_backward":
        grad_loss, factor = rand(2, 300), rand(2, 300, low=-1.0)
        return [(_loss_backward_kernel(grad_loss, factor), reference.napo_loss_backward(grad_loss, factor))]
    if op == "adaptive_q":
        margins = rand(300, scale=4.0, low=-1.0)
        return [(_adaptive_q_kernel(margins, 0.7, 0.05, 0.95), reference.adaptive_q(margins, 0.7, 0.05, 0.95))]
    if op == "q_from_mean":
        means = rand(300, scale=6.0, low=-3.0)
        return [(_q_from_mean_kernel(means, 0.7, 0.05, 0.95), reference.q_from_mean(means, 0.7, 0.05, 0.95))]
    if op == "dynamic_weights":
        rewards = rand(300, scale=2.0, low=-0.2)
        return [(_dynamic_weights_kernel(rewards, 0.001, 1e-8), reference.dynamic_weights(rewards, 0.001, 1e-8))]
    logits = rand(2, 4, 300, scale=8.0, low=-4.0)
    labels = torch.randint(0, 300, (2, 4), generator=gen)
    labels[0, 0], labels[1, 1], labels[1, 2] = 0, 299, -100
    labels = labels.to(device)
    if op == "token_logps":
        want = reference.token_logps(logits, labels, -100, 1, False)
        return list(zip(_token_logps_kernel(logits, labels, -100, 1), want, strict=True))
    _, lse = reference.token_logps(logits, labels, -100, 1, False)
    grad_token = rand(2, 3, low=-0.5).to(accumulation_dtype(dtype))
    got = _token_logps_backward_kernel(grad_token, logits, labels, lse, -100, 1)
    return [(got, reference.token_logps_backward(grad_token, logits, labels, lse, -100, 1))]


def run_self_check(op: str, device: torch.device, dtype: torch.dtype) -> SelfCheckResult:
    """One small case of `op` through napo's kernel and through the reference on `device`, compared."""
    start = time.perf_counter()
    pairs = _case(op, device, dtype)
    max_error, tolerance = 0.0, 0.0
    for got, want in pairs:
        max_error = max(max_error, _max_error(got, want))
        tolerance = max(tolerance, SELF_CHECK_TOLERANCE[got.dtype])
    return SelfCheckResult(op, describe_device(device), dtype, max_error, tolerance, time.perf_counter() - start)


def _kernel_trusted(op: str, tensor: torch.Tensor) -> bool:
    """False when `op`'s kernel failed its self-check on this tensor's device and dtype (checked on first use)."""
    global _warned_capture
    device = tensor.device
    if device.type not in _self_check_devices:
        return True
    key = (op, device.type, device.index, tensor.dtype)
    trusted = _self_check_results.get(key)
    if trusted is not None:
        return trusted
    if not self_check_enabled():
        return True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        if not _warned_capture:
            _warned_capture = True
            warnings.warn(
                f"napo could not self-check its CUDA kernel for {op} ({tensor.dtype}) on {describe_device(device)}: "
                "the first call came during a CUDA-graph capture, where the check cannot run. The kernel is used "
                "unchecked; run one step eagerly before capturing to have it checked.",
                RuntimeWarning,
                stacklevel=4,
            )
        return True
    result = run_self_check(op, device, tensor.dtype)
    _self_check_results[key] = result.ok
    if not result.ok:
        warnings.warn(
            f"napo's native kernel for {op} disagrees with the PyTorch reference on {result.device}, dtype "
            f"{str(tensor.dtype).removeprefix('torch.')}: max error {result.max_error:.3g} (tolerance "
            f"{result.tolerance:.1g}). napo uses the reference for {op} on this device and dtype from now on "
            "(same results, slower). Please report it with the output of `napo doctor`; "
            "NAPO_CUDA_SELF_CHECK=0 skips the check.",
            RuntimeWarning,
            stacklevel=4,
        )
    return result.ok
