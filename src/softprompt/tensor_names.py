"""What tensors and files are called, in a softprompt checkpoint and in a peft adapter, and the mapping between them.

A checkpoint's `prompt.safetensors` holds a method's tensor under its own name (`Method.tensor_key`: `prompt` for
input vectors, `prefix` for keys/values) and a head's weights as `head.<param>`. A peft adapter's
`adapter_model.safetensors` holds the same tensor as `prompt_embeddings` and a head (peft's `modules_to_save`) as
`base_model.<head attribute>.<param>`, beside `adapter_config.json`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import SoftpromptError

HEAD_NAMES = ("classifier", "score", "classification_head")  # where transformers' classes keep a head
HEAD_PREFIX = "head."
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_TENSOR_FILE = "adapter_model.safetensors"
PEFT_PROMPT_KEY = "prompt_embeddings"
PEFT_HEAD_PREFIX = "base_model."  # peft's saved name of a module to save: base_model.<module>.<param>


def is_peft_adapter(path: str | Path) -> bool:
    return (Path(path) / PEFT_CONFIG_FILE).is_file()


def to_peft_tensors(tensors: dict[str, torch.Tensor], tensor_key: str, head_name: str | None
                    ) -> dict[str, torch.Tensor]:
    """softprompt's names -> peft's: the method's tensor (`tensor_key`) -> `prompt_embeddings`, `head.x` ->
    `base_model.<head_name>.x`."""
    out = {PEFT_PROMPT_KEY: tensors[tensor_key]}
    for name, value in tensors.items():
        if name.startswith(HEAD_PREFIX):
            out[f"{PEFT_HEAD_PREFIX}{head_name}.{name[len(HEAD_PREFIX):]}"] = value
    return out


def from_peft_tensors(tensors: dict[str, torch.Tensor], tensor_key: str) -> dict[str, torch.Tensor]:
    """peft's names -> softprompt's (`prompt_embeddings` -> `tensor_key`); anything else (another method's weights)
    is refused."""
    if PEFT_PROMPT_KEY not in tensors:
        raise SoftpromptError(f"the peft adapter holds no '{PEFT_PROMPT_KEY}': not a prompt-tuning adapter")
    out = {tensor_key: tensors[PEFT_PROMPT_KEY]}
    for name, value in tensors.items():
        module, _, param = name[len(PEFT_HEAD_PREFIX):].partition(".")
        if name.startswith(PEFT_HEAD_PREFIX) and module in HEAD_NAMES:
            out[f"{HEAD_PREFIX}{param}"] = value
        elif name != PEFT_PROMPT_KEY:
            raise SoftpromptError(f"the peft adapter holds {name!r}, which a prompt-tuning adapter for softprompt "
                                  f"cannot have (a prompt and a classifier head named {', '.join(HEAD_NAMES)})")
    return out


def read_peft_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a peft adapter folder, under peft's names (safetensors only: never a pickled .bin)."""
    path = Path(directory) / PEFT_TENSOR_FILE
    if not path.is_file():
        raise SoftpromptError(f"{directory} has no {PEFT_TENSOR_FILE} (a peft adapter saved as .bin is pickle, "
                              "which softprompt does not read; save it with safe_serialization=True)")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise SoftpromptError(f"{path} cannot be read ({err})") from None
