"""One base model, many prompts in one batch: each row's result equals its task predicted alone."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt import PromptedTask
from softprompt.data import Example
from softprompt.multitask import BaseMismatch, MultiTaskModel, UnknownTask, majority_vote
from softprompt.tasks import TaskSpec, get_task

from .conftest import random_checkpoint

MULTI_TOKEN = TaskSpec("toy", ("text",), ("a", "b", "c"), ("accuracy",), "{text} =",
                       (" very good", " very bad indeed", " fine"))
TEXTS = ["good film", "awful", "fine cast, thin plot", "a long and winding sentence about nothing much at all", "ok"]
PAIRS = [{"sentence1": "a cat sat", "sentence2": "the cat was sitting"}, {"sentence1": "rain", "sentence2": "no sun"},
         {"sentence1": "it is a long day today", "sentence2": "short"}]


def _alone(checkpoint, inputs):
    return PromptedTask.from_pretrained(checkpoint).predict(inputs)


def _assert_same(got: dict, want: dict) -> None:
    if "value" in want:
        assert got["value"] == pytest.approx(want["value"], abs=1e-5)
        return
    assert got["scores"].keys() == want["scores"].keys()
    for label, p in want["scores"].items():
        assert got["scores"][label] == pytest.approx(p, abs=2e-5), (got, want)
    assert got["label"] == want["label"]


@pytest.fixture(scope="module")
def decoder_prompts(tiny_dirs, tmp_path_factory):
    root, llama = tmp_path_factory.mktemp("decoder"), tiny_dirs["llama"]
    return {"sentiment": random_checkpoint(root / "a", llama, get_task("rotten_tomatoes"), 4, "CAUSAL_LM", 1),
            "toy": random_checkpoint(root / "b", llama, MULTI_TOKEN, 7, "CAUSAL_LM", 2),
            "head": random_checkpoint(root / "c", llama, get_task("rotten_tomatoes"), 5, "SEQ_CLS", 3),
            "similarity": random_checkpoint(root / "d", llama, get_task("stsb"), 3, "SEQ_CLS", 4),
            "mean": random_checkpoint(root / "e", llama, get_task("rotten_tomatoes"), 2, "SEQ_CLS", 5, "mean"),
            "last_mean": random_checkpoint(root / "f", llama, get_task("rotten_tomatoes"), 3, "SEQ_CLS", 6,
                                           "last_mean")}


@pytest.fixture(scope="module")
def encoder_prompts(tiny_dirs, tmp_path_factory):
    root, bert = tmp_path_factory.mktemp("encoder"), tiny_dirs["bert"]
    return {"cls": random_checkpoint(root / "a", bert, get_task("rotten_tomatoes"), 4, "SEQ_CLS", 1),
            "mean": random_checkpoint(root / "b", bert, get_task("rotten_tomatoes"), 6, "SEQ_CLS", 2, "mean"),
            "siamese": random_checkpoint(root / "c", bert, get_task("mrpc"), 3, "SEQ_CLS", 3, "siamese"),
            "pair_cls": random_checkpoint(root / "d", bert, get_task("mrpc"), 2, "SEQ_CLS", 5),
            "similarity": random_checkpoint(root / "e", bert, get_task("stsb"), 5, "SEQ_CLS", 4, "mean")}


def _inputs_for(task: str) -> list:
    return PAIRS if task in ("siamese", "pair_cls", "similarity") else TEXTS


def _mixed(prompts) -> list[tuple[str, object]]:
    """Every task's inputs, interleaved, so each batch mixes tasks and prompt lengths."""
    per_task = [[(task, x) for x in _inputs_for(task)] for task in prompts]
    return [item for group in zip(*per_task) for item in group] + [i for g in per_task for i in g[3:]]


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_a_mixed_batch_equals_each_task_alone(family, decoder_prompts, encoder_prompts, monkeypatch):
    prompts = decoder_prompts if family == "decoder" else encoder_prompts
    model = MultiTaskModel.from_pretrained(prompts)
    monkeypatch.setattr("softprompt.multitask.forward.each_prompt_alone",
                        lambda *a: pytest.fail("took the one-prompt path"))
    items = _mixed(prompts)
    got = model.predict(items, batch_size=64)  # one forward for every row
    want = {task: iter(_alone(path, _inputs_for(task))) for task, path in prompts.items()}
    for (task, _), result in zip(items, got):
        assert result["task"] == task
        _assert_same(result, next(want[task]))


def test_tasks_that_cannot_share_run_alone_with_the_same_results(decoder_prompts):
    model = MultiTaskModel.from_pretrained(decoder_prompts)
    items = _mixed(decoder_prompts)
    before = model.predict(items)
    model.prompts("toy")[0].prompted.model.engine.force_off("test")
    for got, want in zip(model.predict(items), before):
        _assert_same(got, want)


def test_the_backbone_is_loaded_once_and_shared(decoder_prompts):
    model = MultiTaskModel.from_pretrained(decoder_prompts)
    backbones = {id(p.prompted.model.base.base_model) for task in model.tasks() for p in model.prompts(task)}
    assert backbones == {id(model.backbones.held["fp32"].base_model)} and len(model.backbones.held) == 1
    assert model.prompts("head")[0].prompted.model.head is not model.prompts("similarity")[0].prompted.model.head


def test_generation_in_a_mixed_batch_equals_each_alone(decoder_prompts):
    model = MultiTaskModel.from_pretrained({t: decoder_prompts[t] for t in ("sentiment", "toy")})
    items = [("sentiment", TEXTS[0]), ("toy", TEXTS[1]), ("sentiment", TEXTS[3]), ("toy", TEXTS[2])]
    got = model.generate(items, max_new_tokens=6)
    for (task, text), out in zip(items, got):
        assert out == PromptedTask.from_pretrained(decoder_prompts[task]).generate([text], max_new_tokens=6)[0]
    with pytest.raises(Exception, match="cannot generate"):
        MultiTaskModel.from_pretrained({"head": decoder_prompts["head"]}).generate([("head", "x")])


def test_majority_vote_and_mean_on_a_constructed_case():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55]])
    assert majority_vote(probs) == 1  # two of three pick class 1, though the mean favours class 0
    assert int(probs.mean(0).argmax()) == 0
    tie = torch.tensor([[0.2, 0.8, 0.0], [0.55, 0.45, 0.0]])
    assert majority_vote(tie) == 1  # one vote each: the higher mean probability (0.625) wins


def test_an_ensemble_averages_its_members_in_one_forward(tiny_dirs, tmp_path):
    llama, task = tiny_dirs["llama"], get_task("rotten_tomatoes")
    members = [random_checkpoint(tmp_path / f"m{i}", llama, task, k, "CAUSAL_LM", 10 + i)
               for i, k in enumerate((3, 4, 6))]
    model = MultiTaskModel.from_pretrained({"sentiment": members})
    assert model.tasks()["sentiment"].members == tuple(members)
    results = model.predict([("sentiment", t) for t in TEXTS])
    alone = [_alone(m, TEXTS) for m in members]
    for i, result in enumerate(results):
        for member, want in zip(result["members"], (a[i] for a in alone)):
            _assert_same(member, want)
        mean = {label: sum(a[i]["scores"][label] for a in alone) / 3 for label in task.labels}
        assert result["scores"] == pytest.approx(mean, abs=2e-5)
        assert result["label"] == max(mean, key=mean.get)
        picks = [a[i]["label"] for a in alone]
        assert result["vote"] in picks and picks.count(result["vote"]) >= 2 or len(set(picks)) == 3

    examples = [Example({"text": t}, i % 2) for i, t in enumerate(TEXTS)]
    metrics = model.evaluate("sentiment", examples)
    for member in members:
        assert metrics["members"][member] == pytest.approx(PromptedTask.from_pretrained(member).evaluate(examples))
    assert set(metrics) == {"members", "mean_probability", "majority_vote"}


def test_adding_and_removing_prompts_and_what_is_refused(tiny_dirs, decoder_prompts, tmp_path):
    model = MultiTaskModel.from_pretrained({"sentiment": decoder_prompts["sentiment"]})
    model.add(model.load(decoder_prompts["toy"], task="toy"))
    assert sorted(model.tasks()) == ["sentiment", "toy"]
    assert model.tasks()["toy"].labels == ("a", "b", "c") and model.tasks()["toy"].can_generate
    model.remove("toy")
    with pytest.raises(UnknownTask, match="no task 'toy'"):
        model.predict([("toy", "x")])
    with pytest.raises(UnknownTask):
        model.remove("toy")
    with pytest.raises(Exception, match="labels"):  # one task's members must share its labels
        model.add(model.load(decoder_prompts["toy"], task="sentiment"))
    other = random_checkpoint(tmp_path / "other", tiny_dirs["llama48"], get_task("rotten_tomatoes"), 4, "CAUSAL_LM", 1)
    with pytest.raises(BaseMismatch, match="does not match"):
        model.load(other)
    with pytest.raises(Exception, match="lacks field"):
        model.predict([("sentiment", {"wrong": "x"})])


def test_cli_eval_of_several_checkpoints_reports_members_and_ensemble(tiny_dirs, tiny_csv, tmp_path, capsys):
    from softprompt.cli import main

    runs = []
    for seed, k in ((1, 3), (2, 5)):
        runs.append(tmp_path / f"run{seed}")
        assert main(["train", "--model", tiny_dirs["llama"], "--data", tiny_csv, "--max-steps", "2",
                     "--seed", str(seed), "--prompt-length", str(k), "--no-progress", "--no-baselines",
                     "--output", str(runs[-1])]) == 0
    capsys.readouterr()
    alone = []
    for run in runs:
        assert main(["eval", str(run / "best"), "--split", "dev"]) == 0
        alone.append(json.loads(capsys.readouterr().out))
    assert main(["eval", *(str(r / "best") for r in runs), "--split", "dev"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == alone[0]["n"] and result["checkpoints"] == [str(r / "best") for r in runs]
    for run, single in zip(runs, alone):
        assert result["members"][str(run / "best")]["accuracy"] == pytest.approx(single["accuracy"])
    assert 0 <= result["mean_probability"]["accuracy"] <= 1 and 0 <= result["majority_vote"]["accuracy"] <= 1
