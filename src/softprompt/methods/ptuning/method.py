"""P-tuning's registration: input vectors out of a prompt encoder while training, folded into plain vectors at save,
so a P-tuning checkpoint serves and exports as prompt tuning; peft's P_TUNING adapters read as this method."""

from __future__ import annotations

from typing import Any

from .. import INPUT_VECTORS, Method, register
from ..prompt.method import prompt_tuning_adapter
from ..prompt.model import PROMPT_KEY
from .model import prompt_encoder

LR = 1e-3  # AdamW through the encoder: at 3e-2 it collapsed to one class (docs/recipe.md#defaults)


def reparameterise(model: Any, config: Any) -> None:
    model.prompt.set_reparam(prompt_encoder(config, model.embedding_matrix().shape[1]))


def rate(family: str) -> float:
    return LR


PTUNING = register(Method(
    name="ptuning", summary="input vectors from a prompt encoder while training (P-tuning)",
    contributes=INPUT_VECTORS, tensor_key=PROMPT_KEY, peft_type="P_TUNING", reparameterise=reparameterise, lr=rate,
    lr_reason=f"{LR} through P-tuning's encoder, which collapsed at 3e-2",
    fields=("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"),
    peft_config=prompt_tuning_adapter))
