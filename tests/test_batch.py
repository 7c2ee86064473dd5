"""Batch prediction over files: streamed chunk by chunk it equals one in-memory `MultiTaskModel.predict`, a resumed
run after a kill equals an uninterrupted one without redoing rows, every bad input is one line, and on Ray Data
it gives what the single process gives, row for row."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softprompt.batch import SoftpromptPredictor, predict_files, predict_files_ray
from softprompt.batch.answers import by_task
from softprompt.multitask import MultiTaskModel
from softprompt.tasks import get_task

from .conftest import random_checkpoint
from .test_cli import _assert_clean_error, run

WORDS = "the a film plot cast was good bad fine thin long gorgeous moving dull warm cold story end".split()


@pytest.fixture(scope="module")
def prompts(tiny_dirs, tmp_path_factory):
    """Two tasks on one tiny decoder: sentiment, an ensemble of two prompts of label words, and similarity, a
    regression head over sentence pairs."""
    root, llama = tmp_path_factory.mktemp("batch_prompts"), tiny_dirs["llama"]
    sentiment = get_task("rotten_tomatoes")
    return {"sentiment": [random_checkpoint(root / "s1", llama, sentiment, 4, "CAUSAL_LM", 1),
                          random_checkpoint(root / "s2", llama, sentiment, 3, "CAUSAL_LM", 2)],
            "similarity": random_checkpoint(root / "sim", llama, get_task("stsb"), 3, "SEQ_CLS", 3)}


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def mixed_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of both tasks, interleaved, with an id column the answers must keep beside them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pair = i % 3 == 2
        rows.append({"id": str(i), "task": "similarity" if pair else "sentiment", "text": "" if pair else _text(rng),
                     "sentence1": _text(rng) if pair else "", "sentence2": _text(rng) if pair else ""})
    return rows


def write_rows(path: Path, rows: list[dict]) -> str:
    """`rows` as a CSV, TSV, JSONL or Parquet file, by `path`'s suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        quote = (lambda v: v) if sep == "\t" else (lambda v: f'"{v}"')
        path.write_text("\n".join([sep.join(rows[0])] + [sep.join(quote(str(v)) for v in r.values()) for r in rows]))
    return str(path)


def read_output(path: str) -> list[dict]:
    """The output's rows, answers without nulls, whichever format it is in."""
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [_without_nulls(r) for r in pq.read_table(path).to_pylist()]


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def assert_same_answers(got: list[dict], want: list[dict]) -> None:
    """Row for row: the same columns and labels, every number within 1e-5 (fp32)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g, w)
        for key, value in w.items():
            _assert_close(g[key], value, (key, g, w))


def _assert_close(got, want, where) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _assert_close(got[k], want[k], where)
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for g, w in zip(got, want):
            _assert_close(g, w, where)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), where
    else:
        assert got == want, where


def in_memory(prompts: dict, rows: list[dict]) -> list[dict]:
    """What one `MultiTaskModel.predict` over every row at once answers, beside each row's columns."""
    model = MultiTaskModel.from_pretrained(by_task(prompts))
    fields = {"sentiment": ("text",), "similarity": ("sentence1", "sentence2")}
    items = [(r["task"], {f: r[f] for f in fields[r["task"]]}) for r in rows]
    return [{**r, **{k: v for k, v in a.items() if k != "task"}} for r, a in zip(rows, model.predict(items))]


def checkpoint_args(prompts: dict) -> list[str]:
    return [f"{task}={path}" for task, paths in prompts.items() for path in ([paths] if isinstance(paths, str)
                                                                            else paths)]


@pytest.mark.parametrize("kind,out", [(".csv", ".jsonl"), (".tsv", ".parquet"), (".jsonl", ".parquet"),
                                      (".parquet", ".jsonl")])
def test_streaming_in_small_chunks_equals_one_in_memory_predict(prompts, tmp_path, capsys, kind, out):
    rows = mixed_rows(150)
    source = write_rows(tmp_path / f"in{kind}", rows)
    output = str(tmp_path / f"out{out}")
    code, stdout, err = run(["predict", *checkpoint_args(prompts), "--input", source, "--output", output,
                             "--chunk-size", "7", "--batch-size", "5", "--no-progress"], capsys)
    assert code == 0, err
    assert stdout.strip() == f"{output}: 150 rows answered"
    got = read_output(output)
    assert_same_answers(got, in_memory(prompts, rows))
    assert got[0]["members"][0].keys() == {"member", "label", "scores"} and got[0]["vote"] in ("negative", "positive")
    assert got[2].keys() == {"id", "task", "text", "sentence1", "sentence2", "value"}  # one prompt: no members
    if out == ".parquet":
        assert pq.ParquetFile(output).num_row_groups == 22  # a row group per chunk of 7
        assert not Path(output + ".partial").exists()


def test_a_folder_of_files_is_one_input_in_name_order_and_columns_merge(prompts, tmp_path, capsys):
    rows = mixed_rows(40)
    folder = tmp_path / "in"
    folder.mkdir()
    write_rows(folder / "b.jsonl", rows[25:])
    write_rows(folder / "a.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in rows[:25]])  # no id column
    output = str(tmp_path / "out.parquet")
    code, _, err = run(["predict", *checkpoint_args(prompts), "--input", folder, "--output", output,
                        "--chunk-size", "10", "--no-progress"], capsys)
    assert code == 0, err
    got = read_output(output)
    assert [r.get("id") for r in got] == [None] * 25 + [str(i) for i in range(25, 40)]
    assert_same_answers([{k: v for k, v in r.items() if k != "id"} for r in got],
                        [{k: v for k, v in r.items() if k != "id"} for r in in_memory(prompts, rows)])


def test_one_checkpoint_needs_no_task_column_and_answers_as_predict_does(prompts, tmp_path, capsys):
    """`predict CHECKPOINT --input` gives each row what `predict CHECKPOINT --file` prints for it."""
    checkpoint = prompts["sentiment"][0]
    texts = [_text(random.Random(i)) for i in range(30)]
    source = write_rows(tmp_path / "in.csv", [{"text": t} for t in texts])
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(texts))
    code, printed, err = run(["predict", checkpoint, "--file", lines], capsys)
    assert code == 0, err
    code, _, err = run(["predict", checkpoint, "--input", source, "--output", tmp_path / "out.jsonl",
                        "--chunk-size", "4", "--no-progress"], capsys)
    assert code == 0, err
    assert_same_answers(read_output(str(tmp_path / "out.jsonl")), [json.loads(x) for x in printed.splitlines()])


def test_an_answer_prefix_keeps_a_label_column_beside_the_answer(prompts, tmp_path, capsys):
    source = write_rows(tmp_path / "in.csv", [{"text": "good film", "label": "positive"}])
    output = tmp_path / "out.jsonl"
    args = ["predict", prompts["sentiment"][0], "--input", source, "--output", output, "--no-progress"]
    code, _, err = run(args, capsys)
    _assert_clean_error(code, err, "column(s) 'label', which the answers would overwrite")
    code, _, err = run(args + ["--answer-prefix", "pred_"], capsys)
    assert code == 0, err
    assert read_output(str(output))[0].keys() == {"text", "label", "pred_label", "pred_scores"}


class Killed(BaseException):
    """Stands for the process being killed mid-run (not an Exception: nothing tidies up after it)."""


def _kill_after(monkeypatch, chunks: int) -> list[int]:
    """Make the run die as chunk `chunks + 1` is answered; returns the rows each answered chunk held."""
    answer, seen = SoftpromptPredictor.answer, []

    def dying(self, table, where, first):
        if len(seen) == chunks:
            raise Killed()
        seen.append(table.num_rows)
        return answer(self, table, where, first)
    monkeypatch.setattr(SoftpromptPredictor, "answer", dying)
    return seen


@pytest.mark.parametrize("out", [".jsonl", ".parquet"])
def test_resume_after_a_kill_finishes_without_redoing_rows_and_equals_an_uninterrupted_run(
        prompts, tmp_path, capsys, monkeypatch, out):
    rows = mixed_rows(100, seed=3)
    source = write_rows(tmp_path / "in.csv", rows)
    whole, output = str(tmp_path / f"whole{out}"), tmp_path / f"out{out}"
    args = ["predict", *checkpoint_args(prompts), "--input", source, "--chunk-size", "16", "--no-progress"]
    assert run(args + ["--output", whole], capsys)[0] == 0

    with monkeypatch.context() as patch:
        _kill_after(patch, 3)
        with pytest.raises(Killed):
            run(args + ["--output", output], capsys)
    if out == ".jsonl":
        assert len(output.read_text().splitlines()) == 48
        with output.open("a") as f:
            f.write('{"id": "48", "task": "sentim')  # the kill cut the next chunk's first line
    else:
        assert len(list(Path(f"{output}.partial").glob("*.parquet"))) == 3 and not output.exists()
        (Path(f"{output}.partial") / "00000003.tmp").write_bytes(b"PAR1 half a part")

    code, _, err = run(args + ["--output", output], capsys)
    _assert_clean_error(code, err, "exists; pass --resume to continue it")
    answered = _kill_after(monkeypatch, 100)
    code, stdout, err = run(args + ["--output", output, "--resume"], capsys)
    assert code == 0, err
    assert stdout.strip() == f"{output}: 52 rows answered after the 48 it held"
    assert answered == [16, 16, 16, 4]  # only the rows the output lacked, in chunks from where it ended
    assert read_output(str(output)) == read_output(whole)
    code, stdout, _ = run(args + ["--output", output, "--resume"], capsys)  # finished: nothing left to do
    assert code == 0 and stdout.strip() == f"{output}: 0 rows answered after the 100 it held" and answered[4:] == []


def _jsonl(tmp_path: Path, rows: list[dict]) -> str:
    return write_rows(tmp_path / "bad.jsonl", rows)


GOOD = {"task": "sentiment", "text": "fine", "sentence1": "a", "sentence2": "b"}
BAD_INPUTS = {
    "no text column": (lambda p: write_rows(p / "bad.csv", [{"task": "sentiment", "body": "x"}] * 2),
                       "bad.csv has no text column 'text' (columns: task, body)", True),
    "no task column": (lambda p: write_rows(p / "bad.csv", [{"text": "x"}]),
                       "bad.csv has no task column 'task' (columns: text)", False),
    "a pair column missing": (lambda p: write_rows(p / "bad.csv", [{"task": "sentiment", "text": "x"},
                                                                    {"task": "similarity", "text": "y"}]),
                              "bad.csv row 2, no column 'sentence1', which task 'similarity' reads", False),
    "unknown task": (lambda p: _jsonl(p, [GOOD, GOOD, {**GOOD, "task": "nli"}]),
                     "bad.jsonl row 3, column 'task': unknown task 'nli' (tasks: sentiment, similarity)", False),
    "empty text": (lambda p: write_rows(p / "bad.csv", [GOOD, {**GOOD, "text": ""}]),
                   "bad.csv row 2, column 'text': empty or blank text", False),
    "blank pair": (lambda p: write_rows(p / "bad.parquet", [{**GOOD, "task": "similarity", "sentence1": " ",
                                                              "sentence2": "\t"}]),
                   "bad.parquet row 1, column 'sentence1', 'sentence2': empty or blank text", False),
    "null text": (lambda p: _jsonl(p, [GOOD, {**GOOD, "text": None}]),
                  "bad.jsonl row 2, column 'text': no text (null)", False),
    "an object as text": (lambda p: _jsonl(p, [GOOD, {**GOOD, "text": {"a": 1}}]),
                          "bad.jsonl row 2, column 'text': an object where a text belongs", False),
    "a list as text": (lambda p: _jsonl(p, [{**GOOD, "text": ["a"]}]),
                       "bad.jsonl row 1, column 'text': a list where a text belongs", False),
    "unreadable": (lambda p: (p / "bad.jsonl").write_text("{not json\n") and str(p / "bad.jsonl"),
                   "bad.jsonl row 1: not valid JSON", False),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_bad_input_is_one_line_naming_file_row_and_column(prompts, tmp_path, capsys, case):
    make, message, one_task = BAD_INPUTS[case]
    source = make(tmp_path)
    checkpoints = [f"sentiment={prompts['sentiment'][0]}"] if one_task else checkpoint_args(prompts)
    code, _, err = run(["predict", *checkpoints, "--input", source, "--output", tmp_path / "out.jsonl",
                        "--no-progress"], capsys)
    _assert_clean_error(code, err, message)
    assert not (tmp_path / "out.jsonl").exists()  # refused before anything was written


@pytest.mark.parametrize("args,message", [
    (["--input", "in.csv"], "--input and --output go together"),
    (["--input", "in.csv", "--output", "o.jsonl", "--generate"], "--input and --output go together"),
    (["--resume"], "--resume and --ray go with --input and --output"),
    (["--input", "in.csv", "--output", "o.jsonl", "--ray", "--resume"], "--resume runs without --ray"),
    (["--input", "in.csv", "--output", "o.csv"], "give a file ending in .jsonl or .parquet"),
    (["--input", "missing.csv", "--output", "o.jsonl"], "input missing.csv does not exist"),
    (["--input", "in.csv", "--output", "o.jsonl", "--chunk-size", "0"], "--chunk-size and --batch-size must be"),
])
def test_misused_options_are_one_line(prompts, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "in.csv", [{"text": "good"}])
    code, _, err = run(["predict", prompts["sentiment"][0], *args], capsys)
    _assert_clean_error(code, err, message)


def test_ray_missing_is_one_line(prompts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    source = write_rows(tmp_path / "in.csv", [{"text": "good"}])
    code, _, err = run(["predict", prompts["sentiment"][0], "--input", source, "--output", tmp_path / "o.jsonl",
                        "--ray"], capsys)
    _assert_clean_error(code, err, "Ray is not installed: pip install 'softprompt[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    """Two actors and Ray Data's own tasks: three logical CPUs (on however many cores)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_data_gives_what_one_process_gives(prompts, tmp_path, capsys, local_ray):
    rows = mixed_rows(3000, seed=7)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_rows(folder / f"part{i}.parquet", rows[i * 1000:(i + 1) * 1000])
    args = ["predict", *checkpoint_args(prompts), "--input", folder, "--chunk-size", "100", "--no-progress"]
    code, _, err = run(args + ["--output", tmp_path / "one.jsonl"], capsys)
    assert code == 0, err
    code, stdout, err = run(args + ["--output", tmp_path / "ray.jsonl", "--ray", "--concurrency", "2"], capsys)
    assert code == 0, err
    assert stdout.strip() == f"{tmp_path / 'ray.jsonl'}: 3000 rows answered"
    one = read_output(str(tmp_path / "one.jsonl"))
    assert_same_answers(read_output(str(tmp_path / "ray.jsonl")), one)

    csv_source = write_rows(tmp_path / "in.csv", rows[:300])  # CSV, Parquet out, through the Python API
    predict_files_ray(prompts, csv_source, tmp_path / "ray.parquet", chunk_size=64, progress=False)
    assert_same_answers(read_output(str(tmp_path / "ray.parquet")), one[:300])

    dataset = local_ray.data.from_items(rows[:200])  # a map_batches of one's own, on pandas batches
    answered = dataset.map_batches(SoftpromptPredictor, fn_constructor_kwargs={"checkpoints": prompts},
                                   concurrency=2, num_gpus=0, batch_format="pandas", batch_size=50).take_all()
    by_id = {r["id"]: r for r in one[:200]}
    assert len(answered) == 200
    for row in answered:
        want = by_id[row["id"]]
        if "value" in want:
            assert row["value"] == pytest.approx(want["value"], abs=1e-5)
        else:
            assert row["label"] == want["label"] and row["vote"] == want["vote"]
            assert row["scores"] == pytest.approx(want["scores"], abs=1e-5)
    capsys.readouterr()  # Ray's word on `concurrency` (deprecated since 2.51 for compute=ActorPoolStrategy)

    code, _, err = run(["predict", *checkpoint_args(prompts), "--input", write_rows(tmp_path / "bad.csv", [{"x": 1}]),
                        "--output", tmp_path / "bad.jsonl", "--ray"], capsys)
    _assert_clean_error(code, err, "bad.csv has no task column 'task' (columns: x)")
    code, _, err = run(args + ["--output", tmp_path / "more.jsonl", "--ray", "--concurrency", "3"], capsys)
    _assert_clean_error(code, err, "the Ray cluster has 3 CPUs; 3 actors need 4 (one each, and one for reading)")
