"""Registering a backend's kernels for napo's custom ops (see ``napo._ops``)."""

from __future__ import annotations

from types import ModuleType

import torch

from napo._ops import LOGPS_OP_NAMES, OP_NAMES


def register_backend(
    module: ModuleType, device_types: str | tuple[str, ...] | None, names: tuple[str, ...] = OP_NAMES + LOGPS_OP_NAMES
) -> None:
    """Registers ``module.<op>`` as the kernel of napo ops for ``device_types`` (None: all devices)."""
    for name in names:
        torch.library.register_kernel(f"napo::{name}", device_types, getattr(module, name))
