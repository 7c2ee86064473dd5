"""Data sources: embedded default, files, GLUE folders (real data when present), the hub via a local stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from softprompt import SoftpromptError
from softprompt.data import load_data, parse_hub_name

from .conftest import GLUE_DIR

needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"real GLUE data not found at {GLUE_DIR}")


def test_rotten_tomatoes_split_is_fixed_and_disjoint():
    a, b = load_data("rotten_tomatoes"), load_data("rotten_tomatoes")
    assert [e.fields for e in a.test[:20]] == [e.fields for e in b.test[:20]]
    sizes = len(a.train), len(a.dev), len(a.test)
    total = sum(sizes)
    assert total > 12_000
    assert [round(n / total, 2) for n in sizes] == [0.85, 0.05, 0.10]  # the documented 85/5/10 split
    texts = [{e.fields["text"] for e in s} for s in (a.train, a.dev, a.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert {e.label for e in a.train} == {0, 1}


@needs_glue
@pytest.mark.parametrize("task,train,dev", [("cola", 8551, 1043), ("sst2", 67349, 872), ("mrpc", 3667, 408),
                                            ("rte", 2490, 277), ("stsb", 5749, 1500), ("wnli", 635, 71)])
def test_real_glue_folders(task, train, dev):
    splits = load_data(str(GLUE_DIR), task)
    assert (len(splits.train), len(splits.dev)) == (train, dev)
    assert splits.test and not splits.labelled("test")  # GLUE test files carry no labels
    if task == "stsb":
        assert all(isinstance(e.label, float) for e in splits.dev)
    else:
        assert {e.label for e in splits.dev} == set(range(len(splits.task.labels)))


@needs_glue
def test_rte_string_labels_map_to_hub_indices():
    splits = load_data(str(GLUE_DIR / "RTE"), "rte")
    first = splits.train[0]  # "No Weapons of Mass Destruction Found in Iraq Yet." -> not_entailment
    assert splits.task.labels[first.label] == "not_entailment"


def test_csv_with_column_options(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["body,stars"] + [f"review number {i},{'good' if i % 2 else 'bad'}" for i in range(50)]
    path.write_text("\n".join(rows))
    splits = load_data(str(path), text_columns=["body"], label_column="stars")
    assert splits.task.labels == ("bad", "good")
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (40, 5, 5)
    assert all(e.label == (1 if int(e.fields["body"].split()[-1]) % 2 else 0) for e in splits.train)


def test_jsonl_folder_with_builtin_task(tmp_path):
    for split in ("train", "dev"):
        lines = [json.dumps({"sentence": f"s{i}", "label": i % 2}) for i in range(6)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines))
    splits = load_data(str(tmp_path), "sst2")
    assert len(splits.train) == 6 and splits.test == []


def test_missing_columns_say_which(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("body,label\nhello,1\nbye,0\n")
    with pytest.raises(SoftpromptError, match="no text column 'text'.*--text-column"):
        load_data(str(path))


def test_dev_labels_unknown_to_train(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,pos\nb,neg\nc,pos\n")
    (tmp_path / "dev.csv").write_text("text,label\nd,neutral\n")
    with pytest.raises(SoftpromptError, match="dev label 'neutral' never occurs in train"):
        load_data(str(tmp_path))


def test_empty_dataset(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n")
    (tmp_path / "dev.csv").write_text("text,label\n")
    with pytest.raises(SoftpromptError, match="no rows"):
        load_data(str(tmp_path))


def test_hub_names():
    assert parse_hub_name("glue/sst2") == ("nyu-mll/glue", "sst2")
    assert parse_hub_name("super_glue/boolq") == ("aps/super_glue", "boolq")
    assert parse_hub_name("stanfordnlp/imdb") == ("stanfordnlp/imdb", None)
    assert parse_hub_name("user/data:cfg") == ("user/data", "cfg")


def test_hub_loading_with_a_local_stand_in(tmp_path):
    """A folder in the hub's repository layout (parquet per config, README configs) goes through `datasets`."""
    import datasets

    repo = tmp_path / "glue"
    for split, n in (("train", 8), ("validation", 4), ("test", 3)):
        rows = {"sentence": [f"{split} {i}" for i in range(n)],
                "label": [-1] * n if split == "test" else [i % 2 for i in range(n)]}
        (repo / "sst2").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows).to_parquet(str(repo / "sst2" / f"{split}-00000-of-00001.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: sst2\n  data_files:\n"
        "  - split: train\n    path: sst2/train-*\n  - split: validation\n    path: sst2/validation-*\n"
        "  - split: test\n    path: sst2/test-*\n---\n")
    splits = load_data(f"{repo}:sst2", "sst2")
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (8, 4, 3)
    assert splits.labelled("dev") and not splits.labelled("test")
    assert splits.train[1].fields == {"sentence": "train 1"} and splits.train[1].label == 1


@pytest.mark.slow
def test_offline_hub_failure_is_one_clear_error():
    code = "from softprompt.data import load_data; load_data('nobody-here/no-such-dataset', 'sst2')"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # read at import: a fresh process
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "SoftpromptError: cannot load dataset 'nobody-here/no-such-dataset' from the hub" in proc.stderr
