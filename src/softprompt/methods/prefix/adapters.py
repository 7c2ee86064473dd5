"""How a prefix (`PrefixKeyValues`, model.py) plugs into each family: keys and values at every layer.

Decoders run it through the shared-prefix engine as a `KeyValues` source: label words, the LM and rank losses,
rank classification, a head (over the last token, the text's mean, or both) and greedy generation run the rows
once after one copy of it per batch. A call the engine cannot share (a model whose cache or head it does not
model, a batch past a sliding window) runs the model's own forward with the prefix as its cache instead (a
pooling of its own over the backbone's states); sampling is refused.
Encoders (BERT, RoBERTa, MiniLM) take it as every layer's cache, as peft does: each row attends to the prefix
and to its own tokens, whose positions count from k. T5 takes it in its encoder's self-attention layers (their
relative position bias then counts the rows' tokens from k); the decoder is untouched, as with a prompt. There
is no concatenated sequence: keys/values are not tokens. All start from the keys/values the frozen model
computes for the prompt init's vectors (Li & Liang start a prefix from real words' activations), or from
another prefix (`init="file"`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, cast

import torch
from transformers import DynamicCache, GenerationMixin

from ...checkpoint import load_prompt_file
from ...config import PromptInit, TaskType
from ...engine import LayerKV, SharedPrefix, as_cache, cache_kwarg, cache_layers
from ...errors import SoftpromptError
from ...models.base import PromptModel, align_order
from ...models.decoder import DecoderPromptModel
from ...models.encoder import EncoderPromptModel
from ...models.seq2seq import Seq2SeqPromptModel
from ..prompt.init import initial_prompt
from ..prompt.model import SoftPrompt
from .model import PREFIX_KEY, PrefixKeyValues, kv_layout


def _new_prefix(model: PromptModel) -> PrefixKeyValues:
    return PrefixKeyValues(model.config.num_virtual_tokens, kv_layout(model.base.config))


def _start_prefix(model: PromptModel, prefix: PrefixKeyValues, corpus, generator,
                  run: Callable[[SoftPrompt], LayerKV] | None = None) -> None:
    """Set `prefix` from the keys/values the frozen model computes for the init's vectors (`run`: how this family
    gets them; default the backbone run over them with a cache), or from a prefix file."""
    config = model.config
    if config.init is PromptInit.FILE:
        start = load_prompt_file(str(config.init_file), PREFIX_KEY)
        if start.shape != prefix.weight.shape:
            raise SoftpromptError(f"the prefix in {config.init_file} has shape {tuple(start.shape)}, this model "
                                  f"needs {tuple(prefix.weight.shape)}: the same prefix length and base model")
        with torch.no_grad():
            prefix.weight.copy_(start)
        return
    vectors = initial_prompt(config, model.embedding_matrix(), model.tokenizer, corpus, generator)
    source = SoftPrompt(*vectors.shape).to(model.embedding_matrix().device)  # where the frozen model runs
    with torch.no_grad():
        source.weight.copy_(vectors)
        layers = run(source) if run else SharedPrefix(model.base, source).prefix_states()[0]
    prefix.set_key_values(layers)


def _cache_name(base) -> str:
    name = cache_kwarg(base.base_model)
    if name is None:
        raise SoftpromptError(f"prefix tuning needs a model that takes a key/value cache; "
                              f"{type(base.base_model).__name__} takes none")
    return name


class PrefixDecoderModel(DecoderPromptModel):
    prompt: PrefixKeyValues  # type: ignore[assignment]

    def __init__(self, base, config, tokenizer=None) -> None:
        super().__init__(base, config, tokenizer)
        _cache_name(base)

    def new_prompt(self) -> PrefixKeyValues:  # type: ignore[override]
        return _new_prefix(self)

    def init_prompt(self, corpus=None, generator=None) -> None:
        _start_prefix(self, self.prompt, corpus, generator)

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
        if self.config.task_type is TaskType.SEQ_CLS:
            kwargs.pop("num_items_in_batch", None)  # as the parent's: a head's loss is per row
            if self.config.pooling != "cls" or (not kwargs and self.shares(input_ids.shape[1])):
                return super().forward(input_ids, attention_mask, labels=labels, **kwargs)
        return self._cached(input_ids, attention_mask, labels, **kwargs)

    def _text_states(self, input_ids, attention_mask, **kwargs):
        """The rows' final states with the prefix as the backbone's cache (no virtual columns: all are text)."""
        ids, mask, _ = self._aligned(input_ids, attention_mask)
        return self.engine.cache_forward(ids, mask, model=self.base.base_model, **kwargs).last_hidden_state, mask

    def tail_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: int) -> torch.Tensor:
        ids, mask, _ = self._aligned(input_ids, attention_mask)
        if self.shares(ids.shape[1]):
            return self.engine.tail_logits(ids, mask, keep)
        return self.engine.cache_forward(ids, mask, logits_to_keep=keep).logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        if kwargs.get("do_sample") or not self.shares(input_ids.shape[1] + max_new_tokens):
            raise SoftpromptError("a prefix generates greedily through the shared prefix; sampling, or a model or "
                                  "length the shared prefix cannot take, is not supported yet")
        return super().generate(input_ids, attention_mask, max_new_tokens)


class PrefixEncoderModel(EncoderPromptModel):
    prompt: PrefixKeyValues  # type: ignore[assignment]

    def __init__(self, base, config, tokenizer=None) -> None:
        super().__init__(base, config, tokenizer)
        self.cache_name = _cache_name(base)

    def new_prompt(self) -> PrefixKeyValues:  # type: ignore[override]
        return _new_prefix(self)

    def init_prompt(self, corpus=None, generator=None) -> None:
        _start_prefix(self, self.prompt, corpus, generator)

    def spliced(self, input_ids, attention_mask=None, token_type_ids=None):
        """The rows with pads moved right, the mask over prefix + row, and the prefix as every layer's cache (one
        copy per row, as peft); every column of the output is the rows' own (the text's)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = align_order(attention_mask, self.pad_side)
        ids, mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        rows = ids.shape[0]
        inputs = {"input_ids": ids, "attention_mask": torch.cat([mask.new_ones(rows, self.prompt.num_tokens), mask], 1),
                  self.cache_name: as_cache(self.base, self.prompt.key_values(), rows)}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids.gather(1, order)
        return inputs, mask


class PrefixSeq2SeqModel(Seq2SeqPromptModel):
    """T5-style encoder-decoders: the encoder runs the rows after the prefix; the decoder reads the rows' states."""

    prompt: PrefixKeyValues  # type: ignore[assignment]

    def __init__(self, base, config, tokenizer=None) -> None:
        super().__init__(base, config, tokenizer)
        if not all(hasattr(getattr(block, "layer", [None])[0], "SelfAttention")
                   for block in getattr(base.get_encoder(), "block", [None])):
            raise SoftpromptError(f"prefix tuning on seq2seq models is implemented for T5-style encoders so far, "
                                  f"not {type(base).__name__}")

    def new_prompt(self) -> PrefixKeyValues:  # type: ignore[override]
        return _new_prefix(self)

    def init_prompt(self, corpus=None, generator=None) -> None:
        def run(source: SoftPrompt) -> LayerKV:
            cache = DynamicCache(config=self.base.config)
            with self._encoder_cache(cache):
                self.base.get_encoder()(inputs_embeds=source.embeddings()[None].to(self.embedding_matrix().dtype))
            return cache_layers(cache)

        _start_prefix(self, self.prompt, corpus, generator, run)

    @contextmanager
    def _encoder_cache(self, cache: DynamicCache) -> Iterator[None]:
        """Give each encoder self-attention layer `cache`: it attends to what the cache holds and appends its own
        keys/values (T5's encoder stack passes its layers no cache)."""
        hooks = [block.layer[0].SelfAttention.register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, "cache": cache}), with_kwargs=True)
            for block in self.base.get_encoder().block]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The rows (pads moved right) through the encoder after the prefix; their states and mask."""
        order = align_order(attention_mask, self.pad_side)
        ids, mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        with self._encoder_cache(as_cache(self.base, self.prompt.key_values(), ids.shape[0])):
            encoded = self.base.get_encoder()(input_ids=ids, attention_mask=torch.cat(
                [mask.new_ones(ids.shape[0], self.prompt.num_tokens), mask], 1))
        return encoded, mask

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        encoded, mask = self.encode(input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask)
        return self.base(encoder_outputs=encoded, attention_mask=mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        encoded, mask = self.encode(input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask)
        return cast(GenerationMixin, self.base).generate(encoder_outputs=encoded, attention_mask=mask, **kwargs)
