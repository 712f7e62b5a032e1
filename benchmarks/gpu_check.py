"""The whole GPU verification of napo in one call, for a machine with a GPU and no network.

Builds napo in place (pip install --no-build-isolation --no-deps -e .), runs `napo doctor` (each
kernel's self-check against the reference on every GPU and dtype), the CUDA tests, then
the GPU benchmarks, and prints one Markdown table: the card, driver and CUDA versions, each check
(pass/fail/skip with counts) and each figure. Every step has a time limit taken from one overall
deadline (8 minutes by default), so the run ends in time even when a step hangs. Logs, the
benchmarks' CSVs and the table (gpu_check.md) go to --out.

Without a GPU it is a dry run: it builds, collects the CUDA tests (they would all skip), and prints
the table with "no GPU" and no figures. No figure in the table is ever estimated: each one is parsed
from a benchmark that ran.

Run: python benchmarks/gpu_check.py [--out build/gpu-check] [--budget-s 480]   (or: make gpu-check)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_cuda_on_cpu.py", "tests/test_logps_nan.py", "tests/test_self_check.py"]


class Check:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.rows: list[tuple[str, str, str]] = []  # (what, result, detail)

    def left(self, reserve: float = 10.0) -> float:
        return max(0.0, self.deadline - time.monotonic() - reserve)

    def row(self, what: str, result: str, detail: str = "") -> None:
        self.rows.append((what, result, detail))
        print(f"[gpu-check] {what}: {result} {detail}".rstrip(), file=sys.stderr, flush=True)

    def run(self, name: str, cmd: list[str], limit: float, env: dict | None = None) -> tuple[int | None, str]:
        """Runs cmd with its output in <out>/<name>.log; None for the return code when it timed out."""
        log = self.out / f"{name}.log"
        limit = min(limit, self.left())
        if limit < 5:
            log.write_text("skipped: out of time\n")
            return None, ""
        started = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                                  env={**os.environ, **(env or {})})  # fmt: skip
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            code = None
            text = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else ""
            text += f"\n[gpu-check] timed out after {limit:.0f} s\n"
        log.write_text(f"$ {' '.join(cmd)}\n[{time.monotonic() - started:.1f} s]\n{text}")
        return code, text


def _versions() -> dict[str, str]:
    """Card, driver and CUDA versions, from torch, napo and nvidia-smi (whichever answer)."""
    import torch

    info = {"torch": torch.__version__, "torch CUDA": torch.version.cuda or "none (CPU build)"}
    gpu = torch.cuda.is_available()
    info["card"] = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if gpu else "no GPU"
    )
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "none"
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = "none (no nvidia-smi)"
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20).stdout
        match = re.search(r"release (\d+\.\d+)", nvcc)
        info["nvcc"] = match.group(1) if match else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        info["nvcc"] = "not found"
    return info


def _napo_runtime(check: Check) -> bool:
    """napo's own view, in a fresh process (the build just replaced the extension)."""
    probe = (
        "import napo, json; from napo import _C; i = _C.cuda_runtime_info() or {}; "
        "print(json.dumps([_C.built_with_cuda(), _C.cuda_available(), i.get('runtime_version'), "
        "i.get('driver_version'), i.get('error')]))"
    )
    code, text = check.run("napo-runtime", [sys.executable, "-c", probe], 60)
    if code != 0:
        check.row("napo import", "FAIL", "see napo-runtime.log")
        return False
    import json

    built, available, runtime, driver, error = json.loads(text.strip().splitlines()[-1])
    version = lambda v: f"{v // 1000}.{v % 1000 // 10}" if v else "none"  # noqa: E731
    check.row("napo CUDA kernels built", "pass" if built else "FAIL", f"runtime {version(runtime)}" if built else "")
    detail = f"driver supports CUDA {version(driver)}" + (f"; {error}" if error else "")
    check.row("napo CUDA runtime starts", "pass" if available else "no GPU" if not driver else "FAIL", detail)
    return bool(built and available)


def _doctor(check: Check) -> None:
    """`napo doctor` first: versions, backends and each kernel's self-check against the reference on every
    GPU and dtype (the CPU kernels without a GPU), one row per check."""
    code, text = check.run("doctor", [sys.executable, "-c", "import sys; from napo.cli import main; "
                                      "sys.exit(main(['doctor']))"], 120)  # fmt: skip
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| device")]
    for line in rows:
        device, op, dtype, error, tolerance, ms, result = (c.strip() for c in line.strip("| ").split("|"))
        check.row(f"self-check {op} {dtype} on {device}", "pass" if result == "pass" else "FAIL",
                  f"max error {error} (tolerance {tolerance}), {ms} ms")  # fmt: skip
    if code != 0 or not rows:
        check.row("napo doctor", "FAIL", "timed out" if code is None else f"exit {code}; see doctor.log")


def _pytest(check: Check, gpu: bool) -> None:
    xml = check.out / "cuda-tests.xml"
    if not gpu:
        code, text = check.run("cuda-tests", [sys.executable, "-m", "pytest", "-q", "--collect-only", *CUDA_TESTS], 120)
        match = re.search(r"(\d+) tests? collected", text)
        collected = match.group(1) if match else "?"
        check.row("CUDA tests collected", "pass" if code == 0 else "FAIL", f"{collected} tests; not run: no GPU")
        return
    code, _ = check.run("cuda-tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       f"--junitxml={xml}", *CUDA_TESTS], 240)  # fmt: skip
    if code is None or not xml.exists():
        check.row("CUDA tests", "FAIL", "timed out" if code is None else "no report; see cuda-tests.log")
        return
    cases = ET.parse(xml).getroot().iter("testcase")
    counts = {"pass": 0, "FAIL": 0, "skip": 0}
    failed = []
    for case in cases:
        if case.find("failure") is not None or case.find("error") is not None:
            counts["FAIL"] += 1
            failed.append(case.get("name", "?"))
        elif case.find("skipped") is not None:
            counts["skip"] += 1
        else:
            counts["pass"] += 1
    detail = f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped"
    check.row(
        "CUDA tests", "FAIL" if counts["FAIL"] else "pass", detail + (f": {', '.join(failed[:8])}" if failed else "")
    )


def _bench_logps(check: Check) -> None:
    csv = check.out / "logps.csv"
    code, text = check.run("bench-logps", [sys.executable, "benchmarks/bench_logps.py", "--device", "cuda",
                                           "--quick", "--csv", str(csv)], 200)  # fmt: skip
    if code != 0:
        check.row("benchmark logps", "FAIL", "timed out" if code is None else "see bench-logps.log")
        return
    check.row("benchmark logps", "pass")
    for line in text.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(row) == 8 and row[1] not in {"variant", "---"} and row[1] != row[0]:
            check.row(f"logps {row[0]} {row[1]}", "figure", f"fwd+bwd {row[4]} ms = {row[5]}x torch; extra memory "
                      f"{row[6]} MiB = {row[7]}x")  # fmt: skip
        if line.startswith("Device copy bandwidth") or line.startswith("napo forward, V="):
            check.row("bandwidth", "figure", line)


def _bench_real_shapes(check: Check) -> None:
    """One training step at llava-1.5-7b widths (1 and 2 layers per tower) against TRL's DPOTrainer: 146 s on an
    H200, most of it building and loading the models in 6 fresh processes (1, 2 and 4 layers with 3 repeats ran
    past 200 s)."""
    code, text = check.run("bench-real-shapes", [sys.executable, "benchmarks/bench_real_shapes.py", "--device", "cuda",
                                                 "--layers", "1", "2", "--rows", "2", "--repeats", "2"],
                           200)  # fmt: skip
    if code != 0:
        check.row("benchmark real shapes", "FAIL", "timed out" if code is None else "see bench-real-shapes.log")
        return
    check.row("benchmark real shapes", "pass")
    for line in text.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(row) == 8 and row[0].isdigit():
            check.row(f"7B-width step, {row[0]} layer(s), {row[1]}", "figure", f"{row[4]} s = {row[5]}x TRL; extra "
                      f"memory {row[6]} GiB = {row[7]}x; {row[2]} sequences, {row[3]} tokens")  # fmt: skip
        elif len(row) == 5 and row[0] in {"trl-dpo", "napo-as-dpo", "napo-3way"}:
            check.row(f"7B-width step per layer, {row[0]}", "figure", f"{row[1]} s, {row[2]} GiB; 32 layers: "
                      f"{row[3]} s, {row[4]} GiB (extrapolated)")  # fmt: skip


def _bench_objective(check: Check) -> None:
    csv = check.out / "objective.csv"
    code, text = check.run("bench-objective", [sys.executable, "benchmarks/bench_objective.py", "--device", "cuda",
                                               "--batch-sizes", "64", "4096", "--repeats", "50", "--csv", str(csv)],
                           150)  # fmt: skip
    if code != 0:
        check.row("benchmark objective", "FAIL", "timed out" if code is None else "see bench-objective.log")
        return
    check.row("benchmark objective", "pass")
    for line in text.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(row) == 5 and row[0].isdigit():
            check.row(f"objective step B={row[0]} {row[1]}", "figure", f"{row[2]} µs = {row[3]}x napo-native")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time limit (8 minutes)")
    parser.add_argument("--skip-build", action="store_true", help="use the napo already installed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget_s)
    started = time.monotonic()

    versions = _versions()
    if args.skip_build:
        check.row("build", "skip", "--skip-build")
    else:
        code, _ = check.run("build", [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                                      "--no-index", "-e", "."], 240)  # fmt: skip
        check.row("build (pip install --no-build-isolation -e .)", "pass" if code == 0 else "FAIL", "see build.log")
    _doctor(check)
    gpu = _napo_runtime(check) and versions["card"] != "no GPU"
    _pytest(check, gpu)
    if gpu:
        _bench_logps(check)
        _bench_real_shapes(check)
        _bench_objective(check)
    else:
        check.row("GPU benchmarks", "skip", "no GPU: no figure measured")

    lines = [
        f"napo gpu-check: card {versions['card']}; driver {versions['driver']}; torch {versions['torch']} "
        f"(CUDA {versions['torch CUDA']}); nvcc {versions['nvcc']}; {time.monotonic() - started:.0f} s",
        "",
        "| check | result | detail |",
        "|---|---|---|",
        *(f"| {what} | {result} | {detail} |" for what, result, detail in check.rows),
    ]
    table = "\n".join(lines)
    (args.out / "gpu_check.md").write_text(table + "\n")
    print(table)
    sys.exit(1 if any(result == "FAIL" for _, result, _ in check.rows) else 0)


if __name__ == "__main__":
    main()
