"""Training with NaPO: the K-completion collators, napo's fused LM head on HuggingFace models,
cached reference log-probs (``napo logps``), and the TRL drop-in (``NaPOConfig``, ``NaPOTrainer``).

``NaPOConfig`` and ``NaPOTrainer`` import TRL on first use, not at ``import napo``.
"""

from __future__ import annotations

from typing import Any

from napo.train.collator import NaPOTextCollator, NaPOVisionCollator, reference_columns
from napo.train.lm_head import SequenceLogps, add_napo_lm_head, completion_logps

__all__ = [
    "NaPOConfig",
    "NaPOTextCollator",
    "NaPOTrainer",
    "NaPOVisionCollator",
    "SequenceLogps",
    "add_napo_lm_head",
    "completion_logps",
    "reference_columns",
]

_NEEDS_TRL = ("NaPOConfig", "NaPOTrainer")


def __getattr__(name: str) -> Any:
    if name in _NEEDS_TRL:
        from napo.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'napo.train' has no attribute {name!r}")
