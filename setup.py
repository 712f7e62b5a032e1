"""Build napo._C: the C11 core, plus the CUDA kernels when nvcc is available.

NAPO_CUDA=auto (default) compiles csrc/cuda/*.cu if nvcc is found, NAPO_CUDA=1
requires it, NAPO_CUDA=0 never uses it. NAPO_CUDA_ARCHS overrides the target
architectures (e.g. "80;90"). The same module serves CPU and CUDA tensors.

The CUDA runtime is linked statically, so the module imports on machines
without CUDA libraries (a shared libcudart.so.N would have to be found at
import, and torch's wheels ship only their own major). A static runtime needs a
driver at least as new as that runtime (CUDA 13 needs R580), so the toolkit
should be the CUDA major version torch was built with: without CUDA_HOME, a
/usr/local/cuda-<torch's major>.* toolkit is preferred to the nvcc on PATH, and
a build whose nvcc differs from torch's major prints a warning. At run time a
runtime that cannot start (cudaErrorInsufficientDriver) makes CUDA tensors fall
back to the pure-PyTorch kernels with one warning (napo/backends/native.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
C_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]
DEFAULT_CUDA_ARCHS = "80;90"


def _torch_cuda_major() -> int | None:
    """The CUDA major version of the installed torch (None: CPU torch, or torch not importable here)."""
    try:
        import torch
    except ImportError:
        return None
    version = torch.version.cuda
    return int(version.split(".")[0]) if version else None


def _nvcc_version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    major = _torch_cuda_major()
    if major is not None:  # the newest installed toolkit of torch's major version
        for home in sorted(Path("/usr/local").glob(f"cuda-{major}.*"), key=lambda p: p.name, reverse=True):
            if (home / "bin" / "nvcc").exists():
                return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def _warn_on_cuda_mismatch(nvcc: str) -> None:
    built, torch_major = _nvcc_version(nvcc), _torch_cuda_major()
    if built is None or torch_major is None or built[0] == torch_major:
        return
    print(
        f"\nWARNING: napo's CUDA kernels are being built with CUDA {built[0]}.{built[1]} ({nvcc}), but torch "
        f"uses CUDA {torch_major}. napo links the CUDA {built[0]} runtime statically; on a driver older than it "
        f"napo's CUDA ops fall back to the (slower) pure-PyTorch kernels. For kernels that run wherever torch "
        f"runs, set CUDA_HOME to a CUDA {torch_major}.x toolkit and reinstall.\n",
        flush=True,
    )


def _cudart_static_dir(nvcc: str) -> Path:
    """The folder holding libcudart_static.a (nvcc may be a wrapper script outside CUDA's tree)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(nvcc).resolve().parent.parent)]
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (Path(home) / lib / "libcudart_static.a").exists():
                return Path(home) / lib
    raise SystemExit(f"nvcc found at {nvcc} but not libcudart_static.a; set CUDA_HOME to the CUDA toolkit")


def _cuda_mode() -> str:
    mode = os.environ.get("NAPO_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"NAPO_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


class BuildWithOptionalCuda(build_ext):
    """Compiles the .cu sources with nvcc into objects linked into napo._C."""

    def build_extension(self, ext: Extension) -> None:
        nvcc = None if _cuda_mode() == "0" else _find_nvcc()
        if _cuda_mode() == "1" and nvcc is None:
            raise SystemExit("NAPO_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        if nvcc is not None:
            _warn_on_cuda_mismatch(nvcc)
            self._add_cuda(ext, nvcc)
        super().build_extension(ext)

    def _add_cuda(self, ext: Extension, nvcc: str) -> None:
        archs = [a for a in os.environ.get("NAPO_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).replace(",", ";").split(";") if a]
        if not archs:
            raise SystemExit("NAPO_CUDA_ARCHS is empty")
        gencode = []
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        # PTX of the newest arch lets the driver JIT for later GPUs.
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            obj = out_dir / (source.stem + ".o")
            cmd = [
                nvcc, "-std=c++17", "-O3", "--Werror", "all-warnings",
                "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wextra,-Werror",
                *gencode, "-c", str(source), "-o", str(obj),
            ]  # fmt: skip
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        ext.extra_objects = [*(ext.extra_objects or []), *objects]
        ext.define_macros = [*(ext.define_macros or []), ("NAPO_WITH_CUDA", "1")]
        ext.library_dirs = [*(ext.library_dirs or []), str(_cudart_static_dir(nvcc))]
        # nvcc objects may reference the C++ runtime; the module itself is C.
        ext.libraries = [*(ext.libraries or []), "cudart_static", "stdc++", "dl", "rt", "pthread"]


setup(
    ext_modules=[
        Extension(
            "napo._C",
            sources=["csrc/module.c", "csrc/objective.c", "csrc/logps.c"],
            include_dirs=["csrc"],
            extra_compile_args=C_FLAGS,
            libraries=["m", "pthread"],
        )
    ],
    cmdclass={"build_ext": BuildWithOptionalCuda},
)
