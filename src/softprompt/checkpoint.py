"""Checkpoints: the prompt (and head) as safetensors plus one JSON that rebuilds everything else.

A folder holds `prompt.safetensors` (KB-sized) and `softprompt.json` (base model, task, template,
verbalizer, settings, metrics). A resumable one adds `trainer_state.safetensors`/`.json` (optimizer,
schedule, RNG). Folders are written beside their target and renamed into place, so a crash or
Ctrl-C never leaves a half-written checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import SoftpromptError
from .models import PromptModel

META_FILE = "softprompt.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
TRAINING_PROMPT = "training_prompt."
FORMAT = 1


def fingerprint(model_config) -> dict[str, Any]:
    """What must match between the model a prompt was trained on and the one it is loaded into."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return {
        "model_type": model_config.model_type,
        "hidden_size": getattr(text, "hidden_size", None) or getattr(text, "d_model", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "num_layers": getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None),
    }


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        plain["state"][str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain["state"][str(pid)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict = {int(pid): dict(entries) for pid, entries in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _write_atomic(directory: Path, write) -> None:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        write(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(directory: str | Path, model: PromptModel, meta: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write prompt + meta (+ optimizer/scheduler/RNG state for resuming) as one atomic folder."""
    meta = {"format": FORMAT, "family": model.family, "prompt": model.config.to_dict(),
            "base_fingerprint": fingerprint(model.base.config), **meta}

    def write(tmp: Path) -> None:
        model.save_prompt(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if trainer_state is not None:
            tensors, plain = _flatten_optimizer(trainer_state["optimizer"])
            tensors["rng.torch"] = trainer_state["rng"]
            # the prompt before folding, with its reparameterisation, so training resumes where it was
            tensors.update({f"{TRAINING_PROMPT}{k}": v.detach().contiguous().cpu()
                            for k, v in model.prompt.state_dict().items()})
            save_file(tensors, str(tmp / STATE_TENSORS))
            rest = {k: v for k, v in trainer_state.items() if k not in ("optimizer", "rng")}
            (tmp / STATE_JSON).write_text(json.dumps({"optimizer": plain, **rest}, indent=2, default=str))

    _write_atomic(Path(directory), write)
    return Path(directory)


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise SoftpromptError(f"{directory} is not a softprompt checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SoftpromptError(f"{path} is not valid JSON; the checkpoint is damaged") from None
    if meta.get("format") != FORMAT:
        raise SoftpromptError(f"{path} has checkpoint format {meta.get('format')}, this softprompt reads {FORMAT}")
    return meta


def read_trainer_state(directory: str | Path) -> dict[str, Any] | None:
    directory = Path(directory)
    if not (directory / STATE_JSON).is_file():
        return None
    tensors = load_file(str(directory / STATE_TENSORS))
    rest = json.loads((directory / STATE_JSON).read_text())
    rest["optimizer"] = _unflatten_optimizer(tensors, rest["optimizer"])
    rest["rng"] = tensors["rng.torch"]
    rest["prompt"] = {k[len(TRAINING_PROMPT):]: v for k, v in tensors.items() if k.startswith(TRAINING_PROMPT)}
    return rest


def check_base(meta: dict[str, Any], model_config, model_name: str) -> None:
    """Refuse a base model the prompt was not trained for: a prompt means nothing in another embedding space."""
    want, got = meta["base_fingerprint"], fingerprint(model_config)
    diffs = [f"{k} {want[k]} vs {got[k]}" for k in want if want[k] != got.get(k)]
    if diffs:
        raise SoftpromptError(
            f"checkpoint was trained on {meta['base_model']!r}, which does not match {model_name!r} "
            f"({'; '.join(diffs)}); use the checkpoint's own base model"
        )
