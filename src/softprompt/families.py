"""What softprompt knows about a base model from its config alone: its family, what each family can do, how a
head may read it, how many positions it has. A leaf: nothing here loads weights or needs torch.

Three families: encoders (bidirectional, masked-LM pretrained: BERT, RoBERTa, MiniLM) classify with a head;
decoders (everything causal) read label words or a head; encoder-decoders (T5) read label words.
"""

from __future__ import annotations

from typing import Any

from .config import TaskType
from .errors import SoftpromptError

FAMILIES = ("encoder", "decoder", "seq2seq")

TASK_TYPES = {
    "encoder": {TaskType.SEQ_CLS},
    "decoder": {TaskType.SEQ_CLS, TaskType.CAUSAL_LM},
    "seq2seq": {TaskType.SEQ_2_SEQ_LM},  # T5ForSequenceClassification cannot take inputs_embeds
}

# which families' heads each pooling can read (cls, the model's own, reads every family's)
POOLING_READERS = {"mean": ("encoder", "decoder"), "siamese": ("encoder",), "last_mean": ("decoder",)}


def text_config(config: Any) -> Any:
    """The config of the text model: a multimodal config's text part, or the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_of(config: Any) -> str:
    """encoder (bidirectional, masked-LM pretrained), seq2seq, or decoder (everything causal)."""
    # deferred: transformers' model mappings import torch, which reading a config does not need
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES  # deferred: torch

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    return "decoder"


def max_positions(config: Any) -> int | None:
    """How many positions the model has (absolute position embeddings), or None where it does not say."""
    text = text_config(config)
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def hidden_size(config: Any) -> int | None:
    text = text_config(config)
    return getattr(text, "hidden_size", None) or getattr(text, "d_model", None)


def check_task_type(family: str, task_type: TaskType, model_type: str) -> None:
    if task_type not in TASK_TYPES[family]:
        names = ", ".join(sorted(t.value for t in TASK_TYPES[family]))
        raise SoftpromptError(f"a {family} model ({model_type}) supports task type {names}, not {task_type.value}")


def check_pooling(family: str, pooling: str | None, head: bool) -> None:
    """Pooling is how a head reads the model's states; asked for where it does not apply, it would be quietly
    ignored, so it is refused."""
    if pooling in (None, "cls"):
        return
    if not head:
        raise SoftpromptError(f"--pooling {pooling} sets how a head reads the model; this run reads label words "
                              "(add --task-type SEQ_CLS for a head, or leave --pooling out)")
    readers = POOLING_READERS[pooling]
    if family not in readers:
        raise SoftpromptError(f"--pooling {pooling} is for {' and '.join(r + 's' for r in readers)}' heads; "
                              f"this {family}'s head cannot take it: leave --pooling out")


def check_prompt_length(num_virtual_tokens: int, positions: int | None, name: str) -> None:
    """A prompt must leave the input some of the model's positions (a prefix's rows count theirs from k too)."""
    if positions and num_virtual_tokens >= positions:
        raise SoftpromptError(f"a prompt of {num_virtual_tokens} virtual tokens leaves no room for input in "
                              f"{name}'s {positions} positions; use a shorter --prompt-length")
