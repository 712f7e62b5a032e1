"""When the sequence log-probs check their labels on CUDA, at what cost.

A label outside [0, V) that is not ignore_index is a ValueError naming it. On the CPU the C kernels
check as they read (free). On CUDA the kernels never read out of bounds either (such a label gives a
NaN log-prob and NaN gradients), but raising the ValueError needs the answer on the host: one
device-to-host sync per call of ``sequence_logps`` (``fused_linear_sequence_logps`` folds it into
the sync it already needs to count the scored tokens). The check is skipped, leaving the NaN:

- with ``NAPO_CHECK_LABELS=0`` (read at every call), for CPU-bound small models;
- automatically while the current CUDA stream is being captured into a CUDA graph, where a sync is
  not allowed (check the labels of the data once, outside the graph, instead);
- inside ``already_checked()``, which the fused head uses so that its chunks do not check again
  what it checked once for the whole batch.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from napo._native import env_flag
from napo.backends import reference

_checked = contextvars.ContextVar("napo_labels_already_checked", default=False)


def on_cuda(labels: torch.Tensor) -> bool:
    """Whether these labels are checked by this module (CUDA) rather than by the C kernels (CPU)."""
    return labels.device.type == "cuda"


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def enabled(labels: torch.Tensor) -> bool:
    """Whether a CUDA call should check ``labels`` on the host now."""
    if not on_cuda(labels) or _checked.get() or not env_flag("NAPO_CHECK_LABELS", True):
        return False
    return not _capturing()


@contextlib.contextmanager
def already_checked() -> Iterator[None]:
    """Inside it, the CUDA calls skip the check (the caller has checked these labels)."""
    token = _checked.set(True)
    try:
        yield
    finally:
        _checked.reset(token)


def host_check(labels: torch.Tensor, vocab: int, ignore_index: int, position_offset: int) -> None:
    """The ValueError naming the first bad label; one sync (reference.check_labels)."""
    reference.check_labels(labels, vocab, ignore_index, position_offset)


def check_on_device(labels: torch.Tensor, vocab: int, ignore_index: int, position_offset: int = 0) -> None:
    """The per-call check of the unfused CUDA path: one sync, unless disabled (see the module doc)."""
    if enabled(labels):
        host_check(labels, vocab, ignore_index, position_offset)


def pending_flag(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Whether any label is bad, as a host tensor filled asynchronously (pinned memory): valid
    after the caller's next sync (the fused head's nonzero), so the check costs no sync of its own."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    return bad.any().to("cpu", non_blocking=True)
