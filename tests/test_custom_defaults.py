"""Defaults for a user's own data (docs/recipe.md, "Custom data"): a decoder reads the labels with a head
unless the run asks for label words, whose prompt then starts from an instruction naming the labels; skewed
classes are weighted, the budget grows with the data within a time cap; built-in tasks keep theirs."""

import json

import pytest
import torch

from softprompt.assets import ModelInfo
from softprompt.checkpoint import read_checkpoint
from softprompt.cli import main
from softprompt import PromptTuningConfig, get_prompt_model
from softprompt.config import PromptInit, TaskType
from softprompt.errors import SoftpromptError
from softprompt.spec import CUSTOM_SECONDS, CUSTOM_STEPS, TrainConfig, resolve
from softprompt.tasks import TaskSpec, get_task, label_instruction
from softprompt.training import prepare

from .conftest import labelled_csv

DECODER, ENCODER = ModelInfo("d", "d", None, "decoder"), ModelInfo("e", "e", None, "encoder")


def _custom(*labels: str) -> TaskSpec:
    """The task a CSV infers (data._infer_task): no instruction, the labels as the file writes them."""
    return TaskSpec("custom", ("text",), labels, ("accuracy", "f1" if len(labels) == 2 else "macro_f1"))


def test_label_instruction_names_every_label():
    assert label_instruction(("ham", "spam")) == "Classify the text as ham or spam.\n\n"
    assert label_instruction(("a", "b_c", "d")) == "Classify the text as a, b c or d.\n\n"


def test_imbalanced_csv_is_weighted_read_by_a_head_and_budgeted_by_its_size():
    task, counts = _custom("ham", "spam"), [1800, 200]
    spec = resolve(TrainConfig(), DECODER, task, label_counts=counts)
    assert (spec.task_type, spec.head_init, spec.task.instruction) == (TaskType.SEQ_CLS, "fit", "")
    assert spec.class_weights == "balanced"
    assert (spec.max_steps, spec.max_time) == (125, CUSTOM_SECONDS)  # one epoch of 2,000 rows in batches of 16
    assert {"task_type", "class_weights", "max_steps", "max_time"} <= set(spec.decided)
    assert "custom-data" in spec.decided["max_steps"] and "custom-data" in spec.decided["task_type"]
    # the default's time cap binds on such data, so bf16 buys steps where it is fast, as under a user's --max-time
    fast = {f: resolve(TrainConfig(), DECODER, task, label_counts=counts, bf16_fast=f).bf16 for f in (True, False)}
    assert fast == {True: True, False: False}
    assert resolve(TrainConfig(max_steps=50), DECODER, task, label_counts=counts, bf16_fast=True).bf16 is False
    assert resolve(TrainConfig(), ENCODER, task, label_counts=counts, bf16_fast=True).bf16 is False


@pytest.mark.parametrize("asked", [{"task_type": "CAUSAL_LM"}, {"verbalizer": ["no", "yes"]}, {"loss": "rank"},
                                   {"loss": "lm"}])
def test_label_words_when_asked_start_from_an_instruction_naming_the_labels(asked):
    spec = resolve(TrainConfig(**asked), DECODER, _custom("ham", "spam"), label_counts=[1800, 200])
    assert spec.task_type is TaskType.CAUSAL_LM and spec.head_init is None
    assert spec.task.instruction == label_instruction(("ham", "spam"))
    assert (spec.prompt.init, spec.prompt.init_text) == (PromptInit.TEXT, spec.task.instruction)
    assert "custom-data" in spec.decided["instruction"]
    assert spec.class_weights == ("none" if asked.get("loss") == "lm" else "balanced")  # lm cannot be weighted


def test_many_class_csv_budget_and_weights():
    labels = tuple(f"topic {i}" for i in range(12))
    even = resolve(TrainConfig(), DECODER, _custom(*labels), label_counts=[500] * 12)
    assert even.class_weights == "none" and even.max_steps == 375  # 6,000 rows / 16
    huge = resolve(TrainConfig(batch_size=8), DECODER, _custom(*labels), label_counts=[5000] * 12)
    assert huge.max_steps == CUSTOM_STEPS[1]
    tiny = resolve(TrainConfig(), DECODER, _custom(*labels), label_counts=[3] * 11 + [2])
    assert tiny.max_steps == CUSTOM_STEPS[0]
    skewed = resolve(TrainConfig(), DECODER, _custom(*labels), label_counts=[300] + [99] * 11)
    assert skewed.class_weights == "balanced"  # 300 > 3 x 99
    assert resolve(TrainConfig(), DECODER, _custom(*labels), label_counts=[297] + [99] * 11).class_weights == "none"
    assert even.task_type is TaskType.SEQ_CLS and even.prompt.init_text is None  # heads take no instruction


def test_what_the_user_says_wins():
    task, counts = _custom("ham", "spam"), [900, 100]
    spec = resolve(TrainConfig(class_weights="none", max_steps=7, init="class_labels"), DECODER, task,
                   label_counts=counts)
    assert (spec.class_weights, spec.max_steps, spec.max_time, spec.task.instruction) == ("none", 7, None, "")
    assert spec.prompt.init is PromptInit.CLASS_LABELS
    assert resolve(TrainConfig(init_text="Spam filter."), DECODER, task, label_counts=counts).prompt.init_text == \
        "Spam filter."
    assert resolve(TrainConfig(max_time=30), DECODER, task, label_counts=counts).max_steps is None
    assert resolve(TrainConfig(loss="lm"), DECODER, task, label_counts=counts).class_weights == "none"


def test_an_encoder_head_is_weighted_but_takes_no_instruction():
    spec = resolve(TrainConfig(), ENCODER, _custom("ham", "spam"), label_counts=[900, 100])
    assert spec.class_weights == "balanced" and spec.task.instruction == ""
    assert spec.prompt.init is PromptInit.VOCAB


@pytest.mark.parametrize("name, counts", [("sst2", [29780, 37569]), ("mrpc", [1194, 2474]), ("rte", [1241, 1249])])
def test_glue_tasks_keep_their_defaults(name, counts):
    task = get_task(name)
    spec = resolve(TrainConfig(), DECODER, task, label_counts=counts)  # GLUE's own training label counts
    assert spec.class_weights == "none" and (spec.max_steps, spec.max_time) == (80, None)
    assert spec.task.instruction == task.instruction and spec.prompt.init_text == task.instruction
    assert resolve(TrainConfig(), DECODER, get_task("cola"), label_counts=[2528, 6023]).class_weights == "balanced"


@pytest.fixture
def spam_csv(tmp_path) -> str:
    """Nine ham rows to every spam row, as a user would export them."""
    return labelled_csv(tmp_path / "spam.csv", [("see you at lunch", "ham", 90), ("win a free prize now", "spam", 10)])


def test_the_label_instruction_is_the_prompt_it_trains_from(tiny_dirs, spam_csv, tmp_path):
    trainer = prepare(TrainConfig(model=tiny_dirs["llama"], data=spam_csv, prompt_length=6, task_type="CAUSAL_LM",
                                  output=str(tmp_path / "run"), progress=False), log=lambda _: None)
    instruction = label_instruction(("ham", "spam"))
    assert trainer.spec.prompt.init_text == instruction
    model = trainer.model
    ids = model.tokenizer(instruction, add_special_tokens=False)["input_ids"]
    expected = model.embedding_matrix()[(ids * 6)[:6]]
    torch.testing.assert_close(model.prompt.weight.detach(), expected.float())
    counts = torch.tensor([sum(e.label == c for e in trainer.splits.train) for c in (0, 1)], dtype=torch.float)
    torch.testing.assert_close(trainer.class_weights, counts.sum() / (2 * counts))


def test_cli_defaults_on_an_imbalanced_csv(tiny_dirs, spam_csv, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main(["train", "--model", tiny_dirs["llama"], "--data", spam_csv, "--output", str(out_dir),
                 "--no-progress", "--no-baselines"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"budget: {CUSTOM_STEPS[0]} steps or {CUSTOM_SECONDS:.0f} s" in out
    results = json.loads((out_dir / "results.json").read_text())
    assert results["steps"] == CUSTOM_STEPS[0]  # 80 rows make one epoch of 5 steps: the floor rules
    spec = read_checkpoint(out_dir / "best").spec
    assert spec.task_type is TaskType.SEQ_CLS and spec.class_weights == "balanced" and spec.head_init == "fit"
    assert "head started as a ridge readout" in out


def test_pooling_is_refused_where_it_would_be_ignored(tiny_llama, tokenizer):
    """A decoder's head reads its last token, the text's mean or both; siamese pooling (an encoder's pairs), or any
    pooling on label words, is an error from the CLI's resolver and from the Python API alike, not ignored."""
    refusals = (("siamese", "SEQ_CLS", "is for encoders' heads; this decoder's head cannot"),
                ("mean", "CAUSAL_LM", "sets how a head reads the model; this run reads label words"))
    for pooling, task_type, message in refusals:
        with pytest.raises(SoftpromptError, match=f"--pooling {pooling} {message}"):
            resolve(TrainConfig(pooling=pooling, task_type=task_type), DECODER, _custom("ham", "spam"),
                    label_counts=[10, 10])
        config = PromptTuningConfig(num_virtual_tokens=2, task_type=task_type, pooling=pooling)
        with pytest.raises(SoftpromptError, match=f"--pooling {pooling} {message}"):
            get_prompt_model(tiny_llama, config, tokenizer)
    with pytest.raises(SoftpromptError, match="--pooling last_mean is for decoders' heads; this encoder's head cannot"):
        resolve(TrainConfig(pooling="last_mean"), ENCODER, _custom("ham", "spam"), label_counts=[10, 10])
    assert resolve(TrainConfig(pooling="mean"), DECODER, _custom("ham", "spam"), label_counts=[10, 10]).prompt.pooling \
        == "mean"


def test_a_decoder_head_on_a_users_file_reads_its_last_state_and_the_mean():
    spec = resolve(TrainConfig(), DECODER, _custom("ham", "spam"), label_counts=[10, 10])
    assert spec.prompt.pooling == "last_mean" and "#custom-data" in spec.decided["pooling"]
    assert resolve(TrainConfig(task_type="SEQ_CLS"), DECODER, get_task("sst2")).prompt.pooling == "cls"
    assert resolve(TrainConfig(task_type="CAUSAL_LM"), DECODER, _custom("ham", "spam"),
                   label_counts=[10, 10]).prompt.pooling == "cls"  # label words: no head to pool for


def test_a_users_file_keeps_a_long_texts_start_and_end_and_a_built_in_task_its_start():
    from softprompt.spec import RunSpec

    for model in (DECODER, ENCODER):
        spec = resolve(TrainConfig(), model, _custom("ham", "spam"), label_counts=[10, 10])
        assert spec.truncation == "head_tail" and "#custom-data" in spec.decided["truncation"]
        assert resolve(TrainConfig(), model, get_task("rte")).truncation == "head"
        assert resolve(TrainConfig(truncation="head"), model, _custom("ham", "spam"),
                       label_counts=[10, 10]).truncation == "head"
    saved = spec.to_dict()
    del saved["truncation"]  # a spec written before the option: its run cut each text's end
    assert RunSpec.from_dict(saved).truncation == "head"
    with pytest.raises(SoftpromptError, match="--truncation must be one of head, head_tail, not 'middle'"):
        TrainConfig(truncation="middle")
