"""Metrics against hand-computed values; task specs are consistent."""

from __future__ import annotations

import math

import pytest

from softprompt import SoftpromptError
from softprompt.metrics import compute_metrics
from softprompt.tasks import TASKS, get_task


def test_accuracy_and_binary_f1():
    # tp=2, fp=1, fn=1, tn=1 -> precision 2/3, recall 2/3, f1 2/3; accuracy 3/5
    got = compute_metrics(["accuracy", "f1"], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert got["accuracy"] == pytest.approx(0.6)
    assert got["f1"] == pytest.approx(2 / 3)


def test_mcc_known_value():
    # same confusion matrix: (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2-1)/sqrt(3*3*2*2) = 1/6
    assert compute_metrics(["mcc"], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])["mcc"] == pytest.approx(1 / 6)


def test_macro_f1_three_classes():
    # class 0: p=1, r=1/2 -> 2/3; class 1: p=1/2, r=1 -> 2/3; class 2: p=r=1 -> 1
    got = compute_metrics(["macro_f1"], [0, 1, 1, 2], [0, 0, 1, 2])["macro_f1"]
    assert got == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_correlations():
    got = compute_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 6.0, 7.0])
    # pearson by hand: x-mean = [-1.75,-0.75,0.25,2.25], y-mean=[-2.75,-0.75,1.25,2.25]
    num = 1.75 * 2.75 + 0.75 * 0.75 + 0.25 * 1.25 + 2.25 * 2.25
    den = math.sqrt((1.75**2 + 0.75**2 + 0.25**2 + 2.25**2) * (2.75**2 + 0.75**2 + 1.25**2 + 2.25**2))
    assert got["pearson"] == pytest.approx(num / den)
    assert got["spearman"] == pytest.approx(1.0)
    assert compute_metrics(["pearson"], [1.0, 1.0], [1.0, 2.0])["pearson"] == 0.0  # constant prediction


def test_unknown_metric_is_a_user_error():
    with pytest.raises(SoftpromptError, match="unknown metric"):
        compute_metrics(["bleu"], [1], [1])


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_is_consistent(name):
    task = get_task(name)
    fields = {f: f"<{f}>" for f in task.fields}
    rendered = task.render(fields)
    assert all(f"<{f}>" in rendered for f in task.fields)
    assert task.is_regression or len(task.verbalizer) == len(task.labels) == len(set(task.verbalizer))
    assert task.metrics


def test_glue_metrics_match_the_benchmark():
    assert get_task("cola").metrics[0] == "mcc"
    assert set(get_task("mrpc").metrics) == set(get_task("qqp").metrics) == {"accuracy", "f1"}
    assert get_task("stsb").metrics == ("pearson", "spearman")
    assert get_task("cb").metrics == ("accuracy", "macro_f1")


def test_unknown_task():
    with pytest.raises(SoftpromptError, match="built-in tasks"):
        get_task("squad")


def test_template_label_slot():
    task = get_task("sst2")
    task.template = "Review: {sentence}\nIt was{label}. Thanks!"
    assert task.render({"sentence": "fine"}) == "Review: fine\nIt was"
    task.template = "Review: {sentence}\nIt was"
    assert task.render({"sentence": "fine"}) == "Review: fine\nIt was"


def test_template_must_place_every_field_before_the_label():
    from softprompt.tasks import TaskSpec

    with pytest.raises(SoftpromptError, match="must place {sentence} before its {label} slot"):
        TaskSpec("t", ("sentence",), ("a", "b"), ("accuracy",), "{label}: {sentence}")


def test_natural_text_undoes_treebank_tokenization():
    from softprompt.tasks import natural_text

    ptb = "it 's not that it does n't work , ca n't or wo n't ... ( really ) `` so-so '' ? 100 % ; ok : yes !"
    assert natural_text(ptb + " ") == ('It\'s not that it doesn\'t work, can\'t or won\'t... (really) "so-so"? 100%; '
                                       'ok: yes!')
    typed = "A gorgeous, moving film (really): don't miss it... it's 100% \"great\"!"
    assert natural_text(typed) == typed


def test_encoder_reads_sst2_as_natural_text(tokenizer):
    from softprompt.config import TaskType
    from softprompt.data import Example
    from softprompt.encoding import TaskEncoder

    ptb, typed = "it does n't work , sadly .", "It doesn't work, sadly."
    for task_type in (TaskType.CAUSAL_LM, TaskType.SEQ_CLS):
        task = get_task("sst2")
        assert task.detokenize
        encode = TaskEncoder(tokenizer, task, task_type, 64).encode
        assert encode(Example({"sentence": ptb}, 1)).input_ids == encode(Example({"sentence": typed}, 1)).input_ids
        task.detokenize = False  # other tasks' text goes in as it is
        encode = TaskEncoder(tokenizer, task, task_type, 64).encode
        assert encode(Example({"sentence": ptb}, 1)).input_ids != encode(Example({"sentence": typed}, 1)).input_ids


def test_task_saved_before_detokenize_loads_without_it():
    from softprompt.tasks import TaskSpec

    saved = get_task("sst2").to_dict()
    assert TaskSpec.from_dict(saved).detokenize
    del saved["detokenize"]  # a checkpoint written before the field: scored on its text as it was trained
    assert not TaskSpec.from_dict(saved).detokenize


@pytest.mark.parametrize("truncation", ["head", "head_tail"])
def test_a_long_text_keeps_its_start_or_its_start_and_end(tokenizer, truncation):
    """head keeps a too-long text's first tokens, head_tail its first and last halves; the template, the label
    slot and a pair's short text are never cut, and a text that fits is untouched."""
    from softprompt.config import TaskType
    from softprompt.data import Example
    from softprompt.encoding import TaskEncoder

    words = [f"w{i}" for i in range(200)]
    long = " ".join(words)
    word_ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    short = tokenizer("tiny", add_special_tokens=False)["input_ids"]
    rte = get_task("rte")
    for task_type in (TaskType.SEQ_CLS, TaskType.CAUSAL_LM):
        encoder = TaskEncoder(tokenizer, rte, task_type, 48, truncation=truncation)
        feature = encoder.encode(Example({"sentence1": long, "sentence2": "tiny"}, 0))
        ids = feature.input_ids
        assert len(ids) + max(map(len, encoder.label_ids), default=0) <= 48 and encoder.truncated == 1
        start = [i for i in range(len(ids)) if ids[i:i + 4] == word_ids[:4]]
        assert len(start) == 1, tokenizer.decode(ids)
        assert any(ids[i:i + len(short)] == short for i in range(len(ids)))
        text = tokenizer.decode(ids)
        assert ("w199" in text) == (truncation == "head_tail") and "w100" not in text, text
        fits = encoder.encode(Example({"sentence1": "a short premise", "sentence2": "tiny"}, 0))
        assert encoder.truncated == 1 and fits.input_ids == TaskEncoder(tokenizer, rte, task_type, 48).encode(
            Example({"sentence1": "a short premise", "sentence2": "tiny"}, 0)).input_ids
    assert TaskEncoder(tokenizer, rte, TaskType.SEQ_CLS, 48).truncation == "head"  # what specs before the option did
    two_long = TaskEncoder(tokenizer, rte, TaskType.SEQ_CLS, 48, truncation=truncation).encode(
        Example({"sentence1": long, "sentence2": " ".join(f"v{i}" for i in range(150))}, 0))
    first, second = tokenizer.decode(two_long.input_ids).split("[SEP]")[:2]
    assert 44 <= len(two_long.input_ids) <= 48 and "w0" in first and "v0" in second  # a long pair keeps both
    assert ("w199" in first and "v149" in second) == (truncation == "head_tail")
