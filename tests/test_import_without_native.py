"""`import napo` works without the compiled extension; the first native call explains what is missing."""

from __future__ import annotations

import os
import subprocess
import sys

BLOCK_NATIVE = "import sys; sys.modules['napo._C'] = None  # makes `from napo import _C` raise ImportError\n"


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_NATIVE + code], env={**os.environ, **env}, capture_output=True, text=True
    )


def test_import_succeeds_and_first_call_raises_one_clear_error():
    result = run(
        "import torch, napo\n"
        "assert not napo.native_available()\n"
        "z = torch.zeros(3)\n"
        "try:\n"
        "    napo.napo_loss(z, z, z, z)\n"
        "except napo.NativeUnavailableError as error:\n"
        "    print('ERROR:', error)\n"
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "ERROR: napo's native extension napo._C could not be loaded" in message
    assert "pip install ." in message and "NAPO_BACKEND=reference" in message


def test_reference_backend_runs_without_native():
    result = run("import torch, napo\nz = torch.zeros(2)\nprint(napo.napo_loss(z, z, z, z, q=0.0).tolist())\n",
                 NAPO_BACKEND="reference")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0.6931471824645996, 0.6931471824645996]"  # log 2 in float32


def test_import_napo_does_not_import_trl_and_the_trainer_says_what_is_missing():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, napo\nassert 'trl' not in sys.modules\nprint(napo.NaPOConfig.__name__)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "NaPOConfig"
    blocked = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['trl'] = None\nimport napo\nnapo.NaPOTrainer"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert blocked.returncode != 0
    assert "ImportError: napo.train.trainer needs TRL" in blocked.stderr and "napo[train]" in blocked.stderr
