"""The models napo runs: loading a checkpoint, its processor and a row's images (:mod:`napo.models.loading`),
and the tiny random checkpoints napo's demo and tests build offline (:mod:`napo.models.tiny`)."""

from napo.models.loading import decode_image, image_path, load_model, load_weights, resolve_device, resolve_dtype
from napo.models.tiny import make_tiny_model

__all__ = [
    "decode_image",
    "image_path",
    "load_model",
    "load_weights",
    "make_tiny_model",
    "resolve_device",
    "resolve_dtype",
]
