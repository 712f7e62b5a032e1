"""``napo eval``: answers for each model and benchmark, metrics, and the reports comparing the models.

Layout of ``output``::

    answers/<model>/<benchmark>/   the answers (Parquet parts + __napo__/), resumable, rescorable
    <benchmark>/metrics.json       every model's metrics, item counts and decoding settings
    <benchmark>/metrics.csv        the same, one row per model and metric
    <benchmark>/items-<model>.csv  per-item results
    report.md                      the models side by side (the paper's Table 1 layout), then each benchmark
    comparison.png                 a bar chart of the headline metrics per model (before / after training)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napo.eval.answers import Answers, generate_benchmark_answers, items_table, read_answers
from napo.eval.benchmark import Benchmark, Decoding, MissingDataError
from napo.eval.registry import benchmark_classes

__all__ = ["BENCHMARKS", "EvalResult", "comparison_table", "evaluate", "load_benchmarks"]


BENCHMARKS = ("vlind", "objhal", "amber", "mmhal", "pope", "shapes")
"""Every benchmark name ``napo eval --benchmark`` knows, in the report's column order."""


def load_benchmarks(
    names: list[str] | str, data_dir: str | Path | None = None, options: dict[str, dict] | None = None
) -> list[Benchmark]:
    """The benchmarks ``names`` (a list or comma-separated string), each reading ``<data_dir>/<name>/``.

    Every benchmark is checked before any is returned: the missing files of all of them are reported
    together in one :class:`MissingDataError`. ``options``: keyword arguments per benchmark name.
    """
    registry = benchmark_classes()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    if not names or not all(names):
        raise ValueError(f"benchmark names must be non-empty, got {names!r}; choose from {', '.join(BENCHMARKS)}")
    unknown = [n for n in names if n not in registry]
    if unknown:
        known = ", ".join(b for b in BENCHMARKS if b in registry)
        raise ValueError(f"unknown benchmark(s) {', '.join(map(repr, unknown))}; choose from {known}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"benchmark(s) {', '.join(repeated)} given more than once")
    options = options or {}
    loaded, missing = [], []
    for name in names:
        kwargs = dict(options.get(name, {}))
        if name != "shapes":
            if data_dir is None:
                raise ValueError(f"benchmark {name!r} reads the user's files: give data_dir (--data-dir)")
            kwargs["data_dir"] = Path(data_dir) / name
        try:
            loaded.append(registry[name](**kwargs))
        except MissingDataError as error:
            missing.append(error)
    if missing:
        raise MissingDataError(
            ", ".join(e.benchmark for e in missing),
            [path for e in missing for path in e.missing],
            hint="download them as the README's section 'Evaluation data' says, or leave the benchmark out",
        )
    return loaded


def model_tags(models: list[str | Path]) -> list[str]:
    """A short, file-name-safe, unique label per model: the checkpoint directory's name."""
    tags: list[str] = []
    for model in models:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model).rstrip("/")).name) or "model"
        tag, n = base, 2
        while tag in tags:
            tag, n = f"{base}-{n}", n + 1
        tags.append(tag)
    return tags


@dataclass
class EvalResult:
    """What :func:`evaluate` computed. ``metrics``: long table (model, benchmark, metric, value);
    ``table``: the models side by side (headline metrics, Table 1 layout); ``items``: per-item results
    per (model, benchmark); ``report``: the Markdown report's path."""

    metrics: Any
    table: Any
    items: dict = field(default_factory=dict)
    report: Path | None = None
    summaries: list = field(default_factory=list)

    def figure(self):
        from napo.eval.plots import plot_comparison

        return plot_comparison(self.metrics)


def comparison_table(metrics, benchmarks: list[Benchmark]) -> Any:
    """The models side by side: one row per model, the benchmarks' headline metrics as columns (in the
    paper's Table 1 order), each label followed by an arrow saying which way is better."""
    import pandas as pd

    columns: dict[str, dict] = {}
    for benchmark in sorted(benchmarks, key=lambda b: BENCHMARKS.index(b.name)):
        chosen = metrics[metrics["benchmark"] == benchmark.name]
        for key, label, higher in benchmark.headline:
            values = chosen[chosen["metric"] == key].set_index("model")["value"]
            if len(values):  # a metric no model has (a benchmark run on a subset of its kinds) gets no column
                columns[f"{label} {'↑' if higher else '↓'}"] = values.to_dict()
    models = list(dict.fromkeys(metrics["model"]))
    frame = pd.DataFrame({"model": models})
    for label, values in columns.items():
        frame[label] = [values.get(model, float("nan")) for model in models]
    return frame


def _answers_root(answers: Path) -> Path:
    """The folder of <model>/<benchmark>/ answers: an earlier output's answers/, or the folder given."""
    return answers / "answers" if (answers / "answers").is_dir() else answers


def _answers_dirs(answers: Path, benchmarks: list[Benchmark]) -> dict[str, dict[str, Path]]:
    """{model tag: {benchmark: directory}} found under ``answers`` (an earlier output or its answers/)."""
    root = _answers_root(answers)
    if not root.is_dir():
        raise FileNotFoundError(f"no such answers directory: {answers}")
    found: dict[str, dict[str, Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for benchmark in benchmarks:
            if (model_dir / benchmark.name / "__napo__").is_dir():
                found.setdefault(model_dir.name, {})[benchmark.name] = model_dir / benchmark.name
    if not found:
        names = ", ".join(b.name for b in benchmarks)
        raise FileNotFoundError(f"{answers} holds no answers for {names} (expected <model>/<benchmark>/ folders)")
    return found


def evaluate(
    models: list[str | Path] | str | Path | None,
    benchmarks: list[str] | str,
    output: str | Path,
    *,
    data_dir: str | Path | None = None,
    answers: str | Path | None = None,
    options: dict[str, dict] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    temperature: float | None = None,
    prompt_format: str = "template",
    limit: int | None = None,
    num_shards: int | None = None,
    shard_index: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    rows_per_part: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    loaded: dict | None = None,
    allow_outside_images: bool = False,
) -> EvalResult:
    """Evaluates every model on every benchmark and writes the reports under ``output``.

    Args:
        models: checkpoint directories (or hub ids where reachable); None with ``answers``.
        benchmarks: names (or a comma-separated string) of :data:`BENCHMARKS`.
        data_dir: the folder holding ``<benchmark>/`` with each file-based benchmark's files.
        answers: score the answers of an earlier run (its output directory or its ``answers/``) without
            generating; ``models`` is then ignored.
        options: per-benchmark keyword arguments, e.g. ``{"shapes": {"scenarios": 4}}``.
        max_new_tokens, num_beams, temperature: override every benchmark's decoding (recorded in the reports).
        prompt_format: ``template`` (the checkpoint's chat template) or ``llava_v1`` (the LLaVA-1.5 format the
            reference scripts use; refused, before any model runs, when a model is of another family): see
            :mod:`napo.data.prompts`.
        limit, num_shards, shard_index, rows_per_part, overwrite: as ``napo generate`` (per benchmark).
        allow_outside_images: read images that resolve outside the benchmark's folder (an images/ folder that is
            a link to a copy of COCO elsewhere, say); trusted data only.
        loaded: {model: (model, processor)} already loaded.
    Returns:
        An :class:`EvalResult`.
    """
    from napo.data.inputs import check_int, check_output_dir
    from napo.data.store import shard_from_env

    check_output_dir(output)
    with output_lock(Path(output), shard_from_env(num_shards, shard_index)[1]):
        check_int("batch_size", batch_size, 1)
        for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
            if value is not None:
                check_int(name, value, 1)
        output = Path(output)
        options = {name: dict(values) for name, values in (options or {}).items()}
        # The judge's replies live with the answers they judge: a rerun, a rescoring (--answers) or a second
        # model with the same answer asks the judge nothing twice.
        answers_root = output / "answers" if answers is None else _answers_root(Path(answers))
        options.setdefault("mmhal", {}).setdefault("cache", answers_root / "judgements-mmhal.jsonl")
        chosen = load_benchmarks(benchmarks, data_dir, options)  # every data problem before any model loads
        tables = {}
        for benchmark in chosen:  # the items too (empty, repeated ids), still before any model loads
            try:
                tables[benchmark.name] = items_table(benchmark.items())
            except ValueError as error:
                where = benchmark.data_dir if benchmark.data_dir is not None else "built in"
                raise ValueError(f"{benchmark.name} ({where}): {error}") from None
        summaries = []
        if answers is not None:
            directories = _answers_dirs(Path(answers), chosen)
        else:
            if models is None or (isinstance(models, list) and not models):
                raise ValueError("give at least one model (--model), or answers to rescore (--answers)")
            models = [models] if isinstance(models, (str, Path)) else list(models)
            # llava_v1 on a model of another family than LLaVA-1.5: refused before any model runs.
            from napo.data.prompts import check_checkpoint_prompt_format

            for model in models:
                pair = (loaded or {}).get(model)
                check_checkpoint_prompt_format(model, prompt_format, pair[1] if pair is not None else None)
            directories = {}
            for model, tag in zip(models, model_tags(models), strict=True):
                pair = (loaded or {}).get(model)
                if pair is None:
                    from napo.models.loading import load_model

                    pair = load_model(model, device=device, dtype=dtype)
                for benchmark in chosen:
                    decoding = Decoding(
                        max_new_tokens=max_new_tokens or benchmark.decoding.max_new_tokens,
                        num_beams=num_beams or benchmark.decoding.num_beams,
                        temperature=benchmark.decoding.temperature if temperature is None else temperature,
                        prompt_format=prompt_format,
                    )
                    where = output / "answers" / tag / benchmark.name
                    summary = generate_benchmark_answers(
                        benchmark,
                        model,
                        where,
                        loaded=pair,
                        decoding=decoding,
                        batch_size=batch_size,
                        limit=limit,
                        num_shards=num_shards,
                        shard_index=shard_index,
                        rows_per_part=rows_per_part,
                        overwrite=overwrite,
                        progress=progress,
                        items=tables[benchmark.name],
                        allow_outside_images=allow_outside_images,
                    )
                    summaries.append((tag, benchmark.name, summary))
                    directories.setdefault(tag, {})[benchmark.name] = where
            # The models evaluated into this output before stay in its report: the comparison is the point.
            earlier: dict[str, dict[str, Path]] = {}
            if (output / "answers").is_dir():
                for tag, by_benchmark in _answers_dirs(output, chosen).items():
                    for name, where in by_benchmark.items():
                        if name not in directories.get(tag, {}):
                            earlier.setdefault(tag, {})[name] = where
        result = score_answers(directories, chosen, output, tables, earlier=earlier if answers is None else None)
        result.summaries = summaries
        return result


@contextmanager
def output_lock(output: Path, shard_index: int = 0) -> Iterator[None]:
    """Holds ``output`` for this process's shard while it runs: a second ``napo eval`` of the same shard into the
    same output (it would answer and count the same items twice) is refused, naming the first one's pid and host.
    An flock: the kernel lets it go when the process ends, killed or not, so a stale lock cannot stop a rerun."""
    import fcntl
    import socket

    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    path = output / f".napo-eval-s{shard_index:04d}.lock"
    handle = open(path, "a+")  # noqa: SIM115 - held open for the run: closing it releases the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its pid yet"
        handle.close()
        raise ValueError(
            f"{output} is in use by another napo eval ({holder}, lock {path}); wait for it to end, or give another "
            "--output (different --shard-index values may share an output)"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        if created and list(output.iterdir()) == [path]:  # a refused run leaves no output behind
            path.unlink()
            output.rmdir()
        handle.close()


def score_answers(
    directories: dict[str, dict[str, Path]],
    benchmarks: list[Benchmark],
    output: Path,
    tables: dict | None = None,
    earlier: dict[str, dict[str, Path]] | None = None,
) -> EvalResult:
    """Scores every answers directory against its benchmark's items (``tables``: {name: items_table}, built
    here when not given) and writes the per-benchmark files and the report. ``earlier``: the answers of models
    evaluated into this output before, kept in the report beside the new ones (left out, with a word, when they
    answered other items)."""
    import sys

    tables = tables or {benchmark.name: items_table(benchmark.items()) for benchmark in benchmarks}
    read: dict[Path, Answers] = {}  # the earlier answers, read once: checked here, scored below
    for tag, by_benchmark in (earlier or {}).items():
        for name, where in by_benchmark.items():
            try:
                read[where] = read_answers(where, tables[name])
            except ValueError as error:
                print(f"napo eval: the earlier answers of {tag} on {name} are left out of the report: {error}",
                      file=sys.stderr)  # fmt: skip
                continue
            directories.setdefault(tag, {})[name] = where
    import pandas as pd

    from napo.eval.report import write_benchmark_files, write_report

    rows, items, runs = [], {}, {}
    for tag, by_benchmark in directories.items():
        for benchmark in benchmarks:
            if benchmark.name not in by_benchmark:
                continue
            where = by_benchmark[benchmark.name]
            answers = read[where] if where in read else read_answers(where, tables[benchmark.name])
            metrics, per_item = benchmark.score(answers.frame)
            runs[(tag, benchmark.name)] = (answers, metrics)
            items[(tag, benchmark.name)] = per_item
            rows += [
                {"model": tag, "benchmark": benchmark.name, "metric": k, "value": float(v)} for k, v in metrics.items()
            ]
    metrics_frame = pd.DataFrame(rows, columns=["model", "benchmark", "metric", "value"])
    table = comparison_table(metrics_frame, benchmarks)
    output.mkdir(parents=True, exist_ok=True)
    for benchmark in benchmarks:
        write_benchmark_files(output, benchmark, runs, items)
    report = write_report(output, benchmarks, runs, table, metrics_frame)
    return EvalResult(metrics=metrics_frame, table=table, items=items, report=report)


def load_json(path: str | Path) -> dict:
    """A benchmark's ``metrics.json`` as written by :func:`evaluate`."""
    return json.loads(Path(path).read_text())
