"""Prompted models, one wrapper per model family; `get_prompt_model` picks the right one."""

from .base import PromptModel
from .decoder import DecoderPromptModel
from .encoder import EncoderPromptModel
from .factory import check_pooling, check_task_type, family_of, get_prompt_model
from .seq2seq import Seq2SeqPromptModel

__all__ = [
    "PromptModel",
    "EncoderPromptModel",
    "DecoderPromptModel",
    "Seq2SeqPromptModel",
    "family_of",
    "check_pooling",
    "check_task_type",
    "get_prompt_model",
]
