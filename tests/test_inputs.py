"""Every input a user can send gets a real answer or one clear refusal: empty and blank inputs, inputs of
characters a tokenizer drops, fields that are not text, and no non-finite number in any answer; in the API, the
CLI and the data files (the server's side is in test_serve.py and test_invariance.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from softprompt import PromptedTask, SoftpromptError, TrainConfig, train
from softprompt.data import load_data
from softprompt.multitask import MultiTaskModel

from .conftest import labelled_csv
from .test_cli import _assert_clean_error, run

BLANKS = ["", " ", "\t\n"]


@pytest.fixture(scope="module")
def user_file_prompts(tiny_dirs, tmp_path_factory):
    """What `softprompt train --data my.csv` gives with every default on a model whose tokenizer adds no special
    tokens (as SmolLM2's): a decoder head over the last and mean states, for 2 and 20 classes; and a prompt of
    label words, trained in bf16, to serve beside them."""
    root = tmp_path_factory.mktemp("user_file")
    two = labelled_csv(root / "two.csv", [("the film was good", "yes", 30), ("the film was bad", "no", 30)])
    twenty = labelled_csv(root / "twenty.csv", [(f"topic {c} text", f"class{c}", 6) for c in range(20)])
    out = {}
    for name, data, extra in (("two", two, {}), ("twenty", twenty, {}),
                              ("words", two, {"task_type": "CAUSAL_LM", "bf16": True})):
        cfg = TrainConfig(model=tiny_dirs["llama_bpe"], data=data, max_steps=2, eval_every=100, progress=False,
                          output=str(root / name), **extra)
        out[name] = str(train(cfg, log=lambda *_: None).best_checkpoint)
    return out


def test_user_file_defaults_are_heads_over_last_and_mean_states(user_file_prompts):
    spec = PromptedTask.from_pretrained(user_file_prompts["twenty"]).spec
    assert (spec.task_type.value, spec.prompt.pooling, len(spec.task.labels)) == ("SEQ_CLS", "last_mean", 20)


@pytest.mark.parametrize("name", ["two", "twenty", "words"])
@pytest.mark.parametrize("blank", BLANKS)
def test_empty_and_blank_inputs_are_refused_by_position_in_the_api(user_file_prompts, name, blank):
    task = PromptedTask.from_pretrained(user_file_prompts[name])
    with pytest.raises(SoftpromptError, match=r"^input 1: empty or blank input; give it some text$"):
        task.predict(["a fine film", blank, "another"])
    model = MultiTaskModel.from_pretrained({name: user_file_prompts[name]})
    with pytest.raises(SoftpromptError, match=r"^input 2: empty or blank input"):
        model.predict([(name, "one"), (name, "two"), (name, blank)])
    answer = task.predict(["a fine film"])[0]  # the others are answered, with finite probabilities summing to 1
    assert all(math.isfinite(p) for p in answer["scores"].values())
    assert sum(answer["scores"].values()) == pytest.approx(1, abs=1e-4)


def test_the_cli_refuses_an_empty_argument_and_a_blank_line_by_position(user_file_prompts, tmp_path, capsys):
    checkpoint = user_file_prompts["two"]
    code, _, err = run(["predict", checkpoint, "good", ""], capsys)
    _assert_clean_error(code, err, "input 1: empty or blank input")
    lines = tmp_path / "lines.txt"
    lines.write_text("good\nbad\n\nfine\n")
    code, _, err = run(["predict", checkpoint, "--file", lines], capsys)
    _assert_clean_error(code, err, "input 2: empty or blank input")
    code, out, _ = run(["predict", checkpoint, "good", "bad"], capsys)  # otherwise one line per input, in order
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == ["good", "bad"]


def test_a_non_finite_score_becomes_an_error_naming_the_input(user_file_prompts, monkeypatch):
    task = PromptedTask.from_pretrained(user_file_prompts["two"])
    head = task.model.head

    calls = []

    def poisoned(module, args, output):  # the head gives NaN from its second call on
        calls.append(1)
        return output * float("nan") if len(calls) >= 2 else output

    head.register_forward_hook(poisoned)
    with pytest.raises(SoftpromptError, match=r"^input 1: the model's scores are not finite"):
        task.predict(["good", "good", "good"], batch_size=1)  # one length: scored in order, one a batch
    with pytest.raises(SoftpromptError, match="not finite"):
        task.evaluate(load_data(task.spec.data, task.task).dev[:4], batch_size=4)


def test_inputs_that_are_not_text_are_refused_in_the_api(user_file_prompts):
    task = PromptedTask.from_pretrained(user_file_prompts["two"])
    for given, says in ((["ok", {"text": {"nested": "x"}}], "input 1: field 'text' holds {'nested': 'x'}"),
                        (["ok", {"text": ["a", "b"]}], "input 1: field 'text' holds ['a', 'b']"),
                        ([{"text": None}], "input 0: field 'text' holds None"),
                        ([3.5], "input 0: an input is a text or an object")):
        with pytest.raises(SoftpromptError, match=f"^{says}".replace("[", r"\[").replace("{", r"\{")):
            task.predict(given)
    assert task.predict([{"text": 42}])[0]["label"] in ("no", "yes")  # a number reads as its digits


@pytest.mark.parametrize("row, says", [
    ('{"text": {"nested": "x"}, "label": "a"}', "row 3, column 'text': an object where a text or number belongs"),
    ('{"text": ["x", "y"], "label": "a"}', "row 3, column 'text': a list where a text or number belongs"),
    ('{"text": true, "label": "a"}', "row 3, column 'text': a boolean where a text or number belongs"),
    ('{"text": "fine", "label": {"name": "a"}}', "row 3, column 'label': an object where a text or number belongs"),
])
def test_a_data_field_that_is_not_text_names_the_file_row_and_column(tiny_dirs, tmp_path, capsys, row, says):
    rows = [json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) for i in range(40)]
    rows[2] = row
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows))
    code, _, err = run(["train", "--model", tiny_dirs["llama"], "--data", data, "--output", tmp_path / "o",
                        "--max-steps", "1", "--no-progress"], capsys)
    _assert_clean_error(code, err, f"{data} {says}", tmp_path / "o")


def test_a_boolean_label_reads_as_its_class(tiny_dirs, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"text {i}", "label": i % 2 == 0}) for i in range(40)))
    assert load_data(str(data)).task.labels == ("False", "True")


def test_a_prompt_trained_in_bf16_serves_in_bf16_beside_fp32_ones(user_file_prompts, capsys):
    model = MultiTaskModel.from_pretrained({"two": user_file_prompts["two"], "words": user_file_prompts["words"]})
    assert {name: info.precision for name, info in model.tasks().items()} == {"two": ("fp32",), "words": ("bf16",)}
    texts = ["a fine film", "the film was bad", "日本語 😀"]
    got = model.predict([("words", t) for t in texts] + [("two", t) for t in texts])
    for name, answers in (("words", got[:3]), ("two", got[3:])):
        alone = PromptedTask.from_pretrained(user_file_prompts[name]).predict(texts)
        for a, b in zip(answers, alone):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-2 if name == "words" else 1e-5)
    forced = MultiTaskModel.from_pretrained({"words": user_file_prompts["words"]}, dtype="fp32")
    assert forced.tasks()["words"].precision == ("fp32",)
    fp32_alone = PromptedTask.from_pretrained(user_file_prompts["words"], dtype="fp32").predict(texts)
    for a, b in zip(forced.predict([("words", t) for t in texts]), fp32_alone):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    code, out, _ = run(["info", user_file_prompts["words"]], capsys)
    assert code == 0 and json.loads(out)["precision"] == "bf16"
    with pytest.raises(SoftpromptError, match="--dtype must be bf16 or fp32"):
        MultiTaskModel.from_pretrained({"words": user_file_prompts["words"]}, dtype="fp16")
    assert torch.bfloat16 in {p.dtype for b in model.backbones.held.values() for p in b.parameters()}
