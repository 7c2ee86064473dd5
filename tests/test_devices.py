"""The device rule and the exactness tests on each device: the engine against the concatenation, a prefix against
the model given it as its cache, a mixed batch against each task alone, peft's logits, save and load, a training
run; on the CPU always and on a GPU where there is one (the `device` fixture). Bad devices, bf16 on a GPU without
it, and running out of memory are each one clear line."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from softprompt import (MultiTaskModel, PromptedTask, PromptModel, PromptTuningConfig, SoftpromptError, TrainConfig,
                        describe_model, get_prompt_model, get_task, resolve, train)
from softprompt.devices import resolve_device
from softprompt.peft_interop import export_peft
from softprompt.training import prepare

from .conftest import TOLERANCE, random_checkpoint
from .test_cli import _assert_clean_error, run

TEXTS = ["the film was good", "a bad one, thin plot and a long, dull middle", "fine"]


def _batch(tokenizer, device, side="right", texts=TEXTS):
    tokenizer.padding_side = side
    try:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _close(got, want, device, dtype=torch.float32):
    tolerance = TOLERANCE[(device.type, dtype)]
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


def test_the_engine_equals_the_concatenation_on_the_device(tokenizer, tiny_llama, device):
    torch.manual_seed(1)
    model = get_prompt_model(tiny_llama.to(device), PromptTuningConfig(num_virtual_tokens=5, init="random"), tokenizer)
    assert model.device.type == device.type and model.prompt.weight.device.type == device.type
    ids, mask = _batch(tokenizer, device, "left")
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    results = []
    for shared in (True, False):
        model.engine.force_off(None if shared else "the concatenation, for the test")
        model.prompt.weight.grad = None
        loss = model.training_loss(ids, mask, labels=labels)
        loss.backward()
        with torch.no_grad():
            tail = model.tail_logits(ids, mask, 2)
        results.append((loss.detach(), model.prompt.weight.grad.clone(), tail))
    for got, want in zip(*results):
        _close(got, want, device)


def test_a_prefix_equals_the_model_given_it_as_its_cache_on_the_device(tokenizer, tiny_llama, device):
    torch.manual_seed(2)
    model = get_prompt_model(tiny_llama.to(device), PromptTuningConfig(num_virtual_tokens=4, method="prefix",
                                                                       init="random"), tokenizer)
    ids, mask = _batch(tokenizer, device, "left")
    with torch.no_grad():
        shared = model.tail_logits(ids, mask, 3)
        model.engine.force_off("the model's own forward with the prefix as its cache")
        cached = model.tail_logits(ids, mask, 3)
    _close(shared, cached, device)


def test_a_mixed_batch_equals_each_task_alone_on_the_device(tiny_dirs, tmp_path, device):
    llama = tiny_dirs["llama"]
    prompts = {"words": random_checkpoint(tmp_path / "a", llama, get_task("rotten_tomatoes"), 4, "CAUSAL_LM", 1),
               "head": random_checkpoint(tmp_path / "b", llama, get_task("rotten_tomatoes"), 3, "SEQ_CLS", 2,
                                         "last_mean"),
               "prefix": random_checkpoint(tmp_path / "c", llama, get_task("rotten_tomatoes"), 2, "CAUSAL_LM", 3,
                                           method="prefix")}
    model = MultiTaskModel.from_pretrained(prompts, device=str(device))
    items = [(task, text) for text in TEXTS for task in prompts]
    for (task, text), got in zip(items, model.predict(items)):
        want = PromptedTask.from_pretrained(prompts[task], device=str(device)).predict([text])[0]
        assert got["label"] == want["label"]
        assert got["scores"] == pytest.approx(want["scores"], abs=10 * TOLERANCE[(device.type, torch.float32)])


def test_peft_gives_our_logits_on_the_device(tiny_dirs, tokenizer, tmp_path, device):
    torch.manual_seed(3)
    ours = get_prompt_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).to(device).eval(),
                            PromptTuningConfig(num_virtual_tokens=4), tokenizer)
    ours.save_pretrained(tmp_path / "ours")
    out, _ = export_peft(tmp_path / "ours", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).to(device).eval(),
                                            out).eval()
    ids, mask = _batch(tokenizer, device, "right")
    with torch.no_grad():
        mine = ours(ids, mask).logits
        peft_logits = theirs(input_ids=ids, attention_mask=mask).logits[:, 4:]
    _close(peft_logits[mask.bool()], mine[mask.bool()], device)


def test_save_and_load_keep_the_model_on_its_device(tiny_dirs, tokenizer, tmp_path, device):
    torch.manual_seed(4)
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).to(device).eval()
    ours = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=3), tokenizer)
    ours.save_pretrained(tmp_path / "saved")
    again = PromptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).to(device).eval(),
                                        tmp_path / "saved", tokenizer)
    assert again.device.type == device.type
    ids, mask = _batch(tokenizer, device)
    with torch.no_grad():
        assert torch.equal(ours(ids, mask).logits, again(ids, mask).logits)


def test_a_run_trains_and_predicts_on_the_device(tiny_dirs, tiny_csv, tmp_path, device):
    result = train(TrainConfig(model=tiny_dirs["llama"], data=tiny_csv, max_steps=3, eval_every=100, batch_size=8,
                               device=str(device), progress=False, output=str(tmp_path / "run")),
                   log=lambda *_: None)
    spec = json.loads((result.best_checkpoint / "softprompt.json").read_text())["spec"]
    assert spec["device"].startswith(device.type)
    task = PromptedTask.from_pretrained(result.best_checkpoint, device=str(device))
    assert task.model.device.type == device.type
    on_cpu = PromptedTask.from_pretrained(result.best_checkpoint, device="cpu").predict(TEXTS)
    for got, want in zip(task.predict(TEXTS), on_cpu):
        assert got["scores"] == pytest.approx(want["scores"], abs=10 * TOLERANCE[(device.type, torch.float32)])


# -- the device rule ------------------------------------------------------------------------------------------
def _pretend_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr("softprompt.spec.gpu_supports_bf16", lambda device: bf16)
    monkeypatch.setattr("softprompt.spec.gpu_name", lambda device: "a test GPU")


def test_the_device_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    for name, says in (("cuda", "torch sees no CUDA device here"), ("cuda:0", "torch sees no CUDA device here"),
                       ("gpu", "--device must be auto, cpu, cuda or cuda:N")):
        with pytest.raises(SoftpromptError, match=says):
            resolve_device(name)
    _pretend_gpus(monkeypatch, 2)
    assert resolve_device("auto", rank=1) == torch.device("cuda", 1)  # each launcher rank its own GPU
    assert resolve_device("auto", rank=3) == torch.device("cuda", 1)
    assert resolve_device("cuda", rank=1) == torch.device("cuda", 1) and resolve_device("cuda:0") == torch.device(
        "cuda", 0)
    for name, says in (("cuda:2", "has 2 CUDA device"), ("cuda:x", "must be a number"), ("cuda:-1", "0 or more")):
        with pytest.raises(SoftpromptError, match=says):
            resolve_device(name)


def test_a_device_that_is_not_there_is_one_line(tiny_dirs, tiny_csv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(["train", "--model", tiny_dirs["llama"], "--data", tiny_csv, "--device", "cuda",
                        "--output", tmp_path / "o", "--no-progress"], capsys)
    _assert_clean_error(code, err, "--device cuda: torch sees no CUDA device here", tmp_path / "o")
    code, _, err = run(["predict", "runs/none", "x", "--device", "cuda:3"], capsys)
    _assert_clean_error(code, err, "--device cuda:3")


def test_precision_on_a_gpu_is_decided_with_its_reason(tiny_dirs, monkeypatch):
    info, task = describe_model(tiny_dirs["llama"]), get_task("sst2")
    gpu = torch.device("cuda", 0)
    _pretend_gpus(monkeypatch, 1, bf16=True)
    spec = resolve(TrainConfig(model=tiny_dirs["llama"], max_steps=2), info, task, device=gpu)
    assert (spec.bf16, spec.fp16, spec.tf32, spec.device) == (True, False, True, "cuda:0")
    assert "bf16" in spec.decided["bf16"] and "TF32" in spec.decided["tf32"]  # under a step budget too, on a GPU
    _pretend_gpus(monkeypatch, 1, bf16=False)
    spec = resolve(TrainConfig(model=tiny_dirs["llama"], max_steps=2), info, task, device=gpu)
    assert (spec.bf16, spec.fp16, spec.precision) == (False, True, "fp16") and "loss scaling" in spec.decided["fp16"]
    with pytest.raises(SoftpromptError, match="--bf16: a test GPU has no bf16"):
        resolve(TrainConfig(model=tiny_dirs["llama"], bf16=True), info, task, device=gpu)
    assert resolve(TrainConfig(model=tiny_dirs["llama"], bf16=False), info, task, device=gpu).precision == "fp32"


def test_running_out_of_memory_says_what_fits_and_keeps_last(tiny_dirs, tiny_csv, tmp_path, monkeypatch):
    cfg = TrainConfig(model=tiny_dirs["llama"], data=tiny_csv, max_steps=6, eval_every=100, batch_size=8,
                      save_every=1, progress=False, output=str(tmp_path / "run"))
    trainer = prepare(cfg, log=lambda *_: None)
    loss = trainer.loss

    def failing(features):
        if trainer.state["step"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss(features)

    monkeypatch.setattr(trainer, "loss", failing)
    with pytest.raises(SoftpromptError, match=r"out of memory on cpu at step 3 with --batch-size 8 .* about 4 rows "
                                              r"fit: --batch-size 4 --grad-accum 2 keeps the batch\. .*last holds "
                                              r"the step before; continue with softprompt train --resume"):
        trainer.train()
    saved = json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())
    assert saved["counters"]["step"] == 2
    again = train(TrainConfig(output=str(tmp_path / "run"), progress=False), resume=True, log=lambda *_: None)
    assert again.step == 6
