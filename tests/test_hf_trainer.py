"""A prompted model trained by transformers' Trainer: only the prompt (and head) move, checkpoints are
softprompt's (nothing pickled with save_only_model), and load_best_model_at_end loads the best of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from softprompt import PromptedTask, PromptModel, PromptTuningConfig, TrainConfig, get_prompt_model
from softprompt.checkpoint import load_tensors, read_checkpoint
from softprompt.hf_trainer import PromptTrainer, TaskCollator
from softprompt.training import prepare


def _first_eval_is_best():
    """A metric that is highest at the first evaluation, so the best checkpoint is not the last one."""
    calls = []

    def metric(_):
        calls.append(None)
        return {"marker": 1.0 if len(calls) == 1 else 0.0}

    return metric


@pytest.mark.parametrize("model,task_type", [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_trainer_trains_the_prompt_and_saves_softprompt_checkpoints(tiny_dirs, tiny_csv, tmp_path, model, task_type):
    cfg = TrainConfig(model=tiny_dirs[model], data=tiny_csv, task_type=task_type, prompt_length=3, max_length=24,
                      output=str(tmp_path / "spec"), progress=False, residual_reparam=0)
    run = prepare(cfg, log=lambda _: None)
    prompted, splits = run.prompted, run.splits
    frozen = {k: v.clone() for k, v in prompted.model.base.state_dict().items()
              if not (prompted.model.head_name and k.startswith(prompted.model.head_name + "."))}
    start = {k: v.clone() for k, v in prompted.model.state_tensors().items()}
    out = tmp_path / "hf"
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, learning_rate=0.1,
                             eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="marker", greater_is_better=True, save_only_model=True,
                             report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0)
    encode = prompted.encoder.encode_all
    trainer = PromptTrainer(task=prompted, args=args, data_collator=TaskCollator(prompted.encoder),
                            train_dataset=encode(splits.train), eval_dataset=encode(splits.dev),
                            compute_metrics=_first_eval_is_best())
    trainer.train()

    after = prompted.model.base.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # the backbone did not move
    saved = {step: load_tensors(out / f"checkpoint-{step}") for step in (2, 4)}
    for name, value in start.items():  # the prompt (and head) did
        assert not torch.equal(saved[4][name], value)
    for step in (2, 4):
        folder = out / f"checkpoint-{step}"
        assert read_checkpoint(folder).spec == prompted.spec and read_checkpoint(folder).step == step
        assert not [f for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth")]  # nothing pickled
    assert Path(trainer.state.best_model_checkpoint) == out / "checkpoint-2"
    now = prompted.model.state_tensors()
    assert all(torch.equal(now[k], saved[2][k]) for k in now)  # load_best_model_at_end loaded step 2's
    assert not torch.equal(now["prompt"], saved[4]["prompt"])

    trainer.save_model()  # into output_dir, which holds the checkpoint-N folders: they stay
    assert (out / "checkpoint-2").is_dir() and read_checkpoint(out).step == 4
    examples = splits.dev[:4]
    assert torch.equal(PromptedTask.from_pretrained(out).scores(examples), prompted.scores(examples))


def test_bare_prompt_model_and_resume(tiny_llama, tokenizer, tmp_path):
    model = get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=3), tokenizer)
    rows = [tokenizer("the film was good positive")["input_ids"]] * 8
    data = [{"input_ids": r, "labels": r} for r in rows]

    def collator(batch):
        ids = torch.tensor([b["input_ids"] for b in batch])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def run(steps, resume=None):
        args = TrainingArguments(output_dir=str(tmp_path / "bare"), max_steps=steps, per_device_train_batch_size=4,
                                 learning_rate=0.1, save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                                 seed=0)
        trainer = PromptTrainer(model=model, args=args, data_collator=collator, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    run(2)
    checkpoint = tmp_path / "bare" / "checkpoint-2"
    assert read_checkpoint(checkpoint).spec is None
    reloaded = PromptModel.from_pretrained(type(tiny_llama)(tiny_llama.config), checkpoint)
    assert torch.equal(reloaded.prompt.weight, model.prompt.weight)
    with torch.no_grad():
        model.prompt.weight.zero_()
    run(2, resume=str(checkpoint))  # nothing left to train: what resuming loads is what stays
    assert torch.equal(model.prompt.weight, reloaded.prompt.weight)
