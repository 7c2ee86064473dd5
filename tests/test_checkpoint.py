"""The typed checkpoint and the resolved spec: round trips, checkpoints of the previous format, bad folders,
save_pretrained/from_pretrained, peft's config names, and one read of the model config per run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from softprompt import (Checkpoint, PromptedTask, PromptModel, PromptTuningConfig, SoftpromptError, TrainConfig,
                        describe_model, get_prompt_model, get_task, read_checkpoint, resolve, train)
from softprompt.checkpoint import FORMAT, META_FILE, TENSOR_FILE, load_tensors, read_trainer_state
from softprompt.config import PromptInit, TaskType
from softprompt.data import Example
from softprompt.training import prepare

LEGACY = Path(__file__).parent / "data" / "legacy_v1"
LEGACY_V2 = Path(__file__).parent / "data" / "legacy_v2"


def legacy_run(folder: Path, run: str, data: str | None = None, base_model: str | None = None) -> Path:
    """A run folder whose best/ and last/ are format-1 checkpoints from tests/data (`{run}_best`, `{run}_last`),
    pointed at this machine's data and model."""
    for name in ("best", "last"):
        shutil.copytree(LEGACY / f"{run}_{name}", folder / name)
        meta_path = folder / name / META_FILE
        meta = json.loads(meta_path.read_text())
        if data:
            meta["training"]["data"] = data
        if base_model:
            meta["base_model"] = meta["training"]["model"] = base_model
        meta_path.write_text(json.dumps(meta))
    return folder


def _legacy_folder(tmp_path: Path, name: str, base_model: str | None = None) -> Path:
    folder = tmp_path / name
    shutil.copytree(LEGACY / name, folder)
    if base_model:
        meta = json.loads((folder / META_FILE).read_text())
        meta["base_model"] = meta["training"]["model"] = base_model
        (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def test_a_checkpoint_of_the_previous_format_scores_as_it_did(tmp_path):
    """MiniLM (real weights): the scores equal those the release that wrote it gave."""
    expected = json.loads((LEGACY / "expected.json").read_text())
    loaded = PromptedTask.from_pretrained(LEGACY / "minilm_best")
    assert loaded.spec.prompt.pooling == "mean" and loaded.spec.max_length == 128 and loaded.spec.bf16 is False
    assert loaded.spec.truncation == "head"  # it cut each text's end, whatever today's default for its data
    scores = loaded.scores([Example({"text": t}, None) for t in expected["texts"]])
    torch.testing.assert_close(scores, torch.tensor(expected["minilm_scores"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama_prompt", "llama_prefix", "llama_ptuning", "llama_head", "bert_mean",
                                  "bert_prefix"])
def test_a_checkpoint_of_0_2_0_scores_as_it_did(tiny_dirs, name):
    """Checkpoints softprompt 0.2.0 wrote (before the restructure): the same scores on the same tiny models, to
    fp32 rounding (relative 1e-6: the expected scores were written on another CPU, whose matrix products round
    the last bits differently; the head's scores, near 70, moved by 1.5e-5 there)."""
    expected = json.loads((LEGACY_V2 / "expected.json").read_text())
    loaded = PromptedTask.from_pretrained(LEGACY_V2 / name, model=tiny_dirs[name.split("_")[0]])
    assert loaded.spec.method == {"prefix": "prefix", "ptuning": "ptuning"}.get(name.split("_")[1], "prompt")
    scores = loaded.scores([Example({"text": t}, None) for t in expected["texts"]])
    torch.testing.assert_close(scores, torch.tensor(expected[name]), atol=1e-6, rtol=1e-6)


def test_a_previous_format_decoder_checkpoint_scores_its_prompt_before_the_template(tiny_dirs, tmp_path, tokenizer):
    """A tiny Llama: the loaded checkpoint's rank scores equal the plain model run on [prompt, template, label]."""
    folder = _legacy_folder(tmp_path, "llama_best", tiny_dirs["llama"])
    loaded = PromptedTask.from_pretrained(folder)
    assert loaded.spec.task_type is TaskType.CAUSAL_LM and loaded.spec.prompt.num_virtual_tokens == 4
    prompt = load_tensors(folder)["prompt"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    texts = ["a good film", "a bad one, thin plot"]
    want = []
    for text in texts:
        ids = tokenizer(loaded.task.render({"text": text}))["input_ids"]
        row = []
        for label in loaded.encoder.label_ids:
            tokens = torch.tensor([ids + label[:-1]])
            embeds = torch.cat([prompt[None], base.get_input_embeddings()(tokens)], dim=1)
            with torch.no_grad():
                logits = base(inputs_embeds=embeds).logits[0, -len(label):]
            row.append(torch.log_softmax(logits, -1)[torch.arange(len(label)), label].sum())
        want.append(torch.stack(row))
    got = loaded.scores([Example({"text": t}, None) for t in texts])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=0)


def test_a_format_2_decoder_checkpoint_that_recorded_mean_pooling_loads_with_the_last_token(tiny_dirs, tmp_path):
    """Format 2 recorded --pooling mean on a decoder but trained its head on the last token; it loads as trained,
    and scores as a last-token checkpoint does. Format 3 keeps mean."""
    model = describe_model(tiny_dirs["llama"])
    spec = resolve(TrainConfig(model=tiny_dirs["llama"], prompt_length=3, task_type="SEQ_CLS"), model,
                   get_task("sst2"))
    last = PromptedTask.build(spec, model).save_pretrained(tmp_path / "last")
    meta = json.loads((last / META_FILE).read_text())
    assert meta["format"] == FORMAT == 3 and meta["prompt"]["pooling"] == "cls"
    for fmt, pooling in ((2, "cls"), (3, "mean")):
        folder = tmp_path / f"format{fmt}"
        shutil.copytree(last, folder)
        (folder / META_FILE).write_text(json.dumps({**meta, "format": fmt,
                                                    "prompt": {**meta["prompt"], "pooling": "mean"}}))
        loaded = read_checkpoint(folder)
        assert loaded.prompt.pooling == loaded.spec.prompt.pooling == pooling
    examples = [Example({"sentence": t}, None) for t in ("a fine film", "dull, thin and long")]
    want = PromptedTask.from_pretrained(last).scores(examples)
    torch.testing.assert_close(PromptedTask.from_pretrained(tmp_path / "format2").scores(examples), want)
    assert not torch.allclose(PromptedTask.from_pretrained(tmp_path / "format3").scores(examples), want)


def test_a_resolved_spec_round_trips_through_the_checkpoint(tiny_dirs, tmp_path):
    for name, task in (("bert", "mrpc"), ("llama", "rte")):
        model = describe_model(tiny_dirs[name])
        spec = resolve(TrainConfig(model=tiny_dirs[name], prompt_length=4, verbalizer=[" yes", " no"],
                                   template="{sentence1} / {sentence2}?", report_to="tensorboard"),
                       model, get_task(task))
        assert spec.decided and all("docs/recipe.md" in why for why in spec.decided.values())
        prompted = PromptedTask.build(spec, model)
        prompted.save_pretrained(tmp_path / name, step=7, metrics={"dev": {"accuracy": 0.5}})
        loaded = read_checkpoint(tmp_path / name)
        assert loaded.spec == spec and loaded.spec.decided == spec.decided
        assert (loaded.step, loaded.metrics, loaded.format) == (7, {"dev": {"accuracy": 0.5}}, FORMAT)
        assert loaded.versions["softprompt"] and loaded.files[TENSOR_FILE]
        assert Checkpoint.from_dict(json.loads(json.dumps(loaded.to_dict()))) == loaded


def test_every_default_is_decided_with_a_reason_and_what_the_user_said_is_kept(tiny_dirs):
    model = describe_model(tiny_dirs["llama"])
    spec = resolve(TrainConfig(model=tiny_dirs["llama"]), model, get_task("cola"))
    assert (spec.task_type, spec.lr, spec.head_lr, spec.residual_reparam, spec.class_weights, spec.max_steps) == (
        TaskType.CAUSAL_LM, 3e-2, None, 0, "balanced", 80)
    assert {"task_type", "init", "lr", "residual_reparam", "class_weights", "max_steps", "bf16"} <= set(spec.decided)
    mine = resolve(TrainConfig(model=tiny_dirs["llama"], lr=0.1, max_time=60, bf16=False, task_type="SEQ_CLS"), model,
                   get_task("cola"))
    assert (mine.lr, mine.max_steps, mine.max_time, mine.bf16, mine.head_lr, mine.head_init) == (
        0.1, None, 60, False, pytest.approx(0.03), "fit")
    assert not {"lr", "max_steps", "bf16", "task_type"} & set(mine.decided)
    with pytest.raises(SoftpromptError, match="supports task type"):
        resolve(TrainConfig(task_type="CAUSAL_LM"), describe_model(tiny_dirs["bert"]), get_task("sst2"))


def test_a_run_reads_the_model_config_once(tiny_dirs, tiny_csv, tmp_path, monkeypatch):
    calls = []
    real = transformers.AutoConfig.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(counting))
    result = train(TrainConfig(model=tiny_dirs["llama"], data=tiny_csv, prompt_length=4, max_steps=1, eval_every=1,
                               output=str(tmp_path / "run"), progress=False), log=lambda _: None)
    assert len(calls) == 1
    PromptedTask.from_pretrained(result.best_checkpoint)
    assert len(calls) == 2


def test_bad_checkpoints_say_what_is_wrong(tiny_dirs, tmp_path):
    model = describe_model(tiny_dirs["bert"])
    spec = resolve(TrainConfig(model=tiny_dirs["bert"], prompt_length=4), model, get_task("sst2"))
    good = PromptedTask.build(spec, model).save_pretrained(tmp_path / "good")
    newer = tmp_path / "newer"
    shutil.copytree(good, newer)
    meta = json.loads((newer / META_FILE).read_text())
    (newer / META_FILE).write_text(json.dumps({**meta, "format": FORMAT + 1}))
    with pytest.raises(SoftpromptError, match="written by a newer softprompt"):
        read_checkpoint(newer)
    damaged = tmp_path / "damaged"
    shutil.copytree(good, damaged)
    data = (damaged / TENSOR_FILE).read_bytes()
    (damaged / TENSOR_FILE).write_bytes(data[:-8] + bytes(8))
    with pytest.raises(SoftpromptError, match="does not match its checksum"):
        PromptedTask.from_pretrained(damaged)
    mistyped = tmp_path / "mistyped"
    shutil.copytree(good, mistyped)
    (mistyped / META_FILE).write_text(json.dumps({**meta, "spec": {**meta["spec"], "lr": "fast"}}))
    with pytest.raises(SoftpromptError, match="'lr' holds 'fast'.*damaged"):
        read_checkpoint(mistyped)
    (mistyped / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "prompt"}))
    with pytest.raises(SoftpromptError, match="damaged"):
        read_checkpoint(mistyped)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SoftpromptError, match="not a softprompt checkpoint"):
        read_checkpoint(tmp_path / "nothing")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prompt_model_save_pretrained_and_from_pretrained(tiny_dirs, tokenizer, tmp_path, family):
    auto = {"bert": transformers.AutoModelForSequenceClassification,
            "llama": transformers.AutoModelForCausalLM}[family]
    task_type = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM"}[family]
    base = auto.from_pretrained(tiny_dirs[family]).eval()
    model = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=3, task_type=task_type), tokenizer)
    with torch.no_grad():
        model.prompt.weight.add_(0.3)
        if model.head is not None:
            model.head.weight.mul_(2)
    enc = tokenizer(["a good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(enc["input_ids"], enc["attention_mask"]).logits
    model.save_pretrained(tmp_path / "p")
    assert read_checkpoint(tmp_path / "p").spec is None
    fresh = auto.from_pretrained(tiny_dirs[family]).eval()
    loaded = PromptModel.from_pretrained(fresh, tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(loaded(enc["input_ids"], enc["attention_mask"]).logits, want, atol=0, rtol=0)
    other = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama48"])
    with pytest.raises(SoftpromptError, match="does not match"):
        PromptModel.from_pretrained(other, tmp_path / "p")


def test_loading_changes_the_prompt_and_head_only_and_never_drops_a_reparameterisation(tiny_llama, tokenizer,
                                                                                       tmp_path):
    model = get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), tokenizer)
    model.save_pretrained(tmp_path)
    model.prompt.add_reparam(4)
    reparam = model.prompt.reparam
    with pytest.raises(SoftpromptError, match="residual reparameterisation"):
        model.load_tensors(load_tensors(tmp_path))
    assert model.prompt.reparam is reparam
    base = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    model.prompt.fold()
    with torch.no_grad():
        model.prompt.weight.zero_()
    model.load_tensors(load_tensors(tmp_path))
    assert model.prompt.weight.abs().sum() > 0
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in base.items())


def test_resume_restores_exactly_what_last_saved(tiny_dirs, tiny_csv, tmp_path):
    cfg = TrainConfig(model=tiny_dirs["bert"], data=tiny_csv, prompt_length=4, residual_reparam=4, max_steps=2,
                      eval_every=1, output=str(tmp_path / "run"), progress=False)
    first = prepare(cfg, log=lambda _: None)
    first.train()
    saved = read_trainer_state(tmp_path / "run" / "last")
    resumed = prepare(cfg, log=lambda _: None)  # a fresh build, then the restore
    resumed.resume()
    assert set(saved.prompt_module) == set(resumed.model.prompt.state_dict()) and resumed.model.prompt.reparam
    for key, value in saved.prompt_module.items():
        assert torch.equal(resumed.model.prompt.state_dict()[key], value)
    assert torch.equal(resumed.model.head.weight, load_tensors(tmp_path / "run" / "last")["head.weight"])
    assert torch.equal(torch.get_rng_state(), saved.rng["torch"]) and set(saved.rng) == {"torch"}  # no GPU here
    assert {k: resumed.state[k] for k in saved.counters} == saved.counters
    moments = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(moments[i]["exp_avg"], saved.optimizer["state"][i]["exp_avg"]) for i in moments)


def test_a_peft_adapter_config_builds_the_same_prompt_config(tmp_path):
    import peft  # a test dependency: the real library writes the file

    theirs = peft.PromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                     prompt_tuning_init_text="Classify the review", num_virtual_tokens=8,
                                     tokenizer_name_or_path="some/tokenizer")
    theirs.save_pretrained(tmp_path)
    ours = PromptTuningConfig.from_pretrained(tmp_path)
    assert ours == PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM", init="text",
                                      init_text="Classify the review", tokenizer_name_or_path="some/tokenizer")
    assert PromptTuningConfig(prompt_tuning_init="SAMPLE_VOCAB", task_type="SEQ_CLS").init is PromptInit.VOCAB
    assert PromptTuningConfig(prompt_tuning_init="RANDOM").init is PromptInit.RANDOM
    lora = peft.LoraConfig(task_type="CAUSAL_LM")
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(SoftpromptError, match="LORA"):
        PromptTuningConfig.from_pretrained(tmp_path / "lora")


def test_a_hub_checkpoint_is_fetched_then_read_like_a_folder(tiny_dirs, tmp_path, monkeypatch):
    import huggingface_hub

    model = describe_model(tiny_dirs["bert"])
    spec = resolve(TrainConfig(model=tiny_dirs["bert"], prompt_length=4), model, get_task("sst2"))
    prompted = PromptedTask.build(spec, model)
    prompted.save_pretrained(tmp_path / "hub" / "user--prompt")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append(repo_id) or str(tmp_path / "hub" / "user--prompt"))
    monkeypatch.setattr("softprompt.assets.hub_unreachable", lambda: None)  # the stand-in hub answers
    monkeypatch.chdir(tmp_path)
    loaded = PromptedTask.from_pretrained("user/prompt")
    assert asked == ["user/prompt"]
    assert torch.equal(loaded.model.prompt.weight, prompted.model.prompt.weight)
