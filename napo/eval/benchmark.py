"""What every benchmark of ``napo eval`` is: items to answer, decoding settings, and a scorer.

A benchmark turns the user's files (or, for ``shapes``, nothing) into *items*: one prompt each, with an
``idx`` (a string unique in the benchmark), an ``image`` (encoded bytes, or a path relative to the
benchmark's data directory), the ``question`` the model is asked and ``meta``, a JSON string with what
the scorer needs (labels, ground truth). The model's answers come back as an ``answer`` column beside
those, and :meth:`Benchmark.score` reduces them to metrics (one dict) and per-item results (a table).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

ITEM_COLUMNS = ("idx", "image", "question", "meta")


@dataclass(frozen=True)
class Decoding:
    """How a benchmark's answers are generated, as its reference script does: beams, new tokens, and a
    sampling temperature (0: no sampling). ``prompt_format`` is the prompt's rendering
    (:mod:`napo.data.prompts`; ``llava_v1`` is the LLaVA-1.5 format the reference scripts use)."""

    max_new_tokens: int
    num_beams: int
    temperature: float = 0.0
    prompt_format: str = "template"

    def as_dict(self) -> dict:
        return {**asdict(self), "do_sample": self.temperature > 0}


class MissingDataError(FileNotFoundError):
    """The benchmark's files are not all there: ``missing`` lists each absent path (what to download)."""

    def __init__(self, benchmark: str, missing: list[str], hint: str = "") -> None:
        self.benchmark = benchmark
        self.missing = list(missing)
        lines = [f"{benchmark}: {len(self.missing)} required file(s) missing:"]
        lines += [f"  {path}" for path in self.missing]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class DataFormatError(ValueError):
    """A benchmark file is there but not in the expected shape (the message names the file and what is wrong)."""


def require_files(benchmark: str, paths: list[Path], hint: str = "") -> None:
    """Raises :class:`MissingDataError` listing every path of ``paths`` that is not a file or directory."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MissingDataError(benchmark, missing, hint)


def read_text(path: Path, benchmark: str) -> str:
    """A benchmark file's text: UTF-8 (a UTF-8 byte-order mark is allowed); anything else (UTF-16, Latin-1)
    is an error naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFormatError(
            f"{benchmark}: {path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
        ) from None


def read_json(path: Path, benchmark: str) -> Any:
    try:
        return json.loads(read_text(path, benchmark))
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{benchmark}: {path} is not valid JSON ({error})") from None


def read_jsonl(path: Path, benchmark: str) -> list[dict]:
    """Every JSON object of a JSON-lines file; a bad line is an error naming its number."""
    rows = []
    for number, line in enumerate(read_text(path, benchmark).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{benchmark}: {path} line {number} is not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise DataFormatError(f"{benchmark}: {path} line {number} is not a JSON object")
        rows.append(row)
    return rows


def require_keys(record: dict, keys: tuple[str, ...], where: str, benchmark: str) -> None:
    if not isinstance(record, dict):
        raise DataFormatError(f"{benchmark}: {where} is not a JSON object (got {type(record).__name__})")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataFormatError(
            f"{benchmark}: {where} lacks the field(s) {', '.join(missing)} (has: {', '.join(map(str, record))})"
        )


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What a field of a benchmark file may hold (JSON read by Python's json module, which takes NaN and Infinity).
_KINDS: dict[str, tuple[str, Any]] = {
    "text": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "string": ("a string", lambda v: isinstance(v, str)),
    "id": (
        "an integer or a non-empty string",
        lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and bool(v.strip())),
    ),
    "int": (
        "an integer",
        lambda v: (
            (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())
        ),
    ),
    "strings": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "votes": (
        "an object of finite numbers",
        lambda v: isinstance(v, dict) and bool(v) and all(_finite_number(x) for x in v.values()),
    ),
}


def require_types(record: dict, kinds: dict[str, str], where: str, benchmark: str) -> None:
    """Refuses a field of ``record`` that is not of its kind (see ``_KINDS``: a null, a number where text
    belongs, a NaN vote), naming the file and row in ``where``; call after :func:`require_keys`."""
    for key, kind in kinds.items():
        if key not in record:
            continue
        description, check = _KINDS[kind]
        if not check(record[key]):
            raise DataFormatError(f"{benchmark}: {where}: {key} must be {description}, got {record[key]!r}")


def require_inside(path: str, where: str, benchmark: str, folder: str) -> None:
    """Refuses an image path of a benchmark file that is absolute or climbs out with ``..``: it would pass the
    check that the file exists, then be read as a path under ``folder`` and fail item by item for a wrong reason."""
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise DataFormatError(
            f"{benchmark}: {where}: the image path {path!r} must be relative to {folder} and stay inside it "
            "(no leading / and no ..); put the image there (a link to a folder elsewhere works with "
            "--allow-outside-images)"
        )


def item(idx: str, image: bytes | str | None, question: str, **meta: Any) -> dict:
    """One item row (see the module docstring)."""
    return {"idx": idx, "image": image, "question": question, "meta": json.dumps(meta, sort_keys=True)}


class Benchmark:
    """A benchmark: subclasses set the class attributes and implement :meth:`items` and :meth:`score`.

    ``headline``: (metric key, column label, higher_is_better) triples of the comparison table, the
    paper's Table 1 columns for this benchmark. ``data_dir``: where its files are (None for ``shapes``).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    decoding: Decoding
    headline: ClassVar[tuple[tuple[str, str, bool], ...]]
    data_dir: Path | None = None

    def items(self) -> list[dict]:
        raise NotImplementedError

    def score(self, answers) -> tuple[dict, Any]:
        """``answers``: a DataFrame with :data:`ITEM_COLUMNS` and ``answer``. Returns (metrics, per-item table)."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Lines the report prints under the benchmark (a non-GPT-4 judge, say)."""
        return []


def metas(answers) -> list[dict]:
    """The decoded ``meta`` of each row of an answers table, in row order."""
    return [json.loads(m) for m in answers["meta"]]
