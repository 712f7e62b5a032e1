"""Shared helpers: per-dtype tolerances and a comparison that prints the first mismatches."""

from __future__ import annotations

import os

import pytest
import torch

# Tolerances against the pure-PyTorch reference. The C core computes in double
# and rounds once, the reference computes in the tensor's dtype, so the
# reference's own rounding dominates. bf16/fp16 log-probs are upcast to float32
# at the boundary, so the loss is compared at float32 tolerance; their
# gradients come back in the input's half dtype.
TOLERANCES = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-5, "atol": 1e-6},
}
GRAD_TOLERANCES = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-6},
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
BATCH_SIZES = [1, 3, 257]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    """torch.testing.assert_close, plus the first mismatching positions and values."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu().to(actual.dtype)
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as error:
        a, e = actual.double().reshape(-1), expected.double().reshape(-1)
        bad = ~(torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True))
        rows = [f"  [{i}] actual={a[i].item()!r} expected={e[i].item()!r}" for i in bad.nonzero().reshape(-1)[:5]]
        raise AssertionError(f"{what}: first mismatches\n" + "\n".join(rows) + f"\n{error}") from None


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh random stream per test and per run. The seed is printed (pytest shows it with a
    failure); NAPO_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("NAPO_TEST_SEED", torch.seed() % (2**31)))
    print(f"random inputs from seed {seed} (NAPO_TEST_SEED={seed} replays them)")
    return torch.Generator().manual_seed(seed)


def random_logps(batch: int, dtype: torch.dtype, generator: torch.Generator, scale: float = 30.0) -> torch.Tensor:
    """Sequence log-probs of a plausible size (negative, tens of nats)."""
    return (-scale * torch.rand(batch, generator=generator, dtype=torch.float64)).to(dtype)


@pytest.fixture(scope="session", autouse=True)
def napo_cache_dir(tmp_path_factory):
    """The tests' own napo cache (the pretrained tiny LLaVA is built once per session there), never the
    user's ~/.cache/napo; subprocesses inherit it through the environment."""
    previous = os.environ.get("NAPO_CACHE_DIR")
    path = tmp_path_factory.mktemp("napo-cache")
    os.environ["NAPO_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("NAPO_CACHE_DIR", None)
    else:
        os.environ["NAPO_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (then as before): the tiny-checkpoint family tests run many small matmuls,
    and on a busy 2-core machine the intra-op threads' spinning made them up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
