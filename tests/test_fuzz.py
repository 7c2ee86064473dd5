"""Seeded fuzzing of the data readers and the CLI's arguments: whatever comes in, no traceback ever; a failure
is a SoftpromptError (one `error:` line from the CLI) or click's usage message, with exit code 2."""
from __future__ import annotations

import random

import pytest

from softprompt import SoftpromptError
from softprompt.cli import main
from softprompt.data import load_data

VALID = {
    ".csv": 'text,label\n"a good, fine film",positive\nbad one,negative\n' * 8,
    ".tsv": "text\tlabel\ngood film\t1\nbad film\t0\n" * 8,
    ".jsonl": '{"text": "good film", "label": "pos"}\n{"text": "bad", "label": "neg"}\n' * 8,
}
PIECES = ['"', "'", ",", "\t", "\n", "\r", "\x00", "\ufeff", "{", "}", "[", "]", ":", "\\", "label", "text", "é",
          "\xff", " ", "null", "1", "-1", "1e400", "NaN"]


def _mutate(rng: random.Random, text: str) -> bytes:
    data = list(text)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.random(), rng.randint(0, len(data))
        if op < 0.4:
            data[at:at] = list(rng.choice(PIECES))
        elif op < 0.7 and data:
            del data[at:at + rng.randint(1, 8)]
        elif op < 0.8:
            data = data[:max(at, len(data) - 40)]  # cut short
        else:
            data[at:at] = [chr(rng.randint(0, 0x2FF))]
    raw = "".join(data).encode("utf-8", "surrogatepass")
    return raw.replace(b"\xc3\xbf", b"\xff") if rng.random() < 0.2 else raw  # sometimes not UTF-8 at all


@pytest.mark.parametrize("suffix", list(VALID))
def test_broken_files_never_raise_anything_but_a_softprompt_error(tmp_path, suffix):
    rng = random.Random(f"fuzz{suffix}")
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(150):
        path = tmp_path / f"f{i}{suffix}"
        path.write_bytes(_mutate(rng, VALID[suffix]))
        try:
            splits = load_data(str(path))
            assert splits.train and splits.dev
            outcomes["loaded"] += 1
        except SoftpromptError as err:
            assert str(err) and "\n" not in str(err)
            outcomes["refused"] += 1
    assert outcomes["loaded"] and outcomes["refused"], outcomes  # the generator reached both sides


OPTIONS = ["--prompt-length", "--lr", "--max-steps", "--max-time", "--epochs", "--batch-size", "--loss", "--init",
           "--pooling", "--task", "--task-type", "--template", "--verbalizer", "--warmup", "--schedule", "--bf16",
           "--fp32", "--head-init", "--class-weights", "--save-every", "--on-nan", "--report-to", "--bogus", "-x"]
VALUES = ["0", "-1", "3", "1e9", "nan", "abc", "", "{text}", "{nope}", "sst2", "CAUSAL_LM", "SEQ_CLS", "rank",
          "mean", "wandb,nope", "text", "0.99", "1.5", "skip", "--"]


def test_random_arguments_never_end_in_a_traceback(tmp_path, capsys):
    rng = random.Random(7)
    for _ in range(120):
        argv = [rng.choice(["train", "eval", "predict", "info", "inspect", "sweep", "report", "nope"])]
        for _ in range(rng.randint(0, 5)):
            argv.append(rng.choice(OPTIONS))
            if rng.random() < 0.8:
                argv.append(rng.choice(VALUES))
        if argv[0] in ("train", "sweep"):  # never reaches a real model or writes outside tmp_path
            argv += ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "none.csv"),
                     "--output", str(tmp_path / "out")]
        code = main(argv)
        out, err = capsys.readouterr()
        assert "Traceback" not in err + out, argv
        if code == 0:  # a valid command (`info`, `--help`) that did its job
            assert not err.strip(), (argv, err)
            continue
        assert code == 2, (argv, code, err)
        lines = err.strip().splitlines()
        assert (len(lines) == 1 and lines[0].startswith("error: ")) or "Error:" in err or "Usage:" in err + out, (
            argv, err)
