"""peft prompt-tuning adapters in and out: the same prompt (and classifier head) under peft's names.

A peft adapter folder is `adapter_config.json` + `adapter_model.safetensors`, the prompt under
`prompt_embeddings` and a SEQ_CLS head (peft's `modules_to_save`) under `base_model.<head>.<param>`. An export
is both at once: `PeftModel.from_pretrained(base, folder)` loads it, and the `softprompt.json` written beside it
keeps the task (template, label words, run spec), so `softprompt eval` and `softprompt import` read it back
exactly. An adapter trained in peft has no task: it loads onto a base model (`PromptModel.from_pretrained`,
`--init-file`) or becomes a bare checkpoint (`softprompt import --model`).

Where peft and softprompt place the prompt the same way, their logits are the same: decoders on unpadded or
right-padded batches (peft prepends the prompt to the whole padded row and counts positions from 0, so on a
left-padded row the text's positions shift by its padding; softprompt left-aligns rows and counts real tokens
only), and encoder-decoders (the prompt leads the encoder input in both). Encoders differ: softprompt puts the
prompt right after [CLS], which the head pools; peft puts it before [CLS], so peft's head pools the first virtual
token instead. Such an adapter loads in peft but scores differently there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from .assets import describe_model
from .checkpoint import META_FILE, Checkpoint, file_sha256, fingerprint, load_tensors, read_checkpoint, save_checkpoint
from .config import PromptTuningConfig, TaskType
from .errors import SoftpromptError
from .families import family_of
from .methods import get_method
from .tensor_names import (HEAD_NAMES, PEFT_CONFIG_FILE, PEFT_TENSOR_FILE, from_peft_tensors, read_peft_tensors,
                           to_peft_tensors)


def head_name(model_config) -> str:
    """The attribute the model's sequence-classification class keeps its head in (built on the meta device: no
    weights are loaded)."""
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(model_config)
    return next(n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module))


def peft_config(prompt: PromptTuningConfig, model_config, base_path: str | None, head: str | None) -> dict[str, Any]:
    """adapter_config.json: the method's own fields (methods/<name>/method.py), the base model and the head."""
    make = get_method(prompt.method).peft_config
    if make is None:
        raise SoftpromptError(f"method {prompt.method} has no peft equivalent to export to")
    return {**make(prompt, model_config), "base_model_name_or_path": base_path, "revision": None,
            "inference_mode": True, "modules_to_save": [head] if head else None}


def layout_note(family: str) -> str:
    """Where peft's logits for an exported prompt equal softprompt's, in one line."""
    if family == "encoder":
        return ("note: peft puts the prompt before [CLS], softprompt right after it, so peft scores this adapter "
                "differently from softprompt (the tensors are the same)")
    if family == "decoder":
        return ("note: peft gives softprompt's logits on unpadded or right-padded batches (on left-padded rows "
                "peft shifts the text's positions by the padding)")
    return "note: peft gives softprompt's logits (the prompt leads the encoder input in both)"


def export_peft(checkpoint_dir: str | Path, output: str | Path) -> tuple[Path, str]:
    """Write the checkpoint in `checkpoint_dir` as a peft adapter folder (with softprompt.json beside it);
    returns the folder and the layout note for its family."""
    meta = read_checkpoint(checkpoint_dir)
    if meta.prompt.pooling != "cls":
        raise SoftpromptError(f"{checkpoint_dir} pools the text by {meta.prompt.pooling!r}; peft's models pool as the "
                              "model does (an encoder's first token, a decoder's last), so this prompt has no peft "
                              "equivalent: train with --pooling cls to export one")
    if meta.base_model is None:
        raise SoftpromptError(f"{checkpoint_dir} does not record its base model; peft needs one")
    model = describe_model(meta.base_model)
    head = head_name(model.config) if meta.prompt.task_type is TaskType.SEQ_CLS else None
    tensors = to_peft_tensors(load_tensors(checkpoint_dir, meta), get_method(meta.prompt.method).tensor_key, head)
    config = peft_config(meta.prompt, model.config, model.path, head)
    path = save_checkpoint(output, meta, tensors, tensor_file=PEFT_TENSOR_FILE, extra_json={PEFT_CONFIG_FILE: config})
    return path, layout_note(meta.family)


def read_peft(directory: str | Path, model_config=None, model_name: str | None = None
              ) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """The checkpoint and tensors (softprompt's names) of a peft adapter folder. One softprompt exported keeps its
    own record while its tensors are the ones exported; any other needs its base model's config (`model_config`,
    else the one `model_name` or the adapter's base_model_name_or_path loads)."""
    directory = Path(directory)
    if (directory / META_FILE).is_file():
        meta = read_checkpoint(directory)
        if meta.files.get(PEFT_TENSOR_FILE) == file_sha256(directory / PEFT_TENSOR_FILE):
            return meta, load_tensors(directory, meta)
    raw = _adapter_config(directory)
    if raw.get("num_transformer_submodules") not in (None, 1) and raw.get("task_type") == "SEQ_2_SEQ_LM":
        raise SoftpromptError(f"{directory} also prompts the decoder (num_transformer_submodules "
                              f"{raw['num_transformer_submodules']}); softprompt prompts the encoder only")
    prompt = PromptTuningConfig.from_dict(raw)
    name = model_name or prompt.base_model_name_or_path
    if model_config is None:
        if not name:
            raise SoftpromptError(f"{directory} does not say which base model it was trained on; give one (--model)")
        model_config = describe_model(name).config
    tensors = from_peft_tensors(read_peft_tensors(directory), get_method(prompt.method).tensor_key)
    return Checkpoint(prompt, family_of(model_config), name, fingerprint(model_config)), tensors


def import_peft(directory: str | Path, output: str | Path, model: str | None = None) -> Path:
    """A softprompt checkpoint folder of the peft adapter in `directory`."""
    meta, tensors = read_peft(directory, model_name=model)
    return save_checkpoint(output, meta, tensors)


def _adapter_config(directory: Path) -> dict[str, Any]:
    try:
        raw = json.loads((directory / PEFT_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SoftpromptError(f"cannot read {directory / PEFT_CONFIG_FILE} ({err})") from None
    if not isinstance(raw, dict):
        raise SoftpromptError(f"{directory / PEFT_CONFIG_FILE} is not a peft adapter config")
    return raw
