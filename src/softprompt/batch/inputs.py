"""The rows to predict: a CSV/TSV/JSONL/Parquet file or a folder of them, read chunk by chunk with pyarrow's
readers and the options Ray Data's readers are given (on_ray.py), so both paths see the same values.

CSV and TSV columns are read as text, never guessed as numbers (a text of digits stays as written); JSONL and
Parquet keep their own types. `survey` reads everything once, before any model loads: every row is checked (its
task, its texts) and counted, and the files' columns are merged into one schema, so a bad row stops the run
before any work and the output's columns are known from its first chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ..encoding import is_blank
from ..errors import SoftpromptError


class Unreadable(SoftpromptError):
    """A file pyarrow cannot read."""


KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
NOT_TEXT = {dict: "an object", list: "a list", bool: "a boolean", bytes: "bytes"}


@dataclass(frozen=True)
class Routing:
    """Which task answers a row, and which of its columns that task reads."""

    fields: dict[str, tuple[str, ...]]  # task -> the columns it reads (its fields)
    column: str | None  # the column naming each row's task; None: the one task answers every row

    @classmethod
    def of(cls, fields: dict[str, tuple[str, ...]], column: str | None) -> "Routing":
        """With several tasks the rows name theirs (in `column`, by default "task"); with one, only if told to."""
        return cls(fields, column if column or len(fields) == 1 else "task")

    def item(self, row: dict[str, Any]) -> tuple[str, dict[str, str]]:
        """(task, its texts) of one row, or an error naming the column at fault (the caller says which row)."""
        task = next(iter(self.fields))
        if self.column is not None:
            named = row.get(self.column)
            if not isinstance(named, str) or named not in self.fields:
                raise SoftpromptError(f"column {self.column!r}: unknown task {named!r} (tasks: "
                                      f"{', '.join(self.fields)})")
            task = named
        texts = {}
        for name in self.fields[task]:
            if name not in row:
                raise SoftpromptError(f"no column {name!r}, which task {task!r} reads")
            value = row[name]
            if value is None:
                raise SoftpromptError(f"column {name!r}: no text (null); give it some text")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                kind = NOT_TEXT.get(type(value), type(value).__name__)
                raise SoftpromptError(f"column {name!r}: {kind} where a text belongs ({repr(value)[:40]}); "
                                      "flatten it into a string")
            texts[name] = str(value)
        if is_blank(texts.values()):
            raise SoftpromptError(f"column {', '.join(map(repr, texts))}: empty or blank text; give it some text")
        return task, texts

    def columns(self) -> set[str]:
        return {c for fields in self.fields.values() for c in fields} | ({self.column} if self.column else set())

    def items(self, table: pa.Table, where: str, first: int) -> list[tuple[str, dict[str, str]]]:
        """Every row's (task, texts); a refused row is named `where` row N, N counting from `first`."""
        rows = table.select([c for c in table.column_names if c in self.columns()]).to_pylist()
        out = []
        for i, row in enumerate(rows):
            try:
                out.append(self.item(row))
            except SoftpromptError as err:
                raise SoftpromptError(f"{where} row {first + i}, {err}") from None
        return out


@dataclass(frozen=True)
class Inputs:
    """The checked input: its files (one kind), the schema their columns merge into, their rows."""

    files: list[Path]
    kind: str  # csv | tsv | jsonl | parquet
    schema: pa.Schema
    counts: list[int]  # rows per file

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def chunks(self, size: int, skip: int = 0) -> Iterator[tuple[str, int, pa.Table]]:
        """(file, its first row's number counting from 1, rows) of at most `size` rows, in order, after the
        first `skip` rows (a resumed output's)."""
        for path, count in zip(self.files, self.counts):
            if skip >= count:
                skip -= count
                continue
            read = 0  # rows of this file read so far
            for table in read_file(path, self.kind, size):
                start = min(max(skip - read, 0), table.num_rows)
                read += table.num_rows
                if start < table.num_rows:
                    yield str(path), read - table.num_rows + start + 1, table.slice(start)
            skip = 0


def find_files(source: str | Path) -> tuple[list[Path], str]:
    """The input files (a file, or a folder's files in name order) and their one kind."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SoftpromptError(f"input {source} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix in KINDS and p.is_file()) if path.is_dir() else [path]
    if not files:
        raise SoftpromptError(f"{source} holds no {', '.join(KINDS)} files")
    kinds = {KINDS.get(p.suffix) for p in files}
    if None in kinds:
        raise SoftpromptError(f"{source}: unsupported file type; use {', '.join(KINDS)}")
    if len(kinds) > 1:
        raise SoftpromptError(f"{source} holds files of several kinds ({', '.join(sorted(map(str, kinds)))}); "
                              "give one kind at a time")
    return files, kinds.pop()  # type: ignore[return-value]


def survey(source: str | Path, routing: Routing, reserved: Iterable[str] = ()) -> Inputs:
    """Read every file once: each row checked and counted, the files' columns merged (their types promoted where
    they differ, an int where another file has a float); `reserved` column names (the answers') refused."""
    files, kind = find_files(source)
    schema: pa.Schema | None = None
    counts = []
    for path in files:
        count, file_schema = 0, None
        try:
            for table in read_file(path, kind, 4096):
                if file_schema is None:
                    file_schema = table.schema
                    _check_columns(path, file_schema, routing, reserved)
                routing.items(table, str(path), count + 1)
                count += table.num_rows
        except Unreadable:
            if kind == "jsonl":
                _find_bad_line(path, routing)
            raise
        if file_schema is not None:
            schema = file_schema if schema is None else _merge(schema, file_schema, path)
        counts.append(count)
    if schema is None or not sum(counts):
        raise SoftpromptError(f"{source} has no rows to predict")
    return Inputs(files, kind, schema, counts)


def _check_columns(path: Path, schema: pa.Schema, routing: Routing, reserved: Iterable[str]) -> None:
    names = schema.names
    wanted = [routing.column] if routing.column else list(next(iter(routing.fields.values())))
    for column in wanted:
        if column not in names:
            what = "task" if column == routing.column else "text"
            raise SoftpromptError(f"{path} has no {what} column {column!r} (columns: {', '.join(names)})")
    taken = [c for c in reserved if c in names]
    if taken:
        raise SoftpromptError(f"{path} has column(s) {', '.join(map(repr, taken))}, which the answers would "
                              "overwrite; rename them, or give the answers a prefix (--answer-prefix pred_)")


def _merge(schema: pa.Schema, other: pa.Schema, path: Path) -> pa.Schema:
    try:
        return pa.unify_schemas([schema, other], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise SoftpromptError(f"{path}: a column's type differs from the files before it ({_first_line(err)}); "
                              "give each column one type") from None


def read_options(kind: str, columns: Iterable[str] = ()) -> dict[str, Any]:
    """pyarrow's reader options for `kind`, as Ray Data's readers take them too: CSV and TSV `columns` as text,
    newlines inside a quoted CSV value, no quoting at all in TSV (as data.py reads them)."""
    if kind == "csv":
        parse = pa_csv.ParseOptions(newlines_in_values=True)
    elif kind == "tsv":
        parse = pa_csv.ParseOptions(delimiter="\t", quote_char=False)
    else:
        return {}
    return {"parse_options": parse, "convert_options": pa_csv.ConvertOptions(
        column_types=dict.fromkeys(columns, pa.string()))}


def read_file(path: Path, kind: str, size: int) -> Iterator[pa.Table]:
    """The rows of one file in tables of at most `size` rows; a file pyarrow cannot read is one error naming it.
    JSONL is parsed whole (as Ray's reader does: the types of a column agree over the file), the rest streams."""
    try:
        if kind == "parquet":
            yield from _rechunk(pq.ParquetFile(path).iter_batches(batch_size=size), size)
        elif kind == "jsonl":
            yield from _rechunk(pa_json.read_json(path).to_batches(), size)
        else:
            with pa_csv.open_csv(path, **read_options(kind)) as first_block:
                header = first_block.schema.names
            yield from _rechunk(pa_csv.open_csv(path, **read_options(kind, header)), size)
    except (pa.ArrowException, OSError) as err:
        raise Unreadable(f"cannot read {path}: {_first_line(err)}") from None


def _find_bad_line(path: Path, routing: Routing) -> None:
    """Where pyarrow gave up on JSON lines (a column holding a text here and an object there, say): the first row
    that is not a JSON object, or that is refused, named; nothing if every row is fine on its own."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate((line for line in f if line.strip()), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SoftpromptError(f"{path} row {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise SoftpromptError(f"{path} row {number}: not a JSON object")
            try:
                routing.item(row)
            except SoftpromptError as err:
                raise SoftpromptError(f"{path} row {number}, {err}") from None


def _rechunk(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    held: pa.Table | None = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        held = table if held is None else pa.concat_tables([held, table])
        while held.num_rows >= size:
            yield held.slice(0, size)
            held = held.slice(size)
    if held is not None and held.num_rows:
        yield held


def _first_line(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
