"""Processors napo loads: ``AutoProcessor``, except where a family's processor cannot load here.

Qwen2-VL's and Qwen2.5-VL's processors take a video processor, which needs torchvision, and ``AutoProcessor``
cannot load them without it (transformers 5.24: "Qwen2VLVideoProcessor requires the Torchvision library"); the
torchvision wheel PyPI serves for napo's pinned CPU torch does not load its operators. :func:`load_processor` then
builds the same processor without its video part (:func:`image_only_processor_class`) from the checkpoint's
files: images and text behave as in the full processor; videos are refused. Nothing new is needed at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["image_only_processor_class", "load_processor"]

# The processors whose video part needs torchvision, which have an image-only variant here.
VIDEO_PROCESSOR_CLASSES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")
_IMAGE_ONLY: dict[str, type] = {}


def image_only_processor_class(base_name: str) -> type:
    """The processor class ``base_name`` (``Qwen2VLProcessor`` or ``Qwen2_5_VLProcessor``) without its video part:
    ``Qwen2VLImageOnlyProcessor`` / ``Qwen2_5_VLImageOnlyProcessor``, which builds and loads without torchvision.

    It saves itself as ``base_name``, with a video processor config derived from its image processor (as Qwen2-VL
    checkpoints carry one), so that what it saves loads with ``AutoProcessor`` wherever torchvision exists."""
    if base_name not in VIDEO_PROCESSOR_CLASSES:
        raise ValueError(f"no image-only variant of {base_name!r}: Qwen2VLProcessor or Qwen2_5_VLProcessor")
    if base_name in _IMAGE_ONLY:
        return _IMAGE_ONLY[base_name]
    import transformers

    class ImageOnly(getattr(transformers, base_name)):
        # ProcessorMixin takes its sub-processors from __init__'s parameters: without `video_processor` the
        # processor neither builds nor loads a video processor (which needs torchvision); images work as in base.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def to_dict(self) -> dict[str, Any]:
            output = super().to_dict()
            output["processor_class"] = base_name
            output["video_processor"] = _qwen_video_processor_config(self.image_processor)
            return output

        def save_pretrained(self, save_directory, *args, **kwargs):
            saved = super().save_pretrained(save_directory, *args, **kwargs)
            tokenizer_config = Path(save_directory) / "tokenizer_config.json"
            config = json.loads(tokenizer_config.read_text())
            config["processor_class"] = base_name
            tokenizer_config.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            return saved

    ImageOnly.__name__ = ImageOnly.__qualname__ = base_name.replace("Processor", "ImageOnlyProcessor")
    _IMAGE_ONLY[base_name] = ImageOnly
    return ImageOnly


def _qwen_video_processor_config(image) -> dict[str, Any]:
    """The video processor's part of processor_config.json, from the image processor ``image`` (the settings
    Qwen2-VL's video processor shares with it)."""
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": image.patch_size,
        "temporal_patch_size": image.temporal_patch_size,
        "merge_size": image.merge_size,
        "size": dict(image.size),
        "image_mean": list(image.image_mean),
        "image_std": list(image.image_std),
    }


def load_processor(model_path: str | Path):
    """``AutoProcessor.from_pretrained(path)``, except for a Qwen2-VL / Qwen2.5-VL checkpoint where torchvision is
    missing: its processor needs a video processor, which needs torchvision, so the same processor without the
    video part (:func:`image_only_processor_class`) is built from the
    checkpoint's files instead. Images and text behave as in the full processor; videos are refused."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    path = Path(model_path)
    processor_class = None
    for name in ("processor_config.json", "tokenizer_config.json"):  # where AutoProcessor looks, in its order
        file = path / name
        if processor_class is None and file.is_file():
            processor_class = json.loads(file.read_text()).get("processor_class")
    if processor_class in VIDEO_PROCESSOR_CLASSES and not is_torchvision_available():
        return image_only_processor_class(processor_class).from_pretrained(str(path))
    # A hub id stays the string it was (as load_model passed it before): only a local directory has these files.
    return AutoProcessor.from_pretrained(str(model_path))
