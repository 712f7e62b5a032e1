"""napo: Noise-Aware Preference Optimization (NaPO) for debiasing multimodal LLMs.

The objective (loss, adaptive q, dynamic weights) runs in C/CUDA behind
``torch.library`` custom ops; ``import napo`` works without the compiled
extension, and the first call that needs it explains what is missing.
"""

from __future__ import annotations

from napo import _ops  # noqa: F401  (defines the torch.ops.napo.* schemas)
from napo._native import NativeUnavailableError, native_available, use_reference_backend
from napo._ops import COMPOSITE_OP_NAMES as _COMPOSITE_OP_NAMES
from napo._version import __version__
from napo.backends import fused_linear as _fused_linear
from napo.backends import reference as _reference
from napo.backends.registry import register_backend as _register_backend
from napo.functional import adaptive_q, dynamic_weights, global_mean, napo_loss, q_from_mean, reward_margin
from napo.logps import fused_linear_sequence_logps, sequence_logps
from napo.losses import PAPER_TERMS, TERMS, NaPOLoss, NaPOObjective, NaPOOutput, TermConfig

_register_backend(_reference, None)
_register_backend(_fused_linear, None, _COMPOSITE_OP_NAMES)  # torch matmuls around the per-device token kernel
if not use_reference_backend():
    from napo.backends import native as _native_backend

    _register_backend(_native_backend, ("cpu", "cuda"))

__all__ = [
    "PAPER_TERMS",
    "TERMS",
    "NaPOConfig",
    "NaPOLoss",
    "NaPOObjective",
    "NaPOOutput",
    "NaPOTrainer",
    "NativeUnavailableError",
    "TermConfig",
    "__version__",
    "adaptive_q",
    "dynamic_weights",
    "fused_linear_sequence_logps",
    "global_mean",
    "napo_loss",
    "native_available",
    "q_from_mean",
    "reward_margin",
    "sequence_logps",
]


def __getattr__(name: str):
    # The TRL drop-in is imported on first use: `import napo` must not import TRL (or need it).
    if name in ("NaPOConfig", "NaPOTrainer"):
        from napo.train import trainer

        return getattr(trainer, name)
    if name == "analysis":  # pandas + matplotlib, imported when first used
        import importlib

        return importlib.import_module("napo.analysis")
    raise AttributeError(f"module 'napo' has no attribute {name!r}")
