"""Nothing lost: bad input says what is wrong in one line (exit code 2, nothing half-written), a killed run
resumes to the same prompt, a non-finite loss never reaches a checkpoint, a failed save keeps the last one."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from softprompt import SoftpromptError, TrainConfig, get_task
from softprompt.assets import load_config
from softprompt.encoding import TaskEncoder
from softprompt.data import Example
from softprompt.config import TaskType

from .test_cli import TRAIN, _assert_clean_error, run


def _train(tiny_dirs, data, out, capsys, *extra, model="bert"):
    return run(TRAIN + ["--model", tiny_dirs[model], "--data", data, "--output", out, "--no-baselines", *extra],
               capsys)


@pytest.mark.parametrize("content, message", [
    (b"text,label\n\xff\xfe bad,1\nok,0\n", "is not UTF-8 text"),
    (b'text,label\n"unclosed,1\nok,0\n', "is not well-formed CSV"),
    (b"text,label\nonly one,1\n", "has 1 data row(s)"),
    (b"text,label\n" + b"".join(b"row %d,same\n" % i for i in range(30)), "a classifier needs at least 2 labels"),
    (b"text,label\n" + b"".join(b"  ,%d\n" % (i % 2) for i in range(30)), "no training examples (with text)"),
])
def test_bad_files_say_what_is_wrong(tiny_dirs, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    code, _, err = _train(tiny_dirs, bad, tmp_path / "o", capsys)
    _assert_clean_error(code, err, message, tmp_path / "o")


def test_a_missing_data_file_is_named(tiny_dirs, tmp_path, capsys):
    code, _, err = _train(tiny_dirs, tmp_path / "no" / "such" / "file.csv", tmp_path / "o", capsys)
    _assert_clean_error(code, err, "does not exist", tmp_path / "o")


def test_test_labels_unknown_to_train_and_one_label_with_a_known_task(tiny_dirs, tmp_path, capsys):
    (tmp_path / "train.csv").write_text("text,label\na,pos\nb,neg\n")
    (tmp_path / "dev.csv").write_text("text,label\nc,pos\n")
    (tmp_path / "test.csv").write_text("text,label\nd,neutral\n")
    code, _, err = _train(tiny_dirs, tmp_path, tmp_path / "o", capsys)
    _assert_clean_error(code, err, "test label 'neutral' never occurs in train", tmp_path / "o")
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    (sst2 / "train.tsv").write_text("sentence\tlabel\na\t1\nb\t1\n")
    (sst2 / "dev.tsv").write_text("sentence\tlabel\nc\t1\n")
    code, _, err = _train(tiny_dirs, sst2, tmp_path / "o", capsys, "--task", "sst2")
    _assert_clean_error(code, err, "holds one label only (positive)", tmp_path / "o")


def test_empty_texts_are_dropped_with_a_count(tiny_dirs, tiny_csv, tmp_path, capsys):
    data = tmp_path / "some-empty.csv"
    data.write_text(open(tiny_csv).read() + "\n" + "\n".join(f"  ,{lab}" for lab in ("positive", "negative") * 5))
    code, out, err = _train(tiny_dirs, data, tmp_path / "r", capsys)
    assert code == 0, err
    assert "dropped 10 example(s) whose text is empty" in out


def test_long_inputs_are_cut_but_never_the_template_or_label_slot(tokenizer, tiny_dirs, tiny_csv, tmp_path, capsys):
    task = get_task("rotten_tomatoes")
    encoder = TaskEncoder(tokenizer, task, TaskType.CAUSAL_LM, 24)
    tail = tokenizer(task.render({"text": ""}))["input_ids"][-6:]  # the template's end, before the label
    feature = encoder.encode(Example({"text": "a very long review " * 40}, 1))
    assert len(feature.input_ids) + len(feature.target) <= 24 and feature.input_ids[-6:] == tail
    assert feature.target == encoder.label_ids[1] and encoder.truncated == 1
    data = tmp_path / "long.csv"
    data.write_text(open(tiny_csv).read() + "\n" + "\n".join(f"{'word ' * 60},positive" for _ in range(3)))
    code, out, err = _train(tiny_dirs, data, tmp_path / "r", capsys, model="llama")
    assert code == 0, err
    assert "input(s) longer than --max-length 24 were cut to fit" in out


def test_prompt_and_input_beyond_the_model_positions(tiny_dirs, tiny_csv, tmp_path, capsys):
    code, _, err = _train(tiny_dirs, tiny_csv, tmp_path / "o", capsys, "--prompt-length", "125")  # 128 positions
    _assert_clean_error(code, err, "leaves no room for text", tmp_path / "o")


def test_a_task_type_the_model_cannot_do_and_a_damaged_checkpoint(tiny_dirs, tiny_csv, tmp_path, capsys):
    code, _, err = _train(tiny_dirs, tiny_csv, tmp_path / "o", capsys, "--task-type", "CAUSAL_LM")
    _assert_clean_error(code, err, "supports task type SEQ_CLS, not CAUSAL_LM", tmp_path / "o")
    assert _train(tiny_dirs, tiny_csv, tmp_path / "r", capsys)[0] == 0
    tensors = tmp_path / "r" / "best" / "prompt.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-10])
    code, _, err = run(["eval", tmp_path / "r" / "best"], capsys)
    _assert_clean_error(code, err, "does not match its checksum")


def test_resume_without_a_run(tmp_path, capsys):
    code, _, err = run(["train", "--resume", tmp_path / "empty"], capsys)
    _assert_clean_error(code, err, "nothing to resume")


def test_usage_errors_are_one_message_and_exit_code_2(capsys):
    for argv in (["train", "--bogus-flag"], ["info", "a", "b"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "Traceback" not in err
        assert "No such option: --bogus-flag" in err or "unexpected extra argument" in err


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tiny_dirs, tiny_csv, tmp_path, capsys, monkeypatch):
    import softprompt.checkpoint as checkpoint

    real, calls = checkpoint.save_file, {"n": 0}

    def fills_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # last/ (2 files) and best/ (1) at step 2; last/ at step 4 meets a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    out = tmp_path / "r"
    code, _, err = _train(tiny_dirs, tiny_csv, out, capsys, "--save-every", "2", "--lr", "0.3")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: cannot write checkpoint")
    assert "No space left on device" in err and "intact" in err
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert checkpoint.read_checkpoint(out / "best").step == 2
    assert checkpoint.read_trainer_state(out / "last").counters["step"] == 2  # the one written before, intact
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no half-written folder left
    code, _, err = run(["eval", out / "best", "--split", "dev"], capsys)
    assert code == 0, err


def test_a_non_finite_loss_stops_or_is_skipped_and_never_saved(tiny_dirs, tiny_csv, tmp_path, capsys, monkeypatch):
    import softprompt.training as training

    real = training.Trainer.loss

    def poisoned(self, features):
        loss = real(self, features)
        return loss * float("nan") if self.state["step"] == 2 else loss  # the third step's loss

    monkeypatch.setattr(training.Trainer, "loss", poisoned)
    code, _, err = _train(tiny_dirs, tiny_csv, tmp_path / "stop", capsys)
    _assert_clean_error(code, err, "not finite at step 3")
    last = tmp_path / "stop" / "last"
    state = json.loads((last / "trainer_state.json").read_text())["counters"]
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "prompt.safetensors")).values())
    code, out, err = _train(tiny_dirs, tiny_csv, tmp_path / "skip", capsys, "--on-nan", "skip")
    assert code == 0, err
    assert "step 3: loss or gradient not finite, step skipped (1 so far)" in out
    assert json.loads((tmp_path / "skip" / "results.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_prompt_of_an_uninterrupted_one(tiny_dirs, tiny_csv, tmp_path):
    args = ["--model", tiny_dirs["bert"], "--data", tiny_csv, "--max-steps", "120", "--eval-every", "1000",
            "--batch-size", "8", "--prompt-length", "3", "--max-length", "24", "--no-progress", "--no-baselines",
            "--save-every", "5", "--residual-reparam", "4"]
    command = [sys.executable, "-m", "softprompt", "train", *args]
    full = subprocess.run(command + ["--output", str(tmp_path / "full")], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert full.returncode == 0, full.stderr
    part = tmp_path / "part"
    proc = subprocess.Popen(command + ["--output", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    state = part / "last" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["counters"]["step"] >= 20:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = json.loads(state.read_text())["counters"]["step"]
    assert 20 <= killed_at < 120
    resumed = subprocess.run([sys.executable, "-m", "softprompt", "train", "--resume", str(part),
                              "--no-progress"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {part / 'last'} at step {killed_at}" in resumed.stdout
    want = load_file(str(tmp_path / "full" / "last" / "prompt.safetensors"))
    got = load_file(str(part / "last" / "prompt.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 121))  # what the killed run logged after its last save is not doubled


@pytest.mark.slow
def test_predict_reads_arguments_then_stdin(tiny_dirs, tiny_csv, tmp_path, capsys):
    assert _train(tiny_dirs, tiny_csv, tmp_path / "r", capsys)[0] == 0
    proc = subprocess.run([sys.executable, "-m", "softprompt", "predict", str(tmp_path / "r" / "best"), "first one"],
                          input="second one\nthird one\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["text"] for line in proc.stdout.splitlines()] == ["first one", "second one", "third one"]


def test_an_unreachable_hub_fails_before_any_retry(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(SoftpromptError, match="reachable now .no network to 127.0.0.1"):
        load_config("no-such-org/no-such-model")
    with pytest.raises(SoftpromptError, match="HF_HUB_OFFLINE"):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        load_config("no-such-org/no-such-model")


def test_train_config_refuses_bad_fault_options():
    with pytest.raises(SoftpromptError, match="--on-nan must be stop or skip"):
        TrainConfig(on_nan="ignore")
    with pytest.raises(SoftpromptError, match="--save-every must be > 0"):
        TrainConfig(save_every=0)


def test_remote_code_runs_only_when_the_user_asks(tiny_dirs, tmp_path, monkeypatch):
    import transformers

    from softprompt import PromptedTask, describe_model, resolve

    seen = []
    real = transformers.AutoConfig.from_pretrained.__func__
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(
        lambda cls, *a, **kw: seen.append(kw.get("trust_remote_code")) or real(cls, *a, **kw)))
    model = describe_model(tiny_dirs["bert"])
    assert seen == [False] and model.trust_remote_code is False
    spec = resolve(TrainConfig(model=tiny_dirs["bert"], prompt_length=2, trust_remote_code=True),
                   describe_model(tiny_dirs["bert"], trust_remote_code=True), get_task("sst2"))
    assert seen == [False, True] and spec.trust_remote_code
    PromptedTask.build(spec).save_pretrained(tmp_path / "c")
    with pytest.raises(SoftpromptError, match="pass --trust-remote-code"):
        PromptedTask.from_pretrained(tmp_path / "c")
    assert PromptedTask.from_pretrained(tmp_path / "c", trust_remote_code=True).spec.trust_remote_code
