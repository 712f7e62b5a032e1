"""Kernel registrations for napo's custom ops (see ``napo._ops``)."""

from __future__ import annotations

from types import ModuleType

import torch

from napo._ops import OP_NAMES


def register_backend(module: ModuleType, device_types: str | tuple[str, ...] | None) -> None:
    """Registers ``module.<op>`` as the kernel of every napo op for ``device_types`` (None: all devices)."""
    for name in OP_NAMES:
        torch.library.register_kernel(f"napo::{name}", device_types, getattr(module, name))
