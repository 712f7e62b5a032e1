"""A NaN logit poisons its row's log-prob on every kernel (issue 11, item 2).

The CPU kernel folds per-chunk (max, sum) partials with the same merge as the CUDA kernels
(napo_lse_merge in csrc/napo_math.h, exercised pair by pair in csrc/tests/test_logps.c). Here the
user-visible result: one NaN logit anywhere in a counted row, in any dtype, gives a NaN log-prob,
including a first chunk (1024 logits) that holds nothing but NaN, which the CPU kernel used to skip
as if it were all -inf.
"""

from __future__ import annotations

import pytest
import torch

from napo.backends import reference

IGNORE = -100


def _token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.napo.token_logps(logits, labels, IGNORE, 0, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("vocab", [7, 123])
def test_one_nan_logit_gives_nan_in_every_position(dtype, vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(1, vocab, vocab, generator=generator).to(dtype)
    logits[0, torch.arange(vocab), torch.arange(vocab)] = float("nan")  # row t: NaN at vocab entry t
    labels = torch.full((1, vocab), (vocab - 1) // 2)
    token, lse = _token_logps(logits, labels)
    assert torch.isnan(token).all(), token
    assert torch.isnan(lse).all(), lse
    expected, _ = reference.token_logps(logits, labels, IGNORE, 0, False)
    assert torch.isnan(expected).all()


@pytest.mark.parametrize("fill", ["nan", "nan-and-minus-inf"])
def test_chunk_of_nan_before_finite_logits_gives_nan(fill):
    vocab = 3000  # the CPU kernel's chunks hold 1024 logits
    logits = torch.rand(1, 2, vocab)
    logits[:, :, :1024] = float("nan")
    if fill == "nan-and-minus-inf":
        logits[:, :, :1024:2] = float("-inf")
    labels = torch.tensor([[2000, 5]])  # a finite label logit, and a NaN one
    token, lse = _token_logps(logits, labels)
    assert torch.isnan(token).all(), token
    assert torch.isnan(lse).all(), lse


def test_masked_minus_inf_logits_stay_finite():
    logits = torch.rand(1, 1, 3000)
    logits[..., :1024] = float("-inf")  # a masked vocabulary is not a NaN
    token, lse = _token_logps(logits, torch.tensor([[2000]]))
    expected, expected_lse = reference.token_logps(logits, torch.tensor([[2000]]), IGNORE, 0, False)
    torch.testing.assert_close(token, expected)
    torch.testing.assert_close(lse, expected_lse.to(lse.dtype))
