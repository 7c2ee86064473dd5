"""Which adapter wraps a model: the family's own for input-vector methods, the method's own otherwise; and
`get_prompt_model`, the peft-style entry point that builds one.

Each family module registers its adapter here when it is imported (`register_family`), and each method in
methods/ registers itself; nothing here imports an adapter, so the adapters can build through this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

import torch
from transformers import AutoTokenizer, PreTrainedModel

from ..config import PromptTuningConfig, TaskType
from ..errors import SoftpromptError
from ..families import check_pooling, check_prompt_length, check_task_type, family_of, max_positions
from ..methods import INPUT_VECTORS, get_method

if TYPE_CHECKING:
    from .base import PromptModel

Adapter = TypeVar("Adapter")
_FAMILY_ADAPTERS: dict[str, Any] = {}  # family -> the adapter class that splices input vectors into its models


def register_family(family: str) -> Callable[[Adapter], Adapter]:
    def register(cls: Adapter) -> Adapter:
        _FAMILY_ADAPTERS[family] = cls
        return cls

    return register


def adapter_class(family: str, method: str) -> Any:
    """The adapter for a `family` model prompted by `method`, or an error saying the method cannot plug into it."""
    entry = get_method(method)
    if family in entry.adapters:
        return entry.adapters[family]
    if entry.contributes == INPUT_VECTORS:
        return _FAMILY_ADAPTERS[family]
    raise SoftpromptError(f"method {method} has no adapter for {family} models "
                          f"(it has for: {', '.join(entry.adapters) or 'none'})")


def get_prompt_model(
    model: PreTrainedModel,
    config: PromptTuningConfig,
    tokenizer=None,
    corpus: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
    initialise: bool = True,
) -> "PromptModel":
    """Wrap `model` (frozen from here on) with a soft prompt initialised as `config.init` says.

    `corpus` (e.g. the training texts) is where token frequencies for vocabulary init are counted. Without a
    `tokenizer`, inits that need one load `config.tokenizer_name_or_path` (as peft does). `initialise=False`
    leaves the prompt at zeros for a checkpoint to fill (and no training reparameterisation on it).
    """
    family = family_of(model.config)
    check_task_type(family, config.task_type, model.config.model_type)
    check_prompt_length(config.num_virtual_tokens, max_positions(model.config), model.config.model_type)
    check_pooling(family, config.pooling, config.task_type is TaskType.SEQ_CLS)
    if family == "decoder" and config.task_type is TaskType.SEQ_CLS and model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(tokenizer, "pad_token_id", None) or 0  # pooling needs one defined
    if tokenizer is None and config.tokenizer_name_or_path and initialise:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    wrapped = adapter_class(family, config.method)(model, config, tokenizer)
    if config.num_virtual_tokens and initialise:
        wrapped.init_prompt(corpus, generator)
    reparameterise = get_method(config.method).reparameterise
    if initialise and reparameterise is not None:  # a checkpoint loads the folded prompt
        reparameterise(wrapped, config)
    return wrapped
