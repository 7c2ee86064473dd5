"""Prefix tuning (Li & Liang 2021; P-tuning v2, Liu et al. 2022): trainable keys and values at every layer.

`PrefixKeyValues` is a `KeyValues` source for the shared-prefix engine, which runs a decoder's rows after it once
per batch (peft copies the prefix once per row); encoders and T5's encoder take it as every layer's cache
(adapters.py). Its `weight` is peft's flat layout, (k, layers * 2 * kv_heads *
head_dim): per virtual token, layer 0's keys, layer 0's values, layer 1's keys, ..., each kv_heads x head_dim.
That is what a checkpoint stores under `prefix`, so it maps onto peft's `prompt_embeddings` as it is. While
training it may come from a `PrefixProjection` instead, folded into `weight` at save."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ...engine import LayerKV, parameters_version
from ...families import text_config

PREFIX_KEY = "prefix"  # the tensor a checkpoint stores the flat keys/values under


class KVLayout(NamedTuple):
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Columns of the flat prefix: keys and values of every layer."""
        return self.layers * 2 * self.kv_heads * self.head_dim


def kv_layout(model_config) -> KVLayout:
    """The shape of a decoder's cache, from its config (grouped-query attention: its key/value heads)."""
    text = text_config(model_config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or text.hidden_size // heads
    return KVLayout(text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads, head_dim)


class PrefixProjection(nn.Module):
    """Embedding -> Linear-Tanh-Linear to every layer's keys/values, peft's `prefix_projection` (names as its
    PrefixEncoder: `embedding`, `transform`): the prefix's parameters are shared through the MLP, which Li & Liang
    found steadier to train than the raw keys/values."""

    def __init__(self, num_tokens: int, layout: KVLayout, hidden: int | None = None) -> None:
        super().__init__()
        width = layout.kv_heads * layout.head_dim  # peft's token_dim under grouped-query attention
        self.embedding = nn.Embedding(num_tokens, width)
        self.transform = nn.Sequential(nn.Linear(width, hidden or width), nn.Tanh(),
                                       nn.Linear(hidden or width, layout.width))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


class PrefixKeyValues(nn.Module):
    """k virtual tokens' keys and values at every self-attention layer (a T5's: its encoder's)."""

    def __init__(self, num_tokens: int, layout: KVLayout) -> None:
        super().__init__()
        self.layout = layout
        self.weight = nn.Parameter(torch.zeros(num_tokens, layout.width))
        self.reparam: PrefixProjection | None = None  # named as SoftPrompt's, which the model's loading checks

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    def flat(self) -> torch.Tensor:
        """(k, layers * 2 * kv_heads * head_dim): the weight, or the projection's output while training."""
        return self.weight if self.reparam is None else self.reparam()

    @torch.no_grad()
    def served(self) -> torch.Tensor:
        """The flat prefix as a checkpoint stores it."""
        return self.flat()

    def version(self) -> tuple:
        return parameters_version(self)

    def key_values(self) -> LayerKV:
        layers, heads, dim = self.layout
        # unbound, not indexed: each index's backward would zero-fill a gradient the size of the whole prefix
        kv = self.flat().view(self.num_tokens, 2 * layers, heads, dim).permute(1, 2, 0, 3).unbind(0)  # (heads, k, dim)
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(layers)]

    @torch.no_grad()
    def set_key_values(self, layers: LayerKV) -> None:
        """Set the weight from per-layer (keys, values), each (1, kv_heads, k, head_dim): `key_values`'s inverse."""
        stacked = torch.stack([part[0] for layer in layers for part in layer])  # (2L, heads, k, dim)
        self.weight.copy_(stacked.permute(2, 0, 1, 3).reshape(self.num_tokens, -1).to(self.weight.dtype))

    def add_projection(self, hidden: int | None = None) -> None:
        """Train through a `PrefixProjection` (the weight rests until `fold`)."""
        self.reparam = PrefixProjection(self.num_tokens, self.layout, hidden).to(self.weight.device)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def fold(self) -> None:
        """Bake the projection into the weight (what a checkpoint stores) and drop it."""
        if self.reparam is not None:
            self.weight.copy_(self.reparam())
            self.reparam = None
            self.weight.requires_grad_(True)
