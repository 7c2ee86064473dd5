"""What a prompt method hands the shared-prefix engine: input vectors or keys/values at every layer.

A method implements one of the two protocols below, so a new one touches neither the engine nor its callers.
This module imports nothing of softprompt's: the methods (methods/) take their types and `version()` from it.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal, Protocol, Union, runtime_checkable

import torch
from torch import nn

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (batch, kv_heads, length, head_dim)
Kind = Literal["input_vectors", "key_values"]


@runtime_checkable
class InputVectors(Protocol):
    """A prompt the model reads as k vectors in its input-embedding space, before each row (prompt tuning,
    P-tuning); `SoftPrompt` is one. They run through the model like tokens, so the last one's output state
    predicts each row's first real token."""

    @property
    def num_tokens(self) -> int: ...

    def version(self) -> Hashable:
        """Changes whenever `embeddings()` may: the engine keeps what it computed from them under this key."""

    def embeddings(self) -> torch.Tensor:
        """(k, d), in autograd's graph when training."""


@runtime_checkable
class KeyValues(Protocol):
    """A prompt given as keys and values at every attention layer (prefix tuning). Rows attend to them as to
    k earlier tokens and count their positions from k; there is no output state at the prefix, so nothing
    predicts a row's first real token (the LM loss refuses a label there)."""

    @property
    def num_tokens(self) -> int: ...

    def version(self) -> Hashable:
        """Changes whenever `key_values()` may."""

    def key_values(self) -> LayerKV:
        """Per layer (keys, values), each (1, kv_heads, k, head_dim), in autograd's graph when training."""


PrefixSource = Union[InputVectors, KeyValues]


def source_kind(source: object) -> Kind:
    """What `source` contributes; one with `key_values()` is taken as keys/values."""
    if isinstance(source, KeyValues):
        return "key_values"
    if isinstance(source, InputVectors):
        return "input_vectors"
    raise TypeError(f"a shared prefix takes input vectors or per-layer keys/values, not {type(source).__name__}")


def parameters_version(module: nn.Module) -> tuple:
    """A `version()` for a source that is a module: it changes when a parameter is replaced, moved, or changed in
    place (autograd's version counter), i.e. whenever what was computed from the parameters may be stale."""
    return tuple((p.data_ptr(), p._version, str(p.device)) for p in module.parameters())
