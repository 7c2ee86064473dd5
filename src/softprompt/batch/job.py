"""`predict_files`: every row of some files answered by one or more prompts over one frozen model, read, predicted
and written a chunk at a time, with progress on stderr; `resume=True` continues an interrupted output after the
rows it holds. `plan` is what this and the Ray path (on_ray.py) share: everything checked before a model loads."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from ..errors import SoftpromptError
from .answers import Checkpoints, SoftpromptPredictor, answer_schema, by_task, shapes_of
from .inputs import Inputs, Routing, survey
from .outputs import JsonLines, ParquetParts, conform, open_output


@dataclass
class Written:
    output: Path
    rows: int  # answered by this run
    skipped: int  # already in a resumed output


@dataclass
class Job:
    checkpoints: dict[str, list[str]]  # task -> its prompts
    inputs: Inputs
    schema: pa.Schema  # the output's: the input's columns, then the answer's
    output: JsonLines | ParquetParts

    def progress(self, shown: bool) -> tqdm:
        return tqdm(total=self.inputs.rows, initial=self.output.done, unit="rows", file=sys.stderr,
                    dynamic_ncols=True, disable=not shown)

    def written(self, skipped: int) -> Written:
        return Written(self.output.path, self.inputs.rows - skipped, skipped)


def plan(checkpoints: Checkpoints, input: str | Path, output: str | Path, *, task_column: str | None = None,
         answer_prefix: str = "", resume: bool = False, trust_remote_code: bool = False,
         chunk_size: int = 256, batch_size: int = 32) -> Job:
    """The prompts' tasks (from their metadata, no weights), every input row checked and counted, and the output
    opened (or, resuming, what it holds counted): every refusal before any model loads."""
    if chunk_size < 1 or batch_size < 1:
        raise SoftpromptError("--chunk-size and --batch-size must be at least 1")
    named = by_task(checkpoints, trust_remote_code)
    shapes, fields = shapes_of(named, trust_remote_code)
    answers = answer_schema(shapes, answer_prefix)
    inputs = survey(input, Routing.of(fields, task_column), answers.names)
    schema = pa.schema(list(inputs.schema) + list(answers))
    out = open_output(output, schema, answers.names, resume)
    if out.done > inputs.rows:
        out.close()
        raise SoftpromptError(f"{output} holds {out.done} rows and {input} has {inputs.rows}: it was written from "
                              "other input")
    if isinstance(out, ParquetParts) and out.finished and out.done < inputs.rows:
        raise SoftpromptError(f"{output} is a finished output of {out.done} rows, and {input} has {inputs.rows}: "
                              "it was written from other input")
    return Job(named, inputs, schema, out)


def predict_files(checkpoints: Checkpoints, input: str | Path, output: str | Path, *, task_column: str | None = None,
                  chunk_size: int = 256, batch_size: int = 32, resume: bool = False, answer_prefix: str = "",
                  dtype: str | None = None, trust_remote_code: bool = False, base_model: str | None = None,
                  progress: bool = True, device: str | None = "auto") -> Written:
    """Answer every row of `input` (a CSV/TSV/JSONL/Parquet file or a folder of them) into `output` (.jsonl or
    .parquet): each row's columns, then its answer's (`label`, `scores`, or `value`; an ensemble's `vote` and
    `members`), in input order. `checkpoints`: as `MultiTaskModel.from_pretrained` takes them, or a list of
    CHECKPOINT / NAME=CHECKPOINT; with several tasks each row names its own in `task_column` (default "task"),
    and one forward mixes them. `chunk_size` rows are read, predicted and written at a time; `resume` skips the
    rows an interrupted output holds."""
    job = plan(checkpoints, input, output, task_column=task_column, answer_prefix=answer_prefix, resume=resume,
               trust_remote_code=trust_remote_code, chunk_size=chunk_size, batch_size=batch_size)
    out, skipped = job.output, job.output.done
    try:
        with job.progress(progress) as bar:
            if skipped < job.inputs.rows:
                predictor = SoftpromptPredictor(job.checkpoints, task_column=task_column, answer_prefix=answer_prefix,
                                                batch_size=batch_size, dtype=dtype,
                                                trust_remote_code=trust_remote_code, base_model=base_model,
                                                device=device)
                for path, first, table in job.inputs.chunks(chunk_size, skipped):
                    out.write(conform(predictor.answer(table, path, first), job.schema))
                    bar.update(table.num_rows)
        out.finish()
    finally:
        out.close()
    return job.written(skipped)
