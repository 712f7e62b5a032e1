"""Two processes (gloo, CPU): q and weights from two shards equal one process on the whole batch."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import napo

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

TOTAL = 13
SPLIT = 5  # rank 0 gets 5 rows, rank 1 gets 8: unequal shards must still give the global mean


def _batch():
    generator = torch.Generator().manual_seed(1234)
    batch = {}
    for answer in ("chosen", "rejected", "language", "vision"):
        for model in ("policy", "reference"):
            logps = -30 * torch.rand(TOTAL, generator=generator, dtype=torch.float64)
            batch[f"{model}_{answer}_logps"] = logps
            batch[f"{model}_{answer}_avg_logps"] = logps / 17
    return batch


def _statistics(batch, rows):
    part = {k: v[rows] for k, v in batch.items()}
    margins = napo.reward_margin(
        part["policy_chosen_logps"], part["policy_rejected_logps"],
        part["reference_chosen_logps"], part["reference_rejected_logps"],
    )  # fmt: skip
    out = napo.NaPOObjective(weights="dynamic")(**part)
    return {
        "adaptive_q": napo.adaptive_q(margins, gamma=0.05),
        "q_language": out.q["language"],
        "q_vision": out.q["vision"],
        "weights": torch.stack([out.weights[t] for t in napo.TERMS]),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        batch = _batch()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, TOTAL)
        stats = _statistics(batch, rows)
        # dynamic_weights with a process group averages per-rank means: equal shards (6 + 6 rows).
        equal_rows = slice(0, 6) if rank == 0 else slice(6, 12)
        local_means = torch.stack([batch[f"policy_{a}_logps"][equal_rows].mean() for a in ("chosen", "language")])
        stats["weights_from_means"] = napo.dynamic_weights(local_means.abs(), w_min=0.01)
        torch.save(stats, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_q_and_weights_equal_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    whole = _statistics(_batch(), slice(0, TOTAL))
    batch = _batch()
    whole_means = torch.stack([batch[f"policy_{a}_logps"][:12].mean() for a in ("chosen", "language")])
    whole["weights_from_means"] = napo.dynamic_weights(whole_means.abs(), w_min=0.01)
    for rank in (0, 1):
        shard = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in whole.items():
            torch.testing.assert_close(shard[key], value, rtol=1e-12, atol=1e-14, msg=f"rank {rank}: {key}")
    # And the shards really differ locally, so the test would notice a local-only mean.
    local = _statistics(batch, slice(0, SPLIT))
    assert not torch.allclose(local["adaptive_q"], whole["adaptive_q"])
    assert not torch.allclose(local["weights"], whole["weights"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
