"""A prompted model bound to its task: build one from a resolved run spec, rebuild one from a checkpoint, predict."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, cast

import torch

from .assets import Backbone, ModelInfo, describe_model, load_backbone
from .checkpoint import Checkpoint, TrainerState, fingerprint, load_tensors, read_checkpoint, save_checkpoint
from .config import TaskType
from .data import Example, to_examples
from .devices import resolve_device
from .encoding import TaskEncoder, pad
from .errors import SoftpromptError
from .hub import local_folder, push_saved
from .metrics import compute_metrics
from .models import DecoderPromptModel, PromptModel, get_prompt_model
from .precision import check_dtype
from .scoring import check_finite, labelled, predictions, score
from .spec import RunSpec
from .tasks import TaskSpec


@dataclass
class PromptedTask:
    model: PromptModel
    encoder: TaskEncoder
    spec: RunSpec
    base_config: Any  # the base model's transformers config, for the checkpoint's fingerprint

    @property
    def task(self) -> TaskSpec:
        return self.spec.task

    @property
    def base_name(self) -> str:
        return self.spec.model

    @classmethod
    def build(cls, spec: RunSpec, model: ModelInfo | None = None, corpus: Iterable[str] | None = None,
              initialise: bool = True, backbone: Backbone | None = None) -> "PromptedTask":
        """The base model with a fresh prompt as `spec` says, on its device and in its precision (`model`: its
        config, already loaded; `backbone`: the weights with the task's head, already loaded, e.g. a backbone
        shared by several tasks)."""
        model = model or describe_model(spec.model, spec.trust_remote_code)
        task = spec.task
        backbone = backbone or load_backbone(model, spec.task_type, num_labels=max(len(task.labels), 1),
                                             regression=task.is_regression)
        encoder = TaskEncoder(backbone.tokenizer, task, spec.task_type, spec.max_length,
                              spec.prompt.pooling == "siamese", spec.truncation)
        generator = torch.Generator().manual_seed(spec.seed)
        prompted = get_prompt_model(backbone.model, spec.prompt, backbone.tokenizer, corpus, generator, initialise)
        prompted.to(torch.device(spec.device))
        if spec.bf16 or spec.fp16:
            prompted.freeze_in(torch.bfloat16 if spec.bf16 else torch.float16)  # scored as trained and evaluated
        return cls(prompted, encoder, spec, model.config)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, model: str | None = None, trust_remote_code: bool = False,
                        dtype: str | None = None, device: str | None = "auto") -> "PromptedTask":
        """Everything comes from the checkpoint folder (or a hub repo holding one); `model` only points at
        another copy of the same base. The frozen weights run in the precision the prompt was trained and
        evaluated in, unless `dtype` ("bf16" or "fp32") says otherwise, on `device` (the device rule: a GPU when
        there is one). Code from the base model's repository runs only when the caller says so, whatever the
        checkpoint recorded."""
        check_dtype(dtype)
        where = resolve_device(device)  # a device that is not there is refused before anything is read
        directory, meta, spec = read_task_checkpoint(checkpoint, trust_remote_code)
        info = describe_model(model or spec.model, trust_remote_code)
        meta.check_base(info.config, info.name)
        spec = replace(spec, trust_remote_code=trust_remote_code, device=str(where))
        if dtype is not None:
            spec = replace(spec, bf16=dtype == "bf16", fp16=False)
        prompted = cls.build(spec, info, initialise=False)
        prompted.model.load_tensors(load_tensors(directory, meta))
        prompted.model.eval()
        return prompted

    def checkpoint(self, step: int | None = None, metrics: dict[str, Any] | None = None) -> Checkpoint:
        return Checkpoint(self.spec.prompt, self.model.family, self.spec.model, fingerprint(self.base_config),
                          self.spec, step, metrics or {})

    def save_pretrained(self, directory: str | Path, step: int | None = None, metrics: dict[str, Any] | None = None,
                        trainer_state: TrainerState | None = None) -> Path:
        """One checkpoint folder, written atomically: the prompt (and head), the run spec, metrics."""
        return save_checkpoint(directory, self.checkpoint(step, metrics), self.model.state_tensors(), trainer_state)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "softprompt checkpoint") -> str:
        """Upload this prompt as a checkpoint (what `save_pretrained` writes) to the hub repo `repo_id`, which
        `from_pretrained(repo_id)` then reads; returns the commit's URL."""
        return push_saved(self.save_pretrained, repo_id, private, token, commit_message)


    def scores(self, examples: list[Example], batch_size: int = 32) -> torch.Tensor:
        return check_finite(score(self.model, self.encoder, self.encoder.encode_all(examples), batch_size))

    def evaluate(self, examples: list[Example], batch_size: int = 32) -> dict[str, float]:
        return self.evaluate_with_predictions(examples, batch_size)[0]

    def evaluate_with_predictions(self, examples: list[Example], batch_size: int = 32) -> tuple[dict[str, float], list]:
        """The task's metrics and the predictions they came from (class ids, or values for regression)."""
        if not examples or any(e.label is None for e in examples):
            raise SoftpromptError("evaluation needs labelled examples")
        preds = predictions(self.scores(examples, batch_size))
        return compute_metrics(self.task.metrics, preds, [e.label for e in examples]), preds

    def generate(self, inputs: list[str | dict[str, Any] | Example], max_new_tokens: int = 20,
                 batch_size: int = 32) -> list[str]:
        """Free text after prompt + template (decoders trained with label words), greedy, cut at end-of-text."""
        if self.encoder.task_type is not TaskType.CAUSAL_LM:
            raise SoftpromptError("generation needs a decoder checkpoint trained with label words (CAUSAL_LM)")
        features, tokenizer = self.encoder.encode_all(to_examples(inputs, self.task.fields)), self.encoder.tokenizer
        texts: list[str] = []
        for start in range(0, len(features), batch_size):
            ids, mask = pad([f.input_ids for f in features[start:start + batch_size]], tokenizer.pad_token_id)
            ids, mask = ids.to(self.model.device), mask.to(self.model.device)
            with torch.inference_mode():
                new = cast(DecoderPromptModel, self.model).generate(ids, mask, max_new_tokens=max_new_tokens)
            texts.extend(decode_generated(tokenizer, row) for row in new.tolist())
        return texts

    def predict(self, inputs: list[str | dict[str, Any] | Example], batch_size: int = 32) -> list[dict[str, Any]]:
        """One dict per input: the label and per-label probabilities (or the value, for regression).

        Inputs are plain strings (single-text tasks), dicts keyed by the task's fields, or Examples.
        """
        scores = self.scores(to_examples(inputs, self.task.fields), batch_size)
        if self.task.is_regression:
            return [{"value": float(v)} for v in scores]
        return [labelled(self.task.labels, p) for p in torch.softmax(scores, dim=-1)]


def decode_generated(tokenizer, ids: list[int]) -> str:
    """Generated ids as text, cut at the first end-of-text."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def read_task_checkpoint(checkpoint: str | Path, trust_remote_code: bool = False) -> tuple[Path, Checkpoint, RunSpec]:
    """The folder of a checkpoint of a task (a folder, or a hub repo id fetched) and its metadata, refused before
    anything loads where it has no task or needs code from the base model's repository the caller did not allow."""
    directory = local_folder(checkpoint)
    meta = read_checkpoint(directory)
    if meta.spec is None:
        raise SoftpromptError(f"{checkpoint} holds a bare prompt with no task; load it with "
                              "PromptModel.from_pretrained(base_model, folder)")
    if meta.spec.trust_remote_code and not trust_remote_code:
        raise SoftpromptError(f"{checkpoint} was trained on a model that runs code from its repository; pass "
                              "--trust-remote-code (trust_remote_code=True) if you trust it")
    return directory, meta, meta.spec
