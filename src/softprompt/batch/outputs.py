"""Where the answers go, chunk by chunk, and how much of them a killed run left: JSON lines or Parquet, by the
output's suffix.

JSON lines are appended and flushed a chunk at a time; a line cut by a kill has no newline, so on resume the file
is cut back to its last complete line and those lines are the rows done. A Parquet file is only readable once its
footer is written, at the end, so its chunks go to `<output>.partial/` as numbered part files, each written whole
and then renamed into place; the last chunk merged them into the output, a row group per chunk. A resumed run
counts the rows of the parts that are there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SoftpromptError

SUFFIXES = (".jsonl", ".parquet")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns: one its file lacks as nulls, the others cast to the merged type."""
    try:
        columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
                   else pa.nulls(table.num_rows, f.type) for f in schema]
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise SoftpromptError(f"a column's values do not fit the output's type ({err})") from None
    return pa.Table.from_arrays(columns, schema=schema)


class JsonLines:
    """One JSON object a line: the row's columns, then its answer's (none of them null)."""

    def __init__(self, path: Path, answers: Iterable[str], resume: bool) -> None:
        self.path, self.answers, self.done = path, set(answers), 0
        self.file: IO[bytes] | None = None  # opened by the first write: a run refused before it leaves no file
        if path.exists():
            if not resume:
                raise SoftpromptError(f"{path} exists; pass --resume to continue it, or remove it")
            self.done, end = _complete_lines(path)
            with path.open("r+b") as f:
                f.truncate(end)

    def write(self, table: pa.Table) -> None:
        if self.file is None:
            self.file = self.path.open("ab")
        lines = "".join(json.dumps(self._row(row), default=str) + "\n" for row in table.to_pylist())
        self.file.write(lines.encode("utf-8"))
        self.file.flush()
        self.done += table.num_rows

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {k: _compact(v) if k in self.answers else v for k, v in row.items()
                if not (k in self.answers and v is None)}

    def finish(self) -> None:
        """Every line is in place as it is written."""

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class ParquetParts:
    """Chunks as part files in `<output>.partial/`, merged into `<output>` by `finish`."""

    def __init__(self, path: Path, schema: pa.Schema, resume: bool) -> None:
        self.path, self.schema = path, schema
        self.parts = path.with_name(path.name + ".partial")
        self.finished = path.exists() and not self.parts.exists()
        if (path.exists() or self.parts.exists()) and not resume:
            raise SoftpromptError(f"{path if self.finished else self.parts} exists; pass --resume to continue it, or "
                                  "remove it")
        if self.finished:
            self.done = pq.read_metadata(path).num_rows
            return
        for stray in self.parts.glob("*.tmp"):
            stray.unlink()
        held = sorted(self.parts.glob("*.parquet"))
        for part in held:
            if not pq.read_schema(part).equals(schema):
                raise SoftpromptError(f"{self.parts} holds other columns than this run writes (other input or "
                                      "other prompts?); remove it, or write elsewhere")
        self.done, self.count = sum(pq.read_metadata(p).num_rows for p in held), len(held)

    def write(self, table: pa.Table) -> None:
        self.parts.mkdir(exist_ok=True)  # made by the first write: a run refused before it leaves no folder
        part = self.parts / f"{self.count:08d}.parquet"
        pq.write_table(table, part.with_suffix(".tmp"))
        os.replace(part.with_suffix(".tmp"), part)
        self.count += 1
        self.done += table.num_rows

    def finish(self) -> None:
        if self.finished:
            return
        merged = self.path.with_name(self.path.name + ".tmp")
        with pq.ParquetWriter(merged, self.schema) as writer:
            for part in sorted(self.parts.glob("*.parquet")):
                writer.write_table(pq.read_table(part))
        os.replace(merged, self.path)
        shutil.rmtree(self.parts)
        self.finished = True

    def close(self) -> None:
        """Nothing is held open between chunks."""


def open_output(output: str | Path, schema: pa.Schema, answers: Iterable[str],
                resume: bool) -> JsonLines | ParquetParts:
    """The output by its suffix (`write` each chunk, `finish` after the last, `close` either way); with `resume`,
    what an earlier run of it left (`done` rows), else a new one: an existing one is refused, so finished work is
    not overwritten by mistake."""
    path = Path(output).expanduser()
    if path.suffix not in SUFFIXES:
        raise SoftpromptError(f"--output {output}: give a file ending in {' or '.join(SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JsonLines(path, answers, resume) if path.suffix == ".jsonl" else ParquetParts(path, schema, resume)


def _complete_lines(path: Path) -> tuple[int, int]:
    """How many lines end in a newline, and the offset just after the last of them."""
    count = end = offset = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            if b"\n" in block:
                count += block.count(b"\n")
                end = offset + block.rindex(b"\n") + 1
            offset += len(block)
    return count, end


def _compact(value: Any) -> Any:
    """An answer without its nulls (the labels of other tasks in `scores`, a member's missing `value`)."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value
