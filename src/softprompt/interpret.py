"""What a trained prompt looks like from the vocabulary's side (Lester et al., 2021, section 7).

Each virtual token is compared by cosine similarity with every row of the frozen input-embedding
matrix; its nearest real tokens often name the task or its labels. Prompts of different runs on the
same base model are compared with each other the same way. A prefix (keys/values at every layer) has no
input vectors to compare; its per-layer norms show where it grew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from .methods import KEY_VALUES
from .engine import KeyValues
from .models import PromptModel


@dataclass
class Neighbour:
    token: str
    token_id: int
    cosine: float


def nearest_tokens(prompt: torch.Tensor, embeddings: torch.Tensor, tokenizer, top: int = 5) -> list[list[Neighbour]]:
    """For each virtual token (a row of `prompt`), the `top` vocabulary tokens closest by cosine."""
    prompt = torch.nn.functional.normalize(prompt.detach().float(), dim=-1)
    vocab = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
    values, ids = (prompt @ vocab.T).topk(min(top, vocab.shape[0]), dim=-1)
    return [[Neighbour(tokenizer.decode([int(i)]), int(i), round(float(v), 4)) for v, i in zip(row_v, row_i)]
            for row_v, row_i in zip(values, ids)]


def layer_norms(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[float, float]]:
    """For each layer's (keys, values), each (1, kv_heads, k, head_dim): the mean L2 norm of one virtual token's
    keys and of its values (over its heads)."""
    def norm(part: torch.Tensor) -> float:
        return round(float(part.detach().float().norm(dim=-1).mean()), 4)

    return [(norm(keys), norm(values)) for keys, values in layers]


def prompt_similarity(prompts: list[torch.Tensor]) -> list[list[float | None]]:
    """Cosine similarity between the mean virtual tokens of each pair of prompts (None where the hidden
    sizes differ: prompts of different base models share no space)."""
    means = [torch.nn.functional.normalize(p.detach().float().mean(0), dim=0) for p in prompts]
    return [[round(float(a @ b), 4) if a.shape == b.shape else None for b in means] for a in means]


@dataclass
class PromptView:
    """What `inspect` and the report show of a trained prompt: the nearest vocabulary tokens of each input vector
    (and the vectors, to compare prompts), or, for keys/values, their norms per layer."""

    neighbours: list[list[Neighbour]] | None = None
    vectors: torch.Tensor | None = None
    norms: list[tuple[float, float]] | None = None


def view(model: PromptModel, tokenizer, top: int = 5) -> PromptView:
    if model.method.contributes == KEY_VALUES:
        return PromptView(norms=layer_norms(cast(KeyValues, model.prompt).key_values()))
    weight = model.prompt.weight.detach()
    return PromptView(nearest_tokens(weight, model.embedding_matrix(), tokenizer, top), weight.clone())
