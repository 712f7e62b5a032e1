"""Property tests of the data stages' input checks: random column sets, types, null patterns and idx
values. Whatever the input, a check either accepts it or raises one ValueError naming a column; and
what it accepts, the row loop can run on (idx unique and hashable, the text columns strings)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from napo.cli import build_parser  # noqa: E402
from napo.data.generate import check_input as check_generate_input  # noqa: E402
from napo.data.inputs import REQUIRED_COLUMNS, check_answer_columns, check_idx_values  # noqa: E402
from napo.data.store import parquet_schema  # noqa: E402
from napo.train.reference import check_input as check_logps_input  # noqa: E402

BUDGET = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = [*REQUIRED_COLUMNS, "question_only", "image_only", "prompt", "images", "_image", "ref_chosen_logps", "x"]
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TYPES = {
    "int64": (pa.int64(), st.integers(-3, 3)),
    "int8": (pa.int8(), st.integers(-3, 3)),
    "string": (pa.string(), st.text(max_size=3)),
    "large_string": (pa.large_string(), st.text(max_size=3)),
    "float64": (pa.float64(), st.floats(allow_nan=True)),
    "bool": (pa.bool_(), st.booleans()),
    "binary": (pa.binary(), st.binary(max_size=3)),
    "list": (pa.list_(pa.int64()), st.lists(st.integers(0, 2), max_size=2)),
    "image": (IMAGE, st.fixed_dictionaries({"bytes": st.binary(max_size=2), "path": st.text(max_size=2)})),
    "struct": (pa.struct([("a", pa.int64())]), st.fixed_dictionaries({"a": st.integers(0, 2)})),
    "null": (pa.null(), st.none()),
}


@st.composite
def columns(draw, rows: int):
    """(name, array) of a drawn type with a drawn null pattern; sometimes dictionary-encoded strings."""
    arrow_type, values = TYPES[draw(st.sampled_from(sorted(TYPES)))]
    data = draw(st.lists(st.one_of(st.none(), values), min_size=rows, max_size=rows))
    array = pa.array(data, type=arrow_type)
    if pa.types.is_string(arrow_type) and draw(st.booleans()):
        array = array.dictionary_encode()
    return array


@st.composite
def tables(draw):
    rows = draw(st.integers(0, 6))
    names = draw(st.lists(st.one_of(st.sampled_from(NAMES), st.text(min_size=1, max_size=4)), max_size=9))
    # Most draws keep the RLAIF-V columns so the later checks (types, idx values) are reached, not just "missing".
    if draw(st.integers(0, 3)):
        names = [*REQUIRED_COLUMNS, *names]
    names = list(dict.fromkeys(names))
    arrays = [draw(columns(rows)) for _ in names]
    if "idx" in names and draw(st.booleans()):  # an idx column of drawn (possibly repeated) keys
        keys = draw(st.lists(st.one_of(st.integers(0, 4), st.text(max_size=1)), min_size=rows, max_size=rows))
        kind = draw(st.sampled_from([int, str]))
        arrays[names.index("idx")] = pa.array([kind(k) if isinstance(k, int) or kind is str else len(k) for k in keys])
    return pa.Table.from_arrays(arrays, names=names)


def names_a_column(error: ValueError, table, asked=()) -> bool:
    names = [*table.column_names, *REQUIRED_COLUMNS, *(name for name in asked or () if name.strip())]
    return any(name in str(error) for name in names)


def assert_runnable(table, text_columns) -> None:
    """What the row loop relies on once a check has passed."""
    keys = table.column("idx").to_pylist()
    assert None not in keys and len(set(keys)) == len(keys)
    for column in ["question", *text_columns]:
        assert all(value is None or isinstance(value, str) for value in table.column(column).to_pylist())


@BUDGET
@given(tables(), st.one_of(st.none(), st.integers(0, 7)))
def test_generate_input_check_accepts_or_names_a_column(table, limit):
    try:
        check_generate_input(table, limit)
    except ValueError as error:
        assert names_a_column(error, table), error
        return
    assert_runnable(table.slice(0, limit) if limit is not None else table, ("chosen", "rejected"))


@BUDGET
@given(tables(), st.one_of(st.none(), st.lists(st.sampled_from([*NAMES, "", " "]), max_size=4)))
def test_logps_input_check_accepts_or_names_a_column(table, wanted):
    try:
        scored = check_logps_input(table.schema, wanted)
        check_idx_values(table)
    except ValueError as error:
        assert names_a_column(error, table, wanted) or "answer column" in str(error), error
        return
    assert scored and len(set(scored)) == len(scored) and not {"image", "question", "idx", "prompt"} & set(scored)
    assert_runnable(table, scored)


@BUDGET
@given(st.lists(st.text(max_size=3), max_size=5), st.lists(st.text(max_size=3), max_size=4))
def test_answer_columns_are_accepted_only_when_present_distinct_and_named(names, columns_asked):
    try:
        accepted = check_answer_columns(names, columns_asked)
    except ValueError:
        return
    assert accepted == columns_asked and all(c in names and c.strip() for c in accepted)


@BUDGET
@given(st.text(max_size=12))
def test_cli_columns_and_numbers_parse_or_exit_2(text):
    parser = build_parser()
    parser.exit_on_error = False
    for argv in (["--columns", text], ["--max-length", text], ["--batch-size", text]):
        try:
            args = parser.parse_args(["logps", "--model", "m", "--data", "d", "--output", "o", *argv])
        except SystemExit as exit_:
            assert exit_.code == 2
            continue
        except argparse.ArgumentError:
            continue
        if argv[0] == "--columns":
            assert all(c and c == c.strip() for c in args.columns) and len(set(args.columns)) == len(args.columns)
        elif argv[0] == "--max-length":
            assert isinstance(args.max_length, int) and args.max_length >= 0
        else:
            assert isinstance(args.batch_size, int) and args.batch_size >= 1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["idx", "question", "a", "b"]), st.sampled_from(sorted(TYPES)),
                                min_size=1), min_size=1, max_size=3))  # fmt: skip
def test_a_parquet_directory_reads_every_column_or_names_the_clash(file_schemas):
    with tempfile.TemporaryDirectory() as folder:
        for number, schema in enumerate(file_schemas):
            arrays = [pa.array([None], type=TYPES[kind][0]) for kind in schema.values()]
            pq.write_table(pa.Table.from_arrays(arrays, names=list(schema)), Path(folder) / f"{number}.parquet")
        files = sorted(str(p) for p in Path(folder).glob("*.parquet"))
        try:
            unified = parquet_schema(files)
        except ValueError as error:
            assert any(f"column {name!r}" in str(error) for schema in file_schemas for name in schema), error
            return
    assert set(unified.names) == {name for schema in file_schemas for name in schema}
