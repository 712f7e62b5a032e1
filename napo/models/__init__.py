"""The models napo runs: loading a checkpoint, its processor and a row's images (:mod:`napo.models.loading`,
:mod:`napo.models.processors`). Nothing here imports napo's data, training or evaluation rooms: they import it."""

from napo.models.loading import decode_image, image_path, load_model, load_weights, resolve_device, resolve_dtype
from napo.models.processors import load_processor

__all__ = [
    "decode_image",
    "image_path",
    "load_model",
    "load_processor",
    "load_weights",
    "resolve_device",
    "resolve_dtype",
]
