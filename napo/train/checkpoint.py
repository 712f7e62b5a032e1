"""Restoring a Trainer checkpoint's weights so that every parameter really comes back.

transformers 5 saves a model in its *original* checkpoint layout (``save_pretrained`` reverts the
key renamings ``from_pretrained`` applies: a LLaVA's ``model.language_model.*`` is written as
``language_model.model.*``), while the Trainer resumes by ``load_state_dict(strict=False)`` on those
raw keys. For such models nothing matches, nothing is restored and nothing fails: training goes on
from the initial weights with the step counter, optimizer and scheduler of the checkpoint.

Here the checkpoint is read back by ``from_pretrained`` itself — the loader that knows every
renaming and conversion the saver reverted — and copied into the live model, and any parameter or
buffer the checkpoint does not restore is an error instead of a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CheckpointMismatchError", "has_full_weights", "restore_weights"]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointMismatchError(ValueError):
    """A checkpoint that would leave some of the model's parameters at their current values (bad input: a
    ValueError, so ``napo train`` reports it as a usage error)."""


def has_full_weights(directory: str | Path) -> bool:
    """Whether ``directory`` holds a whole model's weights (not adapters, not an FSDP/DeepSpeed shard set)."""
    return any((Path(directory) / name).is_file() for name in _WEIGHT_FILES)


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def restore_weights(model: Any, directory: str | Path) -> None:
    """Loads the weights ``save_pretrained`` wrote to ``directory`` into ``model``, every one of them.

    Raises:
        CheckpointMismatchError: the checkpoint lacks some of the model's parameters or buffers, or holds
            others (a checkpoint of another model); the model is then left unchanged.
    """
    import torch

    directory = Path(directory)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    # The checkpoint's own config rebuilds the module tree the saver walked; its loader applies the key renamings.
    loaded, info = type(model).from_pretrained(
        str(directory), dtype=dtype, output_loading_info=True, device_map=None, low_cpu_mem_usage=True
    )
    absent = list(info.get("missing_keys") or [])
    mismatched = [
        str(entry[0]) if isinstance(entry, tuple) else str(entry) for entry in info.get("mismatched_keys") or []
    ]
    if absent or mismatched:
        raise CheckpointMismatchError(
            f"{directory} does not restore every weight of the model "
            f"(missing: {_listing(absent) or 'none'}; other shapes: {_listing(mismatched) or 'none'}); "
            "refusing to resume from it: training would go on from weights that are not the checkpoint's; "
            "remove that checkpoint directory to resume from an earlier one, or choose a new output to start over"
        )
    state = loaded.state_dict()
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{directory} holds another model's weights (the model's not in it: {_listing(missing) or 'none'}; "
            f"in it but not the model's: {_listing(unexpected) or 'none'}); refusing to resume from it "
            "(remove that checkpoint directory, or choose a new output to start over)"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    del loaded, state
