"""The benchmarks ``napo eval`` knows, by name: the one table that running them (:mod:`napo.eval.run`) and
plotting their results (:mod:`napo.eval.plots`) both read."""

from __future__ import annotations

from napo.eval.benchmark import Benchmark


def benchmark_classes() -> dict[str, type[Benchmark]]:
    """{name: benchmark class}; the modules are imported on the first call (some pull in optional NLP)."""
    from napo.eval.amber import AmberBench
    from napo.eval.mmhal import MMHalBench
    from napo.eval.objhal import ObjectHalBench
    from napo.eval.pope import PopeBench
    from napo.eval.shapes import ShapesBench
    from napo.eval.vlind import VLindBench

    return {
        "shapes": ShapesBench,
        "vlind": VLindBench,
        "pope": PopeBench,
        "objhal": ObjectHalBench,
        "amber": AmberBench,
        "mmhal": MMHalBench,
    }
