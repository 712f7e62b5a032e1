"""Raw benchmark rows: one CSV per benchmark under benchmarks/results/, each with its own header."""

from __future__ import annotations

import csv
import hashlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def default_path(benchmark: str) -> Path:
    return RESULTS / f"{benchmark}.csv"


def append_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Appends rows, writing the header into a new file. A file with other columns is left alone
    and the rows go to a sibling file instead (a finished run is never lost to a wrong --csv)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    if not new_file:
        with path.open(newline="") as handle:
            existing = next(csv.reader(handle), [])
        if existing != list(header):
            columns_id = hashlib.sha1(",".join(header).encode()).hexdigest()[:8]
            other = path.with_name(f"{path.stem}.{columns_id}.csv")
            print(f"{path} has other columns; rows written to {other}", file=sys.stderr)
            append_rows(other, header, rows)
            return
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(header)
        writer.writerows(rows)
