"""Pick the family wrapper for a Hugging Face model: the peft-style entry point."""

from __future__ import annotations

from typing import Iterable, cast

import torch
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ..config import PromptTuningConfig, TaskType
from ..errors import SoftpromptError
from ..methods import PrefixKeyValues, prompt_encoder
from .base import PromptModel
from .decoder import DecoderPromptModel
from .encoder import EncoderPromptModel
from .prefix import PrefixDecoderModel, PrefixEncoderModel, PrefixSeq2SeqModel
from .seq2seq import Seq2SeqPromptModel

PREFIX_FAMILIES: dict[str, type[PromptModel]] = {"decoder": PrefixDecoderModel, "encoder": PrefixEncoderModel,
                                                  "seq2seq": PrefixSeq2SeqModel}
FAMILIES: dict[str, type[PromptModel]] = {
    "encoder": EncoderPromptModel,
    "decoder": DecoderPromptModel,
    "seq2seq": Seq2SeqPromptModel,
}


def family_of(model_config) -> str:
    """encoder (bidirectional, masked-LM pretrained), seq2seq, or decoder (everything causal)."""
    if getattr(model_config, "is_encoder_decoder", False):
        return "seq2seq"
    if model_config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    return "decoder"


TASK_TYPES = {
    "encoder": {TaskType.SEQ_CLS},
    "decoder": {TaskType.SEQ_CLS, TaskType.CAUSAL_LM},
    "seq2seq": {TaskType.SEQ_2_SEQ_LM},  # T5ForSequenceClassification cannot take inputs_embeds
}


def check_task_type(family: str, task_type: TaskType, model_type: str) -> None:
    if task_type not in TASK_TYPES[family]:
        names = ", ".join(sorted(t.value for t in TASK_TYPES[family]))
        raise SoftpromptError(f"a {family} model ({model_type}) supports task type {names}, not {task_type.value}")


def check_pooling(family: str, pooling: str | None, head: bool) -> None:
    """Pooling is how a head reads the model's states: mean reads an encoder's or a decoder's, siamese an
    encoder's only, last_mean a decoder's; asked for where it does not apply, it would be quietly ignored."""
    if pooling in (None, "cls"):
        return
    if not head:
        raise SoftpromptError(f"--pooling {pooling} sets how a head reads the model; this run reads label words "
                              "(add --task-type SEQ_CLS for a head, or leave --pooling out)")
    readers = {"mean": ("encoder", "decoder"), "siamese": ("encoder",), "last_mean": ("decoder",)}[pooling]
    if family not in readers:
        raise SoftpromptError(f"--pooling {pooling} is for {' and '.join(r + 's' for r in readers)}' heads; "
                              f"this {family}'s head cannot take it: leave --pooling out")


def check_method(family: str, config: PromptTuningConfig, model_config) -> None:
    """Refuse a prompt that leaves the input no positions (prefix tuning's rows count theirs from k too)."""
    text = model_config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if positions and config.num_virtual_tokens >= positions:
        raise SoftpromptError(f"{config.num_virtual_tokens} virtual tokens leave no room for input in "
                              f"{model_config.model_type}'s {positions} positions; use a shorter prompt")


def get_prompt_model(
    model: PreTrainedModel,
    config: PromptTuningConfig,
    tokenizer=None,
    corpus: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
    initialise: bool = True,
) -> PromptModel:
    """Wrap `model` (frozen from here on) with a soft prompt initialised as `config.init` says.

    `corpus` (e.g. the training texts) is where token frequencies for vocabulary init are counted. Without a
    `tokenizer`, inits that need one load `config.tokenizer_name_or_path` (as peft does). `initialise=False`
    leaves the prompt at zeros for a checkpoint to fill.
    """
    family = family_of(model.config)
    check_task_type(family, config.task_type, model.config.model_type)
    check_method(family, config, model.config)
    check_pooling(family, config.pooling, config.task_type is TaskType.SEQ_CLS)
    if family == "decoder" and config.task_type is TaskType.SEQ_CLS and model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(tokenizer, "pad_token_id", None) or 0  # pooling needs one defined
    if tokenizer is None and config.tokenizer_name_or_path and initialise:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    kind = PREFIX_FAMILIES[family] if config.method == "prefix" else FAMILIES[family]
    wrapped = kind(model, config, tokenizer)
    if config.num_virtual_tokens and initialise:
        wrapped.init_prompt(corpus, generator)
    if initialise:  # a method trains through its reparameterisation; a checkpoint loads the folded prompt
        if config.method == "ptuning":
            wrapped.prompt.set_reparam(prompt_encoder(config, wrapped.embedding_matrix().shape[1]))
        elif config.method == "prefix" and config.prefix_projection:
            cast(PrefixKeyValues, wrapped.prompt).add_projection(config.encoder_hidden_size)
    return wrapped
