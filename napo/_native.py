"""Loading of the compiled core ``napo._C``.

``import napo`` must work on a machine where the extension is missing or
broken (a source checkout that was never built, a wheel for another ABI): the
import error is kept and raised, with what to do about it, by the first call
that needs the native code.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

__all__ = ["NativeUnavailableError", "env_flag", "native", "native_available", "use_reference_backend"]


class NativeUnavailableError(RuntimeError):
    """napo's compiled extension could not be loaded."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (any case), unset or empty
    for ``default``; anything else is a ValueError naming the variable and the value."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be one of 1/0, true/false, yes/no, on/off; got {os.environ[name]!r}")


def use_reference_backend() -> bool:
    """``NAPO_BACKEND=reference`` routes every op to the pure-PyTorch implementation."""
    value = os.environ.get("NAPO_BACKEND", "native").strip().lower()
    if value not in {"native", "reference"}:
        raise ValueError(f"NAPO_BACKEND must be 'native' or 'reference', got {value!r}")
    return value == "reference"


@functools.cache
def _load() -> tuple[ModuleType | None, BaseException | None]:
    try:
        import napo._C as _C  # as `import`, not `from napo import`: no edge to the package's __init__
    except Exception as error:  # ImportError, or an OSError from a broken shared object
        return None, error
    return _C, None


def native() -> ModuleType:
    """The ``napo._C`` module, or one clear error saying why it is unavailable."""
    module, error = _load()
    if module is None:
        raise NativeUnavailableError(
            f"napo's native extension napo._C could not be loaded ({type(error).__name__}: {error}). "
            "Build it with `pip install .` (a C compiler is required; nvcc is optional), "
            "or set NAPO_BACKEND=reference to run the pure-PyTorch implementation."
        ) from error
    return module


def native_available() -> bool:
    return _load()[0] is not None
