"""The frozen weights a multi-task model shares: one copy per precision in use, and heads built around them."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from ..assets import Backbone, ModelInfo, head_config, load_backbone
from ..config import TaskType
from ..spec import RunSpec

SHARED_TYPE = {"decoder": TaskType.CAUSAL_LM, "encoder": TaskType.SEQ_CLS, "seq2seq": TaskType.SEQ_2_SEQ_LM}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Backbones:
    """The base model loaded once (decoders and encoder-decoders with their LM head, which text-to-text prompts
    share whole; encoders only the backbone, every task having its own head) on `device`, held in each precision a
    prompt asks for: the loaded copy for the first, cast in place; another precision loads the weights once more."""

    def __init__(self, info: ModelInfo, trust_remote_code: bool, device: torch.device) -> None:
        self.info, self.trust_remote_code, self.device = info, trust_remote_code, device
        loaded = self._load()
        self._spare: nn.Module | None = loaded.model.eval()  # loaded, not yet held for a precision
        self.tokenizer = loaded.tokenizer
        self._head_dtype = next(loaded.model.parameters()).dtype
        self.held: dict[str, nn.Module] = {}  # precision (RunSpec.precision) -> the frozen weights in it
        self._lock = threading.Lock()  # builds share the weights: one at a time

    def _load(self) -> Backbone:
        loaded = load_backbone(self.info, SHARED_TYPE[self.info.family])
        loaded.model.to(self.device)
        return loaded

    def weights(self, precision: str) -> nn.Module:
        """The frozen weights in one precision (RunSpec.precision), held from now on."""
        with self._lock:
            return self._weights(precision)

    def _weights(self, precision: str) -> nn.Module:
        if precision not in self.held:
            model = self._spare if self._spare is not None else self._load().model.eval()
            self._spare = None
            for param in model.parameters():
                param.data = param.data.to(DTYPES[precision])
            self.held[precision] = model
        return self.held[precision]

    def build(self, spec: RunSpec, build: Any) -> Any:
        """`build(backbone)` under the lock, with the backbone `spec` runs on: the shared model itself for
        text-to-text prompts; for a head, a model of the task's head class whose backbone is the shared one (only
        the head is new: built empty on the meta device, then filled from the checkpoint)."""
        with self._lock:
            shared = self._weights(spec.precision)
            if spec.task_type is not TaskType.SEQ_CLS:
                return build(Backbone(shared, self.tokenizer, self.info.name))
            config = head_config(self.info.config, len(spec.task.labels), spec.task.is_regression)
            if getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = self.tokenizer.pad_token_id
            with torch.device("meta"):
                wrapper = AutoModelForSequenceClassification.from_config(
                    config, trust_remote_code=self.trust_remote_code, dtype=self._head_dtype)
            prefix = wrapper.base_model_prefix
            setattr(wrapper, prefix, shared.base_model)
            device = next(shared.parameters()).device
            for name, child in wrapper.named_children():
                if name != prefix:
                    child.to_empty(device=device)
            return build(Backbone(wrapper.eval(), self.tokenizer, self.info.name))
