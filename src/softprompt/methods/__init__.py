"""Prompt tuning's relatives: what a method adds while training, folded away before anything is saved.

`ptuning`: a prompt encoder over trainable input vectors (P-tuning); `prefix`: keys and values at every layer
(prefix tuning), optionally through a projection MLP. peft's module and parameter names are kept, so the same
parameters give the same vectors as peft's."""

from .prefix import PREFIX_KEY, KVLayout, PrefixKeyValues, PrefixProjection, kv_layout
from .ptuning import PromptEncoder, prompt_encoder

__all__ = ["PREFIX_KEY", "KVLayout", "PrefixKeyValues", "PrefixProjection", "kv_layout", "PromptEncoder",
           "prompt_encoder"]
