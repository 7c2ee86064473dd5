"""Prompt tuning's registration: input vectors, stored as `prompt`, a peft PROMPT_TUNING adapter."""

from __future__ import annotations

from typing import Any

from ...families import hidden_size
from .. import INPUT_VECTORS, Method, register
from .model import PROMPT_KEY


def prompt_tuning_adapter(prompt: Any, model_config: Any) -> dict[str, Any]:
    """A PROMPT_TUNING adapter_config.json for input vectors. The init is written as RANDOM: the trained prompt
    replaces it on load, and a TEXT init would make peft load a tokenizer for nothing."""
    return {"peft_type": "PROMPT_TUNING", "task_type": prompt.task_type.value,
            "num_virtual_tokens": prompt.num_virtual_tokens, "token_dim": hidden_size(model_config),
            "num_transformer_submodules": 1,  # the encoder's prompt only, for encoder-decoders too
            "num_attention_heads": None, "num_layers": None, "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
            "auto_mapping": None}


PROMPT = register(Method(
    name="prompt", summary="input vectors (prompt tuning)", contributes=INPUT_VECTORS, tensor_key=PROMPT_KEY,
    peft_type="PROMPT_TUNING", fields=("residual_reparam",), peft_config=prompt_tuning_adapter))
