"""Evaluation (``napo eval``): modality bias and hallucination on the paper's benchmarks, offline.

:func:`evaluate` answers each benchmark's items with each model (through ``napo generate``'s engine:
batched, sharded, resumable, answers kept) and computes the metrics as each benchmark's reference
implementation does; it returns pandas tables (:class:`EvalResult`) and writes JSON, CSV and a Markdown
report comparing the models. :func:`plot_comparison` draws the before/after bar chart. Every benchmark
but the built-in ``shapes`` reads files the user downloads (see the README, "Evaluation data"); nothing
is fetched. Needs pandas and matplotlib (``pip install 'napo[eval]'``).
"""

from napo.eval.answers import read_answers
from napo.eval.benchmark import Benchmark, DataFormatError, Decoding, MissingDataError
from napo.eval.plots import plot_comparison
from napo.eval.run import BENCHMARKS, EvalResult, comparison_table, evaluate, load_benchmarks

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "DataFormatError",
    "Decoding",
    "EvalResult",
    "MissingDataError",
    "comparison_table",
    "evaluate",
    "load_benchmarks",
    "plot_comparison",
    "read_answers",
]
