"""The prefix's keys/values: computed from the source and kept until it changes, handed to a model as its
transformers cache, and stacked for a batch whose rows follow different prefixes."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple, cast

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from .sharing import cache_argument
from .sources import InputVectors, KeyValues, Kind, LayerKV, PrefixSource


class KeptPrefix(NamedTuple):
    """The prefix's per-layer keys/values (batch 1) and, for input vectors, its last hidden state, computed from
    the source at `version`."""

    version: Hashable
    layers: LayerKV
    last: torch.Tensor | None


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only (pads before the first real token get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def frozen_dtype(base: PreTrainedModel) -> torch.dtype:
    """The frozen weights' dtype: what the prefix's keys/values take, as the rows' own keys/values come in it."""
    return cast(nn.Embedding, base.get_input_embeddings()).weight.dtype


def cache_layers(cache: DynamicCache) -> LayerKV:
    """A filled cache's per-layer (keys, values); every layer of a cache the engine runs holds both."""
    layers = cast(list[CacheLayerMixin], cache.layers)
    return [(cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values)) for layer in layers]


def prefix_states(base: PreTrainedModel, source: PrefixSource, kind: Kind, kept: KeptPrefix | None) -> KeptPrefix:
    """The prefix's states: `kept` when gradients are off and it is of the source's current version, else
    computed anew (key/value sources cast to the frozen weights' dtype; input vectors run through the backbone
    as a batch of one). The caller keeps what comes back under no_grad."""
    version = source.version()
    if not torch.is_grad_enabled() and kept is not None and kept.version == version:
        return kept
    dtype = frozen_dtype(base)
    if kind == "key_values":
        layers = [(keys.to(dtype), values.to(dtype)) for keys, values in cast(KeyValues, source).key_values()]
        return KeptPrefix(version, layers, None)
    cache = DynamicCache(config=base.config)
    prompt = cast(InputVectors, source).embeddings()
    positions = torch.arange(source.num_tokens, device=prompt.device)[None]
    out = base.base_model(inputs_embeds=prompt[None].to(dtype), position_ids=positions, use_cache=True,
                          **cache_argument(base, cache))
    return KeptPrefix(version, cache_layers(cache), out.last_hidden_state[:, -1:])


def filled_cache(base: PreTrainedModel, layers: LayerKV, rows: int, dtype: torch.dtype | None = None) -> DynamicCache:
    """A transformers cache holding `layers` (each batch 1, or already `rows`) for `rows` rows, cast to `dtype`
    if given (as they are otherwise: under autocast a cache's keys/values are not in the weights' dtype)."""
    cache = DynamicCache(config=base.config)
    for i, (keys, values) in enumerate(layers):
        keys, values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        cache.update(keys, values, i)
    return cache


def as_cache(base: PreTrainedModel, layers: LayerKV, rows: int) -> DynamicCache:
    """`filled_cache` in the frozen weights' dtype: a source's keys/values train in fp32 beside bf16 weights."""
    return filled_cache(base, layers, rows, frozen_dtype(base))


def cache_forward(base: PreTrainedModel, source: KeyValues, ids: torch.Tensor, mask: torch.Tensor,
                  model: nn.Module | None = None, **kwargs: Any) -> Any:
    """`model` (default: `base`)'s own forward over left-aligned rows with the key/value `source` as its cache, one
    copy per row (how peft runs prefix tuning)."""
    k, rows = source.num_tokens, ids.shape[0]
    full_mask = torch.cat([mask.new_ones(rows, k), mask], 1)
    return (model or base)(input_ids=ids, attention_mask=full_mask, position_ids=positions_from_mask(full_mask)[:, k:],
                           **cache_argument(base, as_cache(base, source.key_values(), rows)), **kwargs)


def stack_prefixes(prefixes: list[LayerKV], owner: torch.Tensor) -> tuple[LayerKV, torch.Tensor]:
    """Keys/values for a batch whose rows follow different prefixes (several tasks in one batch): row i gets
    prefixes[owner[i]] (each batch 1), right-aligned in the longest one's length K, so that it ends where the
    row's own tokens begin. Returns them (B rows) and the (B, K) mask of the slots each row's prefix fills."""
    lengths = torch.tensor([layers[0][0].shape[2] for layers in prefixes], device=owner.device)
    longest = int(lengths.max())
    stacked = []
    for layer in zip(*prefixes):  # one layer of every prefix: ((keys, values), ...)
        keys, values = (torch.cat([nn.functional.pad(kv[part], (0, 0, longest - kv[part].shape[2], 0)) for kv in layer])
                        for part in (0, 1))
        stacked.append((keys[owner], values[owner]))
    slots = torch.arange(longest, device=owner.device).unsqueeze(0)
    return stacked, (slots >= (longest - lengths[owner]).unsqueeze(1)).long()
