"""Loading what napo runs: a HuggingFace vision-language checkpoint and its processor, on a device and in a
dtype, refusing checkpoints that would silently load random weights; and the images of a dataset row.

Data building (``napo generate``), reference log-probs, training, evaluation and the pretrained tiny world all
load models and images through this module.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

# A row whose image cannot be read is skipped and logged by the row stages, which catch this error.
from napo.errors import RowError

__all__ = ["decode_image", "image_path", "load_model", "load_weights", "resolve_device", "resolve_dtype"]


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return "cpu"
    if device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA, but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return choices[dtype]


def load_weights(model_class: Any, model: str | Path, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(model, **kwargs)``, refusing a checkpoint that does not hold every
    weight: transformers initialises the missing ones at random and only logs it, so a checkpoint saved
    with other parameter names would otherwise generate, score and train on noise with exit code 0."""
    loaded, info = model_class.from_pretrained(str(model), output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(
        str(entry[0] if isinstance(entry, tuple) else entry) for entry in info.get("mismatched_keys") or []
    )
    if missing or mismatched:
        shown = ", ".join((missing + mismatched)[:5])
        raise ValueError(
            f"{model}: the checkpoint lacks {len(missing)} of the model's weights and has {len(mismatched)} of another "
            f"shape ({shown}{', ...' if len(missing) + len(mismatched) > 5 else ''}); they would be random. Is it a "
            "checkpoint of this architecture, saved with save_pretrained?"
        )
    return loaded


def load_model(model: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model, processor) for a LLaVA-family checkpoint directory or hub id, ready to generate."""
    from napo.models.processors import load_processor

    try:  # any image-text-to-text checkpoint (LLaVA, LLaVA-NeXT, ...); older transformers: LLaVA itself
        from transformers import AutoModelForImageTextToText as ModelClass
    except ImportError:
        from transformers import LlavaForConditionalGeneration as ModelClass

    device = resolve_device(device)
    processor = load_processor(model)
    processor.tokenizer.padding_side = "left"  # decoder-only generation: pad before the prompt
    try:
        loaded = load_weights(ModelClass, model, dtype=resolve_dtype(dtype, device))
    except pickle.UnpicklingError as error:
        # torch's weights-only loader refused a pickled checkpoint (it would run code): the user's to fix.
        reason = [line for line in str(error).splitlines() if line.strip()][-1]
        raise ValueError(
            f"{model}: its PyTorch checkpoint holds more than weights and was not loaded ({reason}); "
            "convert it to safetensors from a trusted copy"
        ) from None
    loaded.to(device).eval()
    return loaded, processor


# ---------------------------------------------------------------- images


def image_path(path: str, data_root: Path | None, allow_outside: bool = False) -> Path:
    """Where an image path of the data points: relative to ``data_root`` (the data's directory), and inside
    it unless ``allow_outside``. A path such as ``../x.png`` or ``/etc/passwd`` (or a link pointing out)
    would otherwise let a dataset make napo open any file the user can read."""
    if data_root is None:
        raise RowError(f"image path {path!r} but no data directory to resolve it against (give image bytes)")
    root = data_root.resolve()
    resolved = (root / path).resolve()
    if not allow_outside and not resolved.is_relative_to(root):
        raise RowError(
            f"image path {path!r} points outside the data directory {root}; move the image under it, or pass "
            "--allow-outside-images (allow_outside_images=True) if the data is trusted"
        )
    return resolved


def decode_image(value: Any, data_root: Path | None = None, allow_outside: bool = False):
    """A PIL RGB image from {"bytes", "path"}, raw bytes, or a path (see :func:`image_path`), decoded by
    :func:`napo.images.open_image` (EXIF orientation applied, high bit depths scaled); RowError if it cannot be
    decoded."""
    from napo.images import open_image

    raw, path = None, None
    if isinstance(value, dict):
        raw, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        raw = value
    elif isinstance(value, str):
        path = value
    try:
        if raw:
            return open_image(bytes(raw))
        if path and (resolved := image_path(path, data_root, allow_outside)).is_file():
            return open_image(resolved)
        raise RowError("no image bytes (and no readable image path)")
    except RowError:
        raise
    except Exception as error:
        raise RowError(f"undecodable image: {type(error).__name__}: {error}") from error
