"""Prompted models, one adapter per model family; `get_prompt_model` picks the right one."""

from .base import PromptModel
from .decoder import DecoderPromptModel
from .encoder import EncoderPromptModel
from .registry import adapter_class, get_prompt_model
from .seq2seq import Seq2SeqPromptModel

__all__ = [
    "PromptModel",
    "EncoderPromptModel",
    "DecoderPromptModel",
    "Seq2SeqPromptModel",
    "adapter_class",
    "get_prompt_model",
]
