"""Prompt methods, each registered once: what the rest of softprompt asks of a method.

A method is a folder `methods/<name>/`: `config.py` (its own settings, peft's names), `model.py` (its trainable
module and any reparameterisation it trains through, folded away at save), how it plugs into each family (input
vectors the family's adapter splices in, or keys/values at every layer through adapters of its own), and
`method.py`, which registers it here. The CLI, the resolver, checkpoints, peft interop, the multi-task model,
`inspect` and `report` read a method's entry, never its name, so a new method touches its folder alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import SoftpromptError

INPUT_VECTORS = "input_vectors"  # k vectors in the input-embedding space, read like tokens (prompt, P-tuning)
KEY_VALUES = "key_values"  # keys and values at every attention layer (prefix tuning)


def _no_rate(family: str) -> float | None:
    return None


@dataclass(frozen=True)
class Method:
    """One prompt method. `adapters`: the model class per family for a method whose prompt is not input vectors
    (input vectors go through each family's own adapter). `reparameterise(model, config)`: what a fresh model
    trains through (P-tuning's encoder, a prefix projection), folded into the stored tensor at save. `lr(family)`:
    its AdamW rate where it needs its own (None: the family's), with `lr_reason`. `fields`: the prompt settings
    (PromptTuningConfig / TrainConfig fields) only it reads, so that setting one without it is an error.
    `peft_config(prompt, model_config)`: the fields of a peft `adapter_config.json` holding its stored tensor."""

    name: str
    summary: str
    contributes: str
    tensor_key: str
    peft_type: str
    adapters: Mapping[str, Any] = field(default_factory=dict)
    reparameterise: Callable[[Any, Any], None] | None = None
    lr: Callable[[str], float | None] = _no_rate
    lr_reason: str = ""
    fields: tuple[str, ...] = ()
    peft_config: Callable[[Any, Any], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.contributes not in (INPUT_VECTORS, KEY_VALUES):
            raise ValueError(f"a method contributes {INPUT_VECTORS} or {KEY_VALUES}, not {self.contributes!r}")


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` available to every command and API under its name (once per name)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] != method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise SoftpromptError(f"--method must be one of {', '.join(_REGISTRY)}, not {name!r}")
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


def by_peft_type(peft_type: str) -> Method:
    """The method whose stored tensor a peft adapter of `peft_type` holds (the first registered for it)."""
    for method in _REGISTRY.values():
        if method.peft_type == peft_type:
            return method
    raise SoftpromptError(f"this is a peft {peft_type} adapter; softprompt reads "
                          f"{', '.join(sorted({m.peft_type for m in _REGISTRY.values()}))} ones")


def held_by(tensors: Any) -> str | None:
    """What a method's tensor among `tensors` is, and which methods store it so (e.g. "input vectors (method
    prompt or ptuning)"), for an error about a checkpoint of another method; None when there is none."""
    found = [m for m in _REGISTRY.values() if m.tensor_key in tensors]
    if not found:
        return None
    what = "keys/values at every layer" if found[0].contributes == KEY_VALUES else "input vectors"
    return f"{what} (method {' or '.join(m.name for m in found)})"
