"""Building the biased data: the RLAIF-V -> RLAIF-V-Bias step (and the embedded sample set and tiny model)."""

from napo.data.generate import GenerationSettings, GenerationSummary, generate_biased, load_model
from napo.data.sample import make_sample_data
from napo.data.tiny import make_tiny_model

__all__ = [
    "GenerationSettings",
    "GenerationSummary",
    "generate_biased",
    "load_model",
    "make_sample_data",
    "make_tiny_model",
]
