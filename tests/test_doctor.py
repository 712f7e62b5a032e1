"""`napo doctor` on this CPU-only machine: versions, backends, and the self-check table of the CPU kernels."""

from __future__ import annotations

import pytest
import torch

from napo.backends import native
from napo.cli import main


def test_doctor_checks_the_cpu_kernels_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this test describes a machine without a GPU")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "napo 0." in out and f"torch {torch.__version__}" in out and "transformers" in out and "trl" in out
    assert "SIMD width" in out and "CUDA kernels" in out
    assert "no GPU visible to torch: checking the CPU kernels" in out
    rows = [line for line in out.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == sum(len(d) for d in native.SELF_CHECK_OPS.values()) == 18
    assert all(row.endswith("| pass |") for row in rows)
    assert "| cpu | token_logps | bfloat16 |" in out and "all 18 checks passed" in out


def test_doctor_exits_1_and_names_the_kernel_that_disagrees(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this test describes a machine without a GPU")
    broken = lambda op, out: out * 1.01 if op == "adaptive_q" else out  # noqa: E731
    monkeypatch.setattr(native, "_test_perturbation", broken)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.endswith("| FAIL |")]
    assert [line.split(" | ")[1:3] for line in failed] == [["adaptive_q", "float32"], ["adaptive_q", "float64"]]
    assert "2 of 18 checks FAILED" in out
