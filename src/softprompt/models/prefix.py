"""Prefix tuning on decoders: trainable keys and values at every layer, through the shared-prefix engine.

The prefix is a `KeyValues` source (methods/prefix.py): label words, the LM and rank losses, rank
classification, a head over the last token and greedy generation run the rows once after one copy of it per
batch. A call the engine cannot share (a model whose cache or head it does not model, a batch past a sliding
window) runs the model's own forward with the prefix as its cache instead, as peft does; sampling is refused.
There is no concatenated sequence: keys/values are not tokens.
"""

from __future__ import annotations

import torch

from ..config import PromptInit, TaskType
from ..errors import SoftpromptError
from ..methods import PREFIX_KEY, PrefixKeyValues, kv_layout
from ..prompt import SoftPrompt, initial_prompt, load_prompt_file
from .decoder import DecoderPromptModel
from .shared_prefix import SharedPrefix


class PrefixDecoderModel(DecoderPromptModel):
    prompt_key = PREFIX_KEY
    prompt: PrefixKeyValues  # type: ignore[assignment]

    def __init__(self, base, config, tokenizer=None) -> None:
        super().__init__(base, config, tokenizer)
        if self.engine._cache_kwarg() is None:
            raise SoftpromptError(f"prefix tuning needs a model that takes a key/value cache; "
                                  f"{type(base.base_model).__name__} takes none")

    def new_prompt(self) -> PrefixKeyValues:  # type: ignore[override]
        return PrefixKeyValues(self.config.num_virtual_tokens, kv_layout(self.base.config))

    def init_prompt(self, corpus=None, generator=None) -> None:
        """The keys/values the frozen model computes for the vectors prompt tuning would start from (Li & Liang
        start a prefix from real words' activations): rows first see the same context as under that prompt. With
        `init="file"`, another prefix of the same shape (prefix transfer)."""
        if self.config.init is PromptInit.FILE:
            prefix = load_prompt_file(str(self.config.init_file), PREFIX_KEY)
            if prefix.shape != self.prompt.weight.shape:
                raise SoftpromptError(f"the prefix in {self.config.init_file} has shape {tuple(prefix.shape)}, this "
                                      f"model needs {tuple(self.prompt.weight.shape)}: the same prefix length and "
                                      "base model")
            with torch.no_grad():
                self.prompt.weight.copy_(prefix)
            return
        vectors = initial_prompt(self.config, self.embedding_matrix(), self.tokenizer, corpus, generator)
        start = SoftPrompt(*vectors.shape).to(vectors.device)
        with torch.no_grad():
            start.weight.copy_(vectors)
            layers, _ = SharedPrefix(self.base, start).prefix_states()
        self.prompt.set_key_values(layers)

    def _cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels=None, **kwargs):
        """The model's own forward with the prefix as its cache, outputs in the caller's layout."""
        ids, mask, order = self._aligned(input_ids, attention_mask)
        per_token = self.config.task_type is TaskType.CAUSAL_LM
        if labels is not None:
            kwargs["labels"] = labels.gather(1, order) if per_token else labels
        out = self.engine.cache_forward(ids, mask, **kwargs)
        if per_token:
            back = torch.argsort(order, dim=1).unsqueeze(-1)
            out.logits = out.logits.gather(1, back.expand(-1, -1, out.logits.shape[-1]))
        return out

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if self.config.task_type is TaskType.SEQ_CLS and not kwargs and self._shares(input_ids.shape[1]):
            return super().forward(input_ids, attention_mask, labels=labels)
        return self._cached(input_ids, attention_mask, labels, **kwargs)

    def tail_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: int) -> torch.Tensor:
        ids, mask, _ = self._aligned(input_ids, attention_mask)
        if self._shares(ids.shape[1]):
            return self.engine.tail_logits(ids, mask, keep)
        return self.engine.cache_forward(ids, mask, logits_to_keep=keep).logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        if kwargs.get("do_sample") or not self._shares(input_ids.shape[1] + max_new_tokens):
            raise SoftpromptError("a prefix generates greedily through the shared prefix; sampling, or a model or "
                                  "length the shared prefix cannot take, is not supported yet")
        return super().generate(input_ids, attention_mask, max_new_tokens)
