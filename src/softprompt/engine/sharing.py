"""Whether a model may share a prefix across a batch, from its config and layers alone.

The engine models plain causal attention over a plain transformers cache, and an LM head whose only extra is a
constant rescaling. What it does not model is refused here; what no config says (a bias, a custom kernel) is
left to the probe (probe.py)."""

from __future__ import annotations

import inspect

from torch import nn
from transformers import DynamicCache, PreTrainedModel

from .sources import PrefixSource


def cache_kwarg(model: nn.Module) -> str | None:
    """The model's name for the cache argument (transformers renamed past_key_values to cache)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def cache_argument(base: PreTrainedModel, cache: DynamicCache) -> dict[str, DynamicCache]:
    """`cache` as the backbone's keyword argument; `cannot_share` refuses a backbone that takes none."""
    name = cache_kwarg(base.base_model)
    if name is None:
        raise TypeError(f"{type(base.base_model).__name__} takes no cache")
    return {name: cache}


def cannot_share(base: PreTrainedModel, source: PrefixSource) -> str | None:
    """Why `base` cannot share `source` across a batch (None: it can; a sliding window is checked per call,
    `fits_window`, and the model's own forward once, by the probe)."""
    config = base.config.get_text_config()
    if not source.num_tokens:
        return "no prompt to share"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return "logit soft-capping"
    if any(name.endswith("sinks") for name, _ in base.named_parameters()):
        return "attention sinks"
    try:
        layers = DynamicCache(config=base.config).layers
    except Exception as error:  # noqa: BLE001 - a config transformers' cache cannot lay out
        return f"no standard cache for it ({type(error).__name__}: {error})"
    if any("LinearAttention" in type(layer).__name__ for layer in layers):
        return "state-space or linear-attention layers"  # a packed row's state would run on into the next
    if cache_kwarg(base.base_model) is None:
        return f"{type(base.base_model).__name__} takes no cache"
    return None


def sliding_window(base: PreTrainedModel) -> int | None:
    return getattr(base.config.get_text_config(), "sliding_window", None)


def fits_window(base: PreTrainedModel, tokens: int) -> bool:
    """Whether `tokens` (prefix + row) fit the model's sliding window, if it has one: then the window hides nothing,
    and attention is the full causal attention the shared prefix computes."""
    window = sliding_window(base)
    return not window or tokens <= window
