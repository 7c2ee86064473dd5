"""The answer columns, and the predictor that adds them to a batch of rows: the one step both the streaming loop
(job.py) and Ray Data's actors (on_ray.py, or a user's own `map_batches`) run.

A row's answer is `MultiTaskModel.predict`'s without its task (the row has it): `label` and `scores` (each label's
probability) or `value` (regression); an ensemble adds `vote` and `members` (each member's answer). The columns'
types come from the tasks alone, so every chunk, file and actor gives the same schema: `scores` is a struct over
every task's labels (null where a label is not the row's task's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import pyarrow as pa

from ..checkpoint import checkpoint_folder
from ..errors import SoftpromptError
from ..multitask import MultiTaskModel
from ..pipeline import read_task_checkpoint
from .inputs import Routing

Checkpoints = Mapping[str, "str | Path | Sequence[str | Path]"] | Sequence["str | Path"]
Shapes = dict[str, tuple[tuple[str, ...], int]]  # task -> (its labels, () for regression; its number of prompts)


def by_task(checkpoints: Checkpoints, trust_remote_code: bool = False) -> dict[str, list[str]]:
    """{task: [checkpoint, ...]} of what `MultiTaskModel.from_pretrained` takes, or of a list whose items may
    be NAME=CHECKPOINT: a local checkpoint as an absolute path (a run folder as its best/), so every process
    reads the same; an unnamed one named by its task (several of one task make an ensemble)."""
    pairs: list[tuple[str | None, str | Path]]
    if isinstance(checkpoints, Mapping):
        pairs = [(task, p) for task, paths in checkpoints.items()
                 for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    else:
        pairs = [_named(c) for c in checkpoints]
    out: dict[str, list[str]] = {}
    for task, given in pairs:
        local = Path(given).expanduser()
        path = str((checkpoint_folder(local) or local).resolve()) if local.exists() else str(given)
        if task is None:
            task = read_task_checkpoint(path, trust_remote_code)[2].task.name
        out.setdefault(task, []).append(path)
    if not out:
        raise SoftpromptError("no checkpoints given")
    return out


def _named(given: str | Path) -> tuple[str | None, str | Path]:
    """NAME=CHECKPOINT as its two parts (unless it is the name of a folder that exists); anything else unnamed."""
    if "=" in str(given) and not Path(given).expanduser().exists():
        name, path = str(given).split("=", 1)
        return name, path
    return None, given


def shapes_of(checkpoints: dict[str, list[str]],
              trust_remote_code: bool = False) -> tuple[Shapes, dict[str, tuple[str, ...]]]:
    """Each task's labels and number of prompts, and its fields, read from the checkpoints' metadata alone (no
    weights: a Ray driver knows the answers' schema without loading the model)."""
    shapes, fields = {}, {}
    for task, paths in checkpoints.items():
        spec = read_task_checkpoint(paths[0], trust_remote_code)[2].task
        shapes[task], fields[task] = (tuple(spec.labels), len(paths)), tuple(spec.fields)
    return shapes, fields


def answer_schema(shapes: Shapes, prefix: str = "") -> pa.Schema:
    """The answer columns these tasks give, their names after `prefix`."""
    labels = list(dict.fromkeys(label for task_labels, _ in shapes.values() for label in task_labels))
    classify = any(task_labels for task_labels, _ in shapes.values())
    regress = any(not task_labels for task_labels, _ in shapes.values())
    scores = pa.struct([(label, pa.float64()) for label in labels])
    answer = ([("label", pa.string()), ("scores", scores)] if classify else []) + \
        ([("value", pa.float64())] if regress else [])
    fields = list(answer)
    if any(members > 1 for _, members in shapes.values()):
        fields += ([("vote", pa.string())] if classify else []) + \
            [("members", pa.list_(pa.struct([("member", pa.string()), *answer])))]
    return pa.schema([(prefix + name, kind) for name, kind in fields])


class SoftpromptPredictor:
    """Answers a batch of rows (a pyarrow Table or a pandas DataFrame; it returns the same kind) with one
    `MultiTaskModel` held for its lifetime; as a Ray Data actor::

        ds.map_batches(SoftpromptPredictor, fn_constructor_kwargs={"checkpoints": {"sentiment": "runs/rt/best"}},
                       concurrency=2, num_gpus=0, batch_format="pyarrow")

    `checkpoints` as `MultiTaskModel.from_pretrained` takes them; each row's task is its `task_column` (default:
    "task", read when there are several tasks). A row refused (an unknown task, no text) is an error naming its
    place in the batch."""

    def __init__(self, checkpoints: Checkpoints, *, task_column: str | None = None, answer_prefix: str = "",
                 batch_size: int = 32, dtype: str | None = None, trust_remote_code: bool = False,
                 base_model: str | None = None, device: str | None = "auto") -> None:
        self.model = MultiTaskModel.from_pretrained(by_task(checkpoints, trust_remote_code), trust_remote_code,
                                                    dtype, base_model, device)
        tasks = self.model.tasks()
        self.routing = Routing.of({name: info.fields for name, info in tasks.items()}, task_column)
        self.schema = answer_schema({name: (info.labels, len(info.members)) for name, info in tasks.items()},
                                    answer_prefix)
        self.prefix, self.batch_size = answer_prefix, batch_size

    def __call__(self, batch: pa.Table | pd.DataFrame) -> pa.Table | pd.DataFrame:
        if isinstance(batch, pa.Table):
            return self.answer(batch, "batch", 1)
        return self.answer(pa.Table.from_pandas(batch, preserve_index=False), "batch", 1).to_pandas()

    def answer(self, table: pa.Table, where: str, first: int) -> pa.Table:
        """`table` with the answer columns after its own; a refused row is `where` row N, N counting from
        `first`."""
        items = self.routing.items(table, where, first)
        try:
            results = self.model.predict(items, self.batch_size)
        except SoftpromptError as err:  # what only the model finds (no token it reads; scores not finite)
            raise SoftpromptError(f"{where} rows {first}-{first + len(items) - 1}: {err}") from None
        answers = pa.Table.from_pylist([{self.prefix + key: value for key, value in r.items() if key != "task"}
                                        for r in results], schema=self.schema)
        for field, column in zip(answers.schema, answers.columns):
            table = table.append_column(field, column)
        return table
