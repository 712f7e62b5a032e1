"""The tiny LLaVA's old home: it is built in :mod:`napo.models.tiny` now, and importable from here as before."""

from napo.models.tiny import (
    CHAT_TEMPLATE,
    IMAGE_SIZE,
    PATCH_SIZE,
    build_model,
    build_processor,
    build_tokenizer,
    make_tiny_model,
)

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "make_tiny_model",
]
