"""``napo doctor``: what this machine runs napo with, and whether napo's kernels agree with the reference here.

Prints the versions (napo, torch, transformers, TRL, the CUDA runtime napo links and the driver), the
native backends built (the CPU kernels' SIMD width, the CUDA architectures compiled in), then runs the
self-check of napo/backends/native.py (one small case per op through napo's kernel and through the
pure-PyTorch reference, compared) on every visible GPU and dtype; on a machine without a GPU it says so
and checks the CPU kernels instead. Exit status 1 when any check fails.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path

import torch

__all__ = ["main"]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cuda_version(code: int | None) -> str:
    return f"{code // 1000}.{code % 1000 // 10}" if code else "none"


def _simd_width() -> str:
    """The lanes of the CPU log-prob kernels, chosen as csrc/logps.c's pick_kernels chooses them."""
    if platform.machine() not in {"x86_64", "AMD64"}:
        return "4 lanes (NEON/baseline)"
    try:
        avx2 = " avx2 " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        avx2 = False
    if os.environ.get("NAPO_SIMD_WIDTH") == "4":
        return "4 lanes (NAPO_SIMD_WIDTH=4)"
    return "8 lanes (AVX2)" if avx2 else "4 lanes (SSE2; no AVX2 on this CPU)"


def _cuda_archs(module_file: str | None) -> str:
    """The GPU architectures in the extension's fatbinary (sm_XX of its cubins, compute_XX of its PTX)."""
    if not module_file:
        return "unknown"
    data = Path(module_file).read_bytes()
    archs = sorted({m.decode() for m in re.findall(rb"\b(?:sm|compute)_\d{2,3}[af]?\b", data)})
    return ", ".join(archs) if archs else "none found"


def _native_lines() -> tuple[list[str], bool]:
    """Lines about the native backends, and whether napo's CUDA kernels can run here."""
    from napo._native import NativeUnavailableError, native

    try:
        module = native()
    except NativeUnavailableError as error:
        return [f"native backends: NOT BUILT ({error}); every op uses the PyTorch reference"], False
    lines = [f"CPU kernels: built (napo._C), SIMD width {_simd_width()}"]
    if not module.built_with_cuda():
        lines.append("CUDA kernels: not built (no nvcc at build time); CUDA tensors use the PyTorch reference")
        return lines, False
    info = module.cuda_runtime_info() or {}
    lines.append(
        f"CUDA kernels: built for {_cuda_archs(getattr(module, '__file__', None))}; CUDA runtime "
        f"{_cuda_version(info.get('runtime_version'))} (static), driver supports CUDA "
        f"{_cuda_version(info.get('driver_version'))}"
    )
    usable = module.cuda_available()
    if not usable:
        lines.append(f"CUDA kernels cannot start here: {info.get('error') or 'no CUDA device visible to them'}")
    return lines, usable


def _table(results) -> list[str]:
    rows = [
        "| device | op | dtype | max error | tolerance | ms | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        dtype = str(r.dtype).removeprefix("torch.")
        verdict = "pass" if r.ok else "FAIL"
        rows.append(
            f"| {r.device} | {r.op} | {dtype} | {r.max_error:.2g} | {r.tolerance:.0e} | {r.seconds * 1e3:.1f} "
            f"| {verdict} |"
        )
    return rows


def main() -> int:
    import napo
    from napo.backends import native as kernels

    cuda = torch.version.cuda or "none (CPU build)"
    print(
        f"napo {napo.__version__}; torch {torch.__version__} (CUDA {cuda}); transformers "
        f"{_version('transformers')}; trl {_version('trl')}; Python {platform.python_version()}"
    )
    lines, cuda_usable = _native_lines()
    for line in lines:
        print(line)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and cuda_usable:
        devices = [torch.device("cuda", i) for i in range(gpus)]
        print(f"self-check of napo's CUDA kernels against the PyTorch reference on {gpus} GPU(s):")
    else:
        devices = [torch.device("cpu")]
        why = "no GPU visible to torch" if not gpus else "napo's CUDA kernels are not usable here (see above)"
        print(f"{why}: checking the CPU kernels against the PyTorch reference instead:")
    results = [
        kernels.run_self_check(op, device, dtype)
        for device in devices
        for op, dtypes in kernels.SELF_CHECK_OPS.items()
        for dtype in dtypes
    ]
    for row in _table(results):
        print(row)
    failed = [r for r in results if not r.ok]
    if failed:
        print(
            f"{len(failed)} of {len(results)} checks FAILED: napo would use the PyTorch reference for those ops "
            "on those devices and dtypes. Please report this output."
        )
        return 1
    print(f"all {len(results)} checks passed ({sum(r.seconds for r in results) * 1e3:.0f} ms)")
    return 0
