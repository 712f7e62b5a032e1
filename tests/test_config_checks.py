"""NaPOConfig checks its values at construction, with the objective's messages (issue 23, rough edges), and
the README's NaPOConfig(output_dir=...) works on a machine without a bf16 GPU."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from napo import NaPOObjective
from napo.train.config import NaPOConfig, bf16_supported


def test_the_readme_snippet_works_here_with_bf16_where_the_device_supports_it(tmp_path):
    args = NaPOConfig(output_dir=str(tmp_path / "run"))  # TRL's DPOConfig raises its bf16 error on a CPU machine
    assert args.bf16 is bf16_supported() and args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert NaPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True).bf16 is False
    assert NaPOConfig(output_dir=str(tmp_path / "run"), bf16=False).bf16 is False


BAD = [
    ({"beta": 0.0}, "beta must be a finite number > 0, got 0.0"),
    ({"beta": -1.0}, "beta must be a finite number > 0"),
    ({"beta": math.nan}, "beta must be a finite number > 0, got nan"),
    ({"q_min": -0.1}, r"q_min must be in \[0, 1\], got -0.1"),
    ({"w_min": 1.5}, r"w_min must be in \[0, 1\], got 1.5"),
    ({"w_min": math.nan}, r"w_min must be in \[0, 1\], got nan"),
    ({"max_length": -5}, "max_length must be an integer >= 1, got -5"),
    ({"napo_weights": "1,1,1,1"}, r"weights has 4 values but 1 to 3 terms are active \(original, language, vision\)"),
    ({"napo_weights": "1,1", "language_column": "none"}, None),
    (
        {"napo_weights": "1,1,1", "language_column": "none"},
        r"weights has 3 values but 1 to 2 terms are active \(original, vision\)",
    ),
    ({"napo_weights": "1", "language_column": "question_only"}, r"weights has 1 values but 2 to 3 terms"),
]


@pytest.mark.parametrize(("fields", "message"), BAD, ids=[str(f) for f, _ in BAD])
def test_bad_values_are_refused_at_construction(tmp_path, fields, message):
    if message is None:
        NaPOConfig(output_dir=str(tmp_path), **fields)
        return
    with pytest.raises(ValueError, match=message):
        NaPOConfig(output_dir=str(tmp_path), **fields)


@pytest.mark.parametrize(
    ("config", "objective"),
    [({"beta": 0.0}, {"beta": 0.0}), ({"w_min": 1.5}, {"w_min": 1.5}), ({"q_min": -0.1}, {"q_min": -0.1})],
)
def test_the_messages_are_the_objectives(tmp_path, config, objective):
    with pytest.raises(ValueError) as from_objective:
        NaPOObjective(**objective)
    with pytest.raises(ValueError) as from_config:
        NaPOConfig(output_dir=str(tmp_path), **config)
    assert str(from_config.value) == str(from_objective.value)
