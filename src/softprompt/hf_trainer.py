"""A prompted model inside transformers' `Trainer`: its optimizer, schedule, logging, evaluation and launchers,
with softprompt checkpoints.

`Trainer` sees a `PromptModel` as any module: only the prompt (and a head) require gradients, so only they are
optimised. What it would save is the whole state dict, backbone included, plus a pickled `training_args.bin`;
`PromptTrainer` saves a softprompt checkpoint instead (KB, safetensors, the run spec when a `PromptedTask` is
given) and reads one back for `load_best_model_at_end` and `resume_from_checkpoint`. With
`save_only_model=True` a checkpoint-N folder holds nothing pickled; without it, Trainer adds its own
optimizer/scheduler/RNG files (torch pickles, needed for its resume) beside ours.

    prompted = PromptedTask.build(spec)       # or get_prompt_model(hf_model, config, tokenizer)
    trainer = PromptTrainer(task=prompted, args=TrainingArguments(...), data_collator=TaskCollator(prompted.encoder),
                            train_dataset=prompted.encoder.encode_all(train), eval_dataset=...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from .checkpoint import load_tensors, read_checkpoint
from .encoding import Feature, TaskEncoder, collate
from .errors import SoftpromptError
from .models import PromptModel
from .pipeline import PromptedTask

__all__ = ["PromptTrainer", "TaskCollator"]


class TaskCollator:
    """Batches of a task's encoded rows (`TaskEncoder.encode_all`), padded as softprompt's own loop pads them."""

    def __init__(self, encoder: TaskEncoder) -> None:
        self.encoder = encoder

    def __call__(self, features: list[Feature]) -> dict[str, torch.Tensor]:
        return collate(features, self.encoder)


class PromptTrainer(Trainer):
    """`transformers.Trainer` whose checkpoints are softprompt checkpoints. Give `task` (a `PromptedTask`: the
    checkpoints then record its run spec and load with `PromptedTask.from_pretrained`) or `model` (a
    `PromptModel`: bare checkpoints, for `PromptModel.from_pretrained`)."""

    def __init__(self, model: PromptModel | None = None, *args: Any, task: PromptedTask | None = None,
                 **kwargs: Any) -> None:
        if task is not None:
            model = model or task.model
            if model is not task.model:
                raise SoftpromptError("give task or model, not two different models")
        if not isinstance(model, PromptModel):
            raise SoftpromptError("PromptTrainer trains a PromptModel (get_prompt_model) or a PromptedTask (task=)")
        self.task = task
        super().__init__(model, *args, **kwargs)

    @property
    def prompt_model(self) -> PromptModel:
        return self.accelerator.unwrap_model(self.model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output = Path(output_dir or str(self.args.output_dir))
        if self.task is not None:
            self.task.save_pretrained(output, step=self.state.global_step)
        else:
            self.prompt_model.save_pretrained(output)

    def _load_prompt(self, directory: str) -> None:
        meta = read_checkpoint(directory)
        self.prompt_model.load_tensors(load_tensors(directory, meta))

    def _load_best_model(self) -> None:
        self.prompt_model.prompt.fold()  # training is over: the prompt as checkpoints hold it (P-tuning, a projection)
        self._load_prompt(str(self.state.best_model_checkpoint))  # set by Trainer before it calls this

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.prompt_model.prompt.reparam is not None:
            raise SoftpromptError("a checkpoint holds the folded prompt, not the encoder or projection this run trains "
                                  "through; resume such a run with softprompt's own trainer (softprompt train "
                                  "--resume), whose last/ keeps it")
        self._load_prompt(resume_from_checkpoint)
