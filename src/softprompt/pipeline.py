"""A prompted model bound to its task: build one for training, rebuild one from a checkpoint, predict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .assets import load_backbone, load_config
from .checkpoint import check_base, read_meta
from .config import PromptTuningConfig, TaskType
from .data import Example, to_examples
from .encoding import TaskEncoder, pad
from .errors import SoftpromptError
from .metrics import compute_metrics
from .models import PromptModel, family_of, get_prompt_model
from .scoring import predictions, score
from .tasks import TaskSpec


def default_task_type(model_name: str, task: TaskSpec) -> TaskType:
    """Encoders classify with a head; decoders and encoder-decoders generate label words (regression: head)."""
    _, config = load_config(model_name)
    family = family_of(config)
    if family == "encoder" or task.is_regression:
        return TaskType.SEQ_CLS
    return TaskType.CAUSAL_LM if family == "decoder" else TaskType.SEQ_2_SEQ_LM


@dataclass
class PromptedTask:
    model: PromptModel
    encoder: TaskEncoder
    task: TaskSpec
    base_name: str

    @classmethod
    def build(cls, model_name: str, task: TaskSpec, prompt: PromptTuningConfig, max_length: int = 128,
              corpus: Iterable[str] | None = None, seed: int = 0) -> "PromptedTask":
        backbone = load_backbone(model_name, prompt.task_type, num_labels=max(len(task.labels), 1),
                                 regression=task.is_regression)
        limit = getattr(backbone.model.config, "max_position_embeddings", None)
        if limit and max_length + prompt.num_virtual_tokens > limit:
            max_length = limit - prompt.num_virtual_tokens
        encoder = TaskEncoder(backbone.tokenizer, task, prompt.task_type, max_length, prompt.pooling == "siamese")
        generator = torch.Generator().manual_seed(seed)
        model = get_prompt_model(backbone.model, prompt, backbone.tokenizer, corpus, generator)
        return cls(model, encoder, task, model_name)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, model_name: str | None = None) -> "PromptedTask":
        """Everything comes from the folder; `model_name` only points at another copy of the same base."""
        meta = read_meta(directory)
        name = model_name or meta["base_model"]
        _, config = load_config(name)
        check_base(meta, config, name)
        prompt = PromptTuningConfig.from_dict({**meta["prompt"], "init": "random"})
        task = TaskSpec.from_dict(meta["task"])
        backbone = load_backbone(name, prompt.task_type, num_labels=max(len(task.labels), 1),
                                 regression=task.is_regression)
        model = get_prompt_model(backbone.model, prompt, backbone.tokenizer)
        model.load_prompt(directory)
        if meta.get("training", {}).get("bf16"):
            model.freeze_in(torch.bfloat16)  # scored as it was trained and evaluated
        encoder = TaskEncoder(backbone.tokenizer, task, prompt.task_type, meta.get("max_length", 128),
                              prompt.pooling == "siamese")
        return cls(model.eval(), encoder, task, meta["base_model"])

    def _examples(self, inputs: list[str | dict[str, Any] | Example]) -> list[Example]:
        return [i if isinstance(i, Example) else to_examples([i], self.task.fields)[0] for i in inputs]

    def scores(self, examples: list[Example], batch_size: int = 32, progress=None) -> torch.Tensor:
        return score(self.model, self.encoder, self.encoder.encode_all(examples), batch_size, progress)

    def evaluate(self, examples: list[Example], batch_size: int = 32, progress=None) -> dict[str, float]:
        return self.evaluate_with_predictions(examples, batch_size, progress)[0]

    def evaluate_with_predictions(self, examples: list[Example], batch_size: int = 32,
                                  progress=None) -> tuple[dict[str, float], list]:
        """The task's metrics and the predictions they came from (class ids, or values for regression)."""
        if not examples or any(e.label is None for e in examples):
            raise SoftpromptError("evaluation needs labelled examples")
        preds = predictions(self.scores(examples, batch_size, progress))
        return compute_metrics(self.task.metrics, preds, [e.label for e in examples]), preds

    def generate(self, inputs: list[str | dict[str, Any] | Example], max_new_tokens: int = 20,
                 batch_size: int = 32) -> list[str]:
        """Free text after prompt + template (decoders trained with label words), greedy, cut at end-of-text."""
        if self.encoder.task_type is not TaskType.CAUSAL_LM:
            raise SoftpromptError("generation needs a decoder checkpoint trained with label words (CAUSAL_LM)")
        features, tokenizer, texts = self.encoder.encode_all(self._examples(inputs)), self.encoder.tokenizer, []
        for start in range(0, len(features), batch_size):
            ids, mask = pad([f.input_ids for f in features[start:start + batch_size]], tokenizer.pad_token_id)
            with torch.inference_mode():
                new = self.model.generate(ids, mask, max_new_tokens=max_new_tokens)
            for row in new.tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def predict(self, inputs: list[str | dict[str, Any] | Example], batch_size: int = 32) -> list[dict[str, Any]]:
        """One dict per input: the label and per-label probabilities (or the value, for regression).

        Inputs are plain strings (single-text tasks), dicts keyed by the task's fields, or Examples.
        """
        scores = self.scores(self._examples(inputs), batch_size)
        if self.task.is_regression:
            return [{"value": float(v)} for v in scores]
        probs = torch.softmax(scores, dim=-1)
        return [{"label": self.task.labels[int(p.argmax())],
                 "scores": {name: round(float(x), 6) for name, x in zip(self.task.labels, p)}} for p in probs]
