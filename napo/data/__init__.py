"""Building the biased data: the RLAIF-V -> RLAIF-V-Bias step (and the embedded sample set and tiny model)."""

from napo.data.generate import GenerationSettings, GenerationSummary, generate_biased
from napo.data.sample import make_sample_data
from napo.data.tiny import make_tiny_model
from napo.models.loading import load_model

__all__ = [
    "GenerationSettings",
    "GenerationSummary",
    "generate_biased",
    "load_model",
    "make_sample_data",
    "make_tiny_model",
]
