"""The CLI end to end on tiny models and tiny data, and every bad input as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softprompt.cli import main

TRAIN = ["train", "--max-steps", "4", "--eval-every", "2", "--batch-size", "8", "--prompt-length", "3",
         "--no-progress", "--max-length", "24"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_predict_info(tiny_dirs, tiny_csv, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(TRAIN + ["--model", tiny_dirs["llama"], "--data", tiny_csv, "--output", out_dir], capsys)
    assert code == 0, err
    assert "checkpoint: " + str(out_dir / "best") in out
    assert "baseline majority" in out and "baseline untrained_prompt" in out and "test  accuracy=" in out
    assert (out_dir / "best" / "prompt.safetensors").is_file() and (out_dir / "last" / "trainer_state.json").is_file()
    logged = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    assert {r["step"] for r in logged if "dev_accuracy" in r} == {2, 4}

    code, out, err = run(["eval", out_dir / "best", "--split", "dev"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 8 and 0 <= result["accuracy"] <= 1

    code, out, err = run(["predict", out_dir / "best", "the film was good", "the film was bad"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["text"] for line in lines] == ["the film was good", "the film was bad"]
    for line in lines:
        assert line["label"] in ("negative", "positive")
        assert sum(line["scores"].values()) == pytest.approx(1, abs=1e-4)

    code, out, _ = run(["info", out_dir / "best"], capsys)
    assert code == 0 and json.loads(out)["prompt"]["num_virtual_tokens"] == 3


def test_regression_task_with_adafactor_accumulation_bf16_and_early_stopping(tiny_dirs, tmp_path, capsys):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n in (("train", 24), ("dev", 8)):
        rows = [f"{i}\tg\tf\ty\t{i}\ts\ts\ta cat sat number {i}\ta cat sits {i % 3}\t{i % 6}.0" for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join([header] + rows))
    argv = ["train", "--model", tiny_dirs["bert"], "--data", tmp_path, "--task", "stsb", "--optimizer", "adafactor",
            "--grad-accum", "2", "--bf16", "--max-steps", "6", "--eval-every", "1", "--patience", "1",
            "--batch-size", "4", "--no-progress", "--no-baselines", "--output", tmp_path / "run"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "pearson=" in out and "spearman=" in out
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "dev_pearson" in r]
    best = max(r["dev_pearson"] for r in evals)
    # patience 1: training stops at the first evaluation that does not improve on the best so far
    scores = [r["dev_pearson"] for r in evals]
    assert all(b > a for a, b in zip(scores[:-2], scores[1:-1]))  # every eval but the last improved
    assert len(evals) == 6 or scores[-1] <= max(scores[:-1])
    assert json.loads((tmp_path / "run" / "best" / "softprompt.json").read_text())["metrics"]["dev"]["pearson"] == best
    code, out, err = run(["predict", tmp_path / "run" / "best", "a cat\ta dog"], capsys)
    assert code == 0, err
    assert isinstance(json.loads(out)["value"], float)


@pytest.mark.parametrize("model,extra", [("t5", ["--task-type", "SEQ_2_SEQ_LM"]), ("llama", ["--loss", "lm"])])
def test_text_to_text_variants_train_end_to_end(tiny_dirs, tiny_csv, tmp_path, capsys, model, extra):
    code, out, err = run(TRAIN + ["--model", tiny_dirs[model], "--data", tiny_csv, "--output", tmp_path / "r",
                                  "--no-baselines"] + extra, capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "r" / "best" / "softprompt.json").read_text())
    assert meta["family"] == ("seq2seq" if model == "t5" else "decoder")
    code, out, err = run(["predict", tmp_path / "r" / "best", "the film was good"], capsys)
    assert code == 0, err
    assert json.loads(out)["label"] in ("negative", "positive")
    code, out, err = run(["predict", tmp_path / "r" / "best", "the film was good", "--generate",
                          "--max-new-tokens", "3"], capsys)
    if model == "t5":
        _assert_clean_error(code, err, "generation needs a decoder checkpoint")
    else:
        assert code == 0, err
        assert isinstance(json.loads(out)["generated"], str)


@pytest.mark.slow
def test_predict_reads_stdin_through_the_console_script(tiny_dirs, tiny_csv, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert run(TRAIN + ["--model", tiny_dirs["bert"], "--data", tiny_csv, "--output", out_dir], capsys)[0] == 0
    proc = subprocess.run([sys.executable, "-m", "softprompt", "predict", str(out_dir / "best")],
                          input="a good one\na bad one\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and "label" in json.loads(proc.stdout.splitlines()[0])


def test_same_seed_same_run(tiny_dirs, tiny_csv, tmp_path, capsys):
    losses = []
    for name in ("a", "b"):
        assert run(TRAIN + ["--model", tiny_dirs["bert"], "--data", tiny_csv, "--output", tmp_path / name,
                            "--no-baselines"], capsys)[0] == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(x).get("loss") for x in lines])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("reparam", [["--residual-reparam", "0"], ["--residual-reparam", "4"]])
def test_ctrl_c_saves_and_resume_repeats_the_run_exactly(tiny_dirs, tiny_csv, tmp_path, capsys, monkeypatch,
                                                         reparam):
    import softprompt.training as training
    from safetensors.torch import load_file

    common = TRAIN + ["--model", tiny_dirs["bert"], "--data", tiny_csv, "--no-baselines"] + reparam
    assert run(common + ["--output", tmp_path / "full"], capsys)[0] == 0

    calls = {"n": 0}
    real_clip = training.torch.nn.utils.clip_grad_norm_

    def interrupt_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # mid step 3: after its forward and backward, before the update
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(training.torch.nn.utils, "clip_grad_norm_", interrupt_on_third)
    code, _, err = run(common + ["--output", tmp_path / "part"], capsys)
    assert code == 130
    printed = err.split("Resume with: ", 1)[1].strip()
    assert printed == f"softprompt train --resume {tmp_path / 'part'}"
    assert json.loads((tmp_path / "part" / "last" / "trainer_state.json").read_text())["counters"]["step"] == 2
    monkeypatch.setattr(training.torch.nn.utils, "clip_grad_norm_", real_clip)

    code, _, err = run(printed.split()[1:] + ["--no-progress"], capsys)  # the command as printed
    assert code == 0, err
    full = load_file(str(tmp_path / "full" / "last" / "prompt.safetensors"))
    resumed = load_file(str(tmp_path / "part" / "last" / "prompt.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)


# -- bad input: one line on stderr, exit code 2, nothing half-written ----------------------------------------------
def _assert_clean_error(code, err, pattern, out_dir: Path | None = None):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    if out_dir is not None:
        assert not (out_dir / "best").exists() and not (out_dir / "last").exists()


@pytest.mark.slow
def test_unknown_model_offline(tiny_csv, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # read when huggingface_hub is imported: a fresh process
    proc = subprocess.run([sys.executable, "-m", "softprompt"] + TRAIN + ["--model", "no-such-org/no-such-model",
                                                                         "--data", tiny_csv, "--output", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    _assert_clean_error(proc.returncode, proc.stderr, "cannot load model 'no-such-org/no-such-model'", tmp_path)


def test_file_without_text_or_label_columns(tiny_dirs, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("review,stars\nok,1\nmeh,0\n")
    code, _, err = run(TRAIN + ["--model", tiny_dirs["bert"], "--data", bad, "--output", tmp_path / "o"], capsys)
    _assert_clean_error(code, err, "no text column", tmp_path / "o")
    code, _, err = run(TRAIN + ["--model", tiny_dirs["bert"], "--data", bad, "--text-column", "review",
                                "--output", tmp_path / "o"], capsys)
    _assert_clean_error(code, err, "no label column", tmp_path / "o")


def test_dev_labels_unknown_to_train(tiny_dirs, tmp_path, capsys):
    (tmp_path / "train.csv").write_text("text,label\na,pos\nb,neg\n")
    (tmp_path / "dev.csv").write_text("text,label\nc,neutral\n")
    code, _, err = run(TRAIN + ["--model", tiny_dirs["bert"], "--data", tmp_path, "--output", tmp_path / "o"], capsys)
    _assert_clean_error(code, err, "dev label 'neutral' never occurs in train", tmp_path / "o")


def test_empty_dataset(tiny_dirs, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run(TRAIN + ["--model", tiny_dirs["bert"], "--data", empty, "--output", tmp_path / "o"], capsys)
    _assert_clean_error(code, err, "has no rows", tmp_path / "o")


def test_checkpoint_for_another_base_model(tiny_dirs, tiny_csv, tmp_path, capsys):
    assert run(TRAIN + ["--model", tiny_dirs["llama"], "--data", tiny_csv, "--output", tmp_path / "r",
                        "--no-baselines"], capsys)[0] == 0
    code, _, err = run(["eval", tmp_path / "r" / "best", "--model", tiny_dirs["llama48"]], capsys)
    _assert_clean_error(code, err, "hidden_size 32 vs 48")
    code, _, err = run(TRAIN + ["--model", tiny_dirs["llama48"], "--data", tiny_csv, "--init-file",
                                tmp_path / "r" / "best", "--output", tmp_path / "o"], capsys)
    _assert_clean_error(code, err, "shape (3, 32)", tmp_path / "o")


@pytest.mark.parametrize("length", ["0", "-3"])
def test_prompt_length_must_be_positive(tiny_csv, tmp_path, capsys, length):
    argv = [a if a != "3" else length for a in TRAIN]
    code, _, err = run(argv + ["--data", tiny_csv, "--output", tmp_path / "o"], capsys)
    _assert_clean_error(code, err, "prompt length must be > 0")


def test_template_with_an_unknown_slot(tiny_dirs, tiny_csv, tmp_path, capsys):
    code, _, err = run(TRAIN + ["--model", tiny_dirs["llama"], "--data", tiny_csv, "--template", "{text} {mood}:",
                                "--output", tmp_path / "o"], capsys)
    _assert_clean_error(code, err, "does not fit fields text", tmp_path / "o")


def test_unwritable_output_folder(tiny_csv, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run(TRAIN + ["--data", tiny_csv, "--output", blocker / "run"], capsys)
    _assert_clean_error(code, err, "cannot write to output folder")


@pytest.mark.slow
def test_console_script_error_has_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "softprompt", "eval", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'} is not a softprompt checkpoint "
                                                "(no softprompt.json)"]


def test_baselines_name_the_split_they_were_scored_on(tiny_dirs, tmp_path, capsys):
    """GLUE-style data whose test split has no labels: baselines fall back to dev and say so."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"good {i}\t1\nbad {i}\t0\n" for i in range(8)))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood x\t1\nbad y\t0\n")
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tgood z\n")
    code, out, err = run(TRAIN + ["--model", tiny_dirs["bert"], "--data", tmp_path, "--task", "sst2",
                                  "--output", tmp_path / "r"], capsys)
    assert code == 0, err
    assert "baseline majority          dev" in out and "test  n/a (no test labels)" in out


def _reloads_with_pooling(out_dir: Path, pooling: str, capsys) -> None:
    """The checkpoint keeps its pooling, and scores dev as training did."""
    code, out, err = run(["info", out_dir / "best"], capsys)
    assert code == 0 and json.loads(out)["prompt"]["pooling"] == pooling
    code, out, err = run(["eval", out_dir / "best", "--split", "dev"], capsys)
    assert code == 0, err
    dev = json.loads((out_dir / "results.json").read_text())["dev"]
    assert json.loads(out)["accuracy"] == pytest.approx(dev["accuracy"], abs=1e-9)


def test_mean_pooling_is_kept_in_the_checkpoint(tiny_dirs, tiny_csv, tmp_path, capsys):
    """A head trained on mean-pooled states is scored the same way after reloading (same dev metrics)."""
    out_dir = tmp_path / "run"
    code, _, err = run(TRAIN + ["--model", tiny_dirs["bert"], "--data", tiny_csv, "--output", out_dir,
                                "--pooling", "mean", "--no-baselines"], capsys)
    assert code == 0, err
    _reloads_with_pooling(out_dir, "mean", capsys)
    code, _, err = run(TRAIN + ["--model", tiny_dirs["bert"], "--data", tiny_csv, "--output", tmp_path / "x",
                                "--pooling", "max"], capsys)
    assert code == 2 and "--pooling must be one of cls, mean, siamese, last_mean, not 'max'" in err
    code, _, err = run(TRAIN + ["--model", tiny_dirs["bert"], "--data", tiny_csv, "--output", tmp_path / "y",
                                "--pooling", "siamese"], capsys)
    assert code == 2 and "siamese pooling compares the two texts of a pair" in err and "1 input field" in err


def test_siamese_pooling_trains_evaluates_and_predicts_pairs(tiny_dirs, tmp_path, capsys):
    """Pairs encoded apart: trained, reloaded (the wider head included) and scored the same, predicted from
    tab-separated text."""
    folder = tmp_path / "RTE"
    folder.mkdir()
    for split, n in (("train", 32), ("dev", 12)):
        rows = [f"{i}\tthe cat sat on mat {i}\t{'the cat sat' if i % 2 else 'a dog ran'}\t"
                f"{'entailment' if i % 2 else 'not_entailment'}" for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join(["index\tsentence1\tsentence2\tlabel"] + rows))
    out_dir = tmp_path / "run"
    code, _, err = run(TRAIN + ["--model", tiny_dirs["bert"], "--data", folder, "--task", "rte", "--output", out_dir,
                                "--pooling", "siamese", "--no-baselines"], capsys)
    assert code == 0, err
    _reloads_with_pooling(out_dir, "siamese", capsys)
    code, out, err = run(["predict", out_dir / "best", "the cat sat on mat 3\tthe cat sat"], capsys)
    assert code == 0, err
    assert json.loads(out)["label"] in ("entailment", "not_entailment")
