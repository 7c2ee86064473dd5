"""Prefix tuning's registration: keys/values at every layer through adapters of its own for each family, stored as
`prefix` in peft's flat layout, a peft PREFIX_TUNING adapter."""

from __future__ import annotations

from typing import Any

from ...errors import SoftpromptError
from ...families import family_of
from .. import KEY_VALUES, Method, register
from .adapters import PrefixDecoderModel, PrefixEncoderModel, PrefixSeq2SeqModel
from .model import PREFIX_KEY, kv_layout

LR = 1e-2  # AdamW for a decoder's prefix: above 3e-2 on SST-2 and RTE (docs/recipe.md#defaults)


def reparameterise(model: Any, config: Any) -> None:
    if config.prefix_projection:
        model.prompt.add_projection(config.encoder_hidden_size)


def rate(family: str) -> float | None:
    return LR if family == "decoder" else None  # an encoder's prefix kept 3e-2 (MRPC 77.70% against 76.47%)


def prefix_tuning_adapter(prompt: Any, model_config: Any) -> dict[str, Any]:
    """A PREFIX_TUNING adapter_config.json: the folded prefix is peft's without projection, in its flat layout."""
    family = family_of(model_config)
    if family != "decoder":
        raise SoftpromptError(f"this is a prefix for a {family} model; only decoder prefixes export (peft passes a "
                              "prefix as past_key_values, which BERT-style encoders do not take and which in T5 would "
                              "prefix the decoder too)")
    layout = kv_layout(model_config)
    width = layout.kv_heads * layout.head_dim
    return {"peft_type": "PREFIX_TUNING", "task_type": prompt.task_type.value,
            "num_virtual_tokens": prompt.num_virtual_tokens, "token_dim": width, "num_transformer_submodules": 1,
            "num_attention_heads": layout.kv_heads, "num_layers": layout.layers, "encoder_hidden_size": width,
            "prefix_projection": False}


PREFIX = register(Method(
    name="prefix", summary="keys and values at every layer (prefix tuning; T5: its encoder's)",
    contributes=KEY_VALUES, tensor_key=PREFIX_KEY, peft_type="PREFIX_TUNING",
    adapters={"decoder": PrefixDecoderModel, "encoder": PrefixEncoderModel, "seq2seq": PrefixSeq2SeqModel},
    reparameterise=reparameterise, lr=rate, lr_reason=f"{LR} for a decoder's prefix, which learned RTE there and "
    "not at 3e-2", fields=("prefix_projection", "encoder_hidden_size"), peft_config=prefix_tuning_adapter))
