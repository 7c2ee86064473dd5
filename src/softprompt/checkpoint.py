"""The checkpoint format, in one place: what a folder holds, written once and atomically, read by one function.

A checkpoint folder holds `prompt.safetensors` (the prompt the model sees, plus a head's weights; KB-sized)
and `softprompt.json`, a `Checkpoint`: the prompt config, the base model and a fingerprint of its config,
the run's resolved `RunSpec` when a training run wrote it, metrics, and the versions that wrote it, with a
SHA-256 of each tensor file. A resumable one (`last/`) adds the trainer state: `trainer_state.safetensors`
(optimizer moments, RNG, the prompt module as it trains, residual MLP included) and `trainer_state.json`.
Folders are written beside their target and renamed into place, so a crash never leaves a half-written one (a
non-empty folder that is not a checkpoint gets the files moved in instead, softprompt.json last).
Nothing is ever unpickled. Format 1 (softprompt 0.1.0 before the run spec) is still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from safetensors.torch import load_file, save_file

from .assets import ModelInfo
from .config import PromptTuningConfig
from .errors import SoftpromptError
from .families import hidden_size, text_config
from .methods import get_method, held_by
from .spec import RunSpec, TrainConfig, resolve
from .tasks import TaskSpec
from .tensor_names import (PEFT_CONFIG_FILE, PEFT_TENSOR_FILE, from_peft_tensors, is_peft_adapter,
                           read_peft_tensors)
from .version import __version__

FORMAT = 3
META_FILE = "softprompt.json"
TENSOR_FILE = "prompt.safetensors"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
# a run folder: the best checkpoint, the resumable last one, and the run's summary
BEST, LAST, RESULTS = "best", "last", "results.json"


def fingerprint(model_config) -> dict[str, Any]:
    """What must match between the model a prompt was trained on and the one it is loaded into."""
    text = text_config(model_config)
    return {
        "model_type": model_config.model_type,
        "hidden_size": hidden_size(model_config),
        "vocab_size": getattr(text, "vocab_size", None),
        "num_layers": getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None),
    }


def versions() -> dict[str, str]:
    return {"softprompt": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass(frozen=True)
class Checkpoint:
    """softprompt.json. `spec` is None for a bare prompt saved with `PromptModel.save_pretrained`."""

    prompt: PromptTuningConfig
    family: str
    base_model: str | None
    base_fingerprint: dict[str, Any]
    spec: RunSpec | None = None
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # tensor file -> SHA-256, filled in when written
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        spec = None if self.spec is None else {k: v for k, v in self.spec.to_dict().items() if k != "prompt"}
        return {"format": self.format, "prompt": self.prompt.to_dict(), "family": self.family,
                "base_model": self.base_model, "base_fingerprint": self.base_fingerprint, "spec": spec,
                "step": self.step, "metrics": self.metrics, "versions": self.versions, "files": self.files}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Checkpoint":
        prompt = PromptTuningConfig.from_dict(d["prompt"])
        spec = None if d.get("spec") is None else RunSpec.from_dict({**d["spec"], "prompt": d["prompt"]})
        return cls(prompt, d["family"], d.get("base_model"), d["base_fingerprint"], spec, d.get("step"),
                   d.get("metrics") or {}, d.get("versions") or {}, d.get("files") or {})

    def check_base(self, model_config, model_name: str) -> None:
        """Refuse a base model the prompt was not trained for: a prompt means nothing in another embedding space."""
        want, got = self.base_fingerprint, fingerprint(model_config)
        diffs = [f"{k} {want[k]} vs {got[k]}" for k in want if want[k] != got.get(k)]
        if diffs:
            raise SoftpromptError(
                f"checkpoint was trained on {self.base_model!r}, which does not match {model_name!r} "
                f"({'; '.join(diffs)}); use the checkpoint's own base model"
            )


@dataclass
class TrainerState:
    """What `--resume` restores besides the checkpoint: counters, optimizer, RNG, the prompt module as it trains."""

    counters: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]  # "torch" (the host's), "cuda" (the GPU's where the run used one)
    prompt_module: dict[str, torch.Tensor]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _write_atomic(directory: Path, write: Callable[[Path], None]) -> None:
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    except OSError as err:
        raise SoftpromptError(f"cannot write checkpoint {directory} ({err.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is meant to be shared
    old = directory.with_name(f".{directory.name}-old")
    try:
        write(tmp)
        if directory.is_dir() and not (directory / META_FILE).exists() and any(directory.iterdir()):
            # a folder holding other things (a Trainer's output_dir with its checkpoint-N folders) is kept: the
            # files move in, softprompt.json last, so the folder reads as a checkpoint only once it is whole
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == META_FILE):
                os.replace(f, directory / f.name)
        elif directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except OSError as err:
        if old.exists() and not directory.exists():
            os.replace(old, directory)
        raise SoftpromptError(f"cannot write checkpoint {directory} ({err.strerror or err}); the one there before is "
                              "intact") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint, tensors: dict[str, torch.Tensor],
                    trainer_state: TrainerState | None = None, tensor_file: str = TENSOR_FILE,
                    extra_json: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write one checkpoint folder (and the trainer state, for `last/`) atomically. `tensor_file` and `extra_json`
    (file name -> content) let the same folder be another library's format too (a peft adapter, peft_interop.py)."""

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / tensor_file))
        files = {tensor_file: file_sha256(tmp / tensor_file)}
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        if trainer_state is not None:
            state_tensors, plain = _flatten_optimizer(trainer_state.optimizer)
            state_tensors.update({f"rng.{name}": state for name, state in trainer_state.rng.items()})
            state_tensors.update({f"prompt_module.{k}": v.detach().contiguous().cpu()
                                  for k, v in trainer_state.prompt_module.items()})
            save_file(state_tensors, str(tmp / STATE_TENSORS))
            files[STATE_TENSORS] = file_sha256(tmp / STATE_TENSORS)
            (tmp / STATE_JSON).write_text(json.dumps({"optimizer": plain, "counters": trainer_state.counters},
                                                     indent=2))
        meta = replace(checkpoint, files=files, versions=checkpoint.versions or versions(), format=FORMAT)
        (tmp / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2))

    _write_atomic(Path(directory), write)
    return Path(directory)


def checkpoint_folder(path: Path) -> Path | None:
    """The checkpoint a folder stands for: itself, or a run folder's best/; None if neither."""
    for candidate in (path, path / BEST):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """The checkpoint in `directory`, checked: the one reader every consumer uses."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        if (Path(directory) / PEFT_CONFIG_FILE).is_file():
            raise SoftpromptError(f"{directory} is a peft adapter with no task: load it with "
                                  "PromptModel.from_pretrained("
                                  "base_model, folder), or make a checkpoint of it with softprompt import")
        raise SoftpromptError(f"{directory} is not a softprompt checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SoftpromptError(f"{path} is not valid JSON; the checkpoint is damaged") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(fmt, int):
        raise SoftpromptError(f"{path} has no checkpoint format; it is not a softprompt checkpoint")
    if fmt > FORMAT:
        raise SoftpromptError(f"{directory} was written by a newer softprompt (checkpoint format {fmt}; this one "
                              f"reads up to {FORMAT}): pip install -U softprompt")
    try:
        checkpoint = _from_format_1(meta) if fmt == 1 else Checkpoint.from_dict(meta)
    except (KeyError, TypeError, ValueError, AttributeError, SoftpromptError) as err:
        raise SoftpromptError(f"{path} is not a valid checkpoint ({err}); the checkpoint is damaged") from None
    return _own_pooling_before_3(checkpoint) if fmt < 3 else checkpoint


def _own_pooling_before_3(checkpoint: Checkpoint) -> Checkpoint:
    """Before format 3 only an encoder's head honoured a recorded pooling; a decoder's (or a label-word prompt's)
    read the model's own, so that is what it loads with."""
    if checkpoint.family == "encoder" or checkpoint.prompt.pooling == "cls":
        return checkpoint
    prompt = replace(checkpoint.prompt, pooling="cls")
    spec = None if checkpoint.spec is None else replace(checkpoint.spec, prompt=prompt)
    return replace(checkpoint, prompt=prompt, spec=spec)


def _verified(directory: Path, name: str, checkpoint: Checkpoint) -> Path:
    path = directory / name
    if not path.is_file():
        raise SoftpromptError(f"{directory} has no {name}; the checkpoint is incomplete")
    want = checkpoint.files.get(name)
    if want is not None and file_sha256(path) != want:
        raise SoftpromptError(f"{path} does not match its checksum in {META_FILE}: the file is truncated or "
                              "corrupted; use another checkpoint (e.g. last/ or best/ of the run)")
    return path


def load_tensors(directory: str | Path, checkpoint: Checkpoint | None = None) -> dict[str, torch.Tensor]:
    """The prompt (and head) tensors of a checkpoint, checked against the checksum it recorded; a checkpoint
    exported as a peft adapter (`softprompt export --format peft`) gives them under softprompt's names too."""
    directory = Path(directory)
    checkpoint = checkpoint or read_checkpoint(directory)
    peft = PEFT_TENSOR_FILE in checkpoint.files and TENSOR_FILE not in checkpoint.files
    tensor_file = PEFT_TENSOR_FILE if peft else TENSOR_FILE
    try:
        tensors = load_file(str(_verified(directory, tensor_file, checkpoint)))
        return from_peft_tensors(tensors, get_method(checkpoint.prompt.method).tensor_key) if peft else tensors
    except Exception as err:  # safetensors raises its own error types for damaged headers
        if isinstance(err, SoftpromptError):
            raise
        raise SoftpromptError(f"{directory / tensor_file} cannot be read ({err}); the checkpoint is damaged") from None


def load_prompt_file(path: str | Path, key: str) -> torch.Tensor:
    """The stored tensor `key` (a method's `tensor_key`) of a checkpoint folder (checked against its checksum), of a
    peft adapter folder, or of a bare .safetensors file: where a run starts its prompt from (`--init-file`)."""
    path = Path(path)
    if path.is_dir() and is_peft_adapter(path) and not (path / META_FILE).is_file():
        tensors = from_peft_tensors(read_peft_tensors(path), key)
    elif path.is_dir():
        tensors = load_tensors(path)
    elif path.is_file():
        tensors = load_file(str(path))
    else:
        raise SoftpromptError(f"no prompt at {path}: give a checkpoint folder or a .safetensors prompt file")
    if key not in tensors:
        held = held_by(tensors)
        if held:
            raise SoftpromptError(f"{path} holds {held}; start a run of the same method from it")
        raise SoftpromptError(f"{path} holds no '{key}' tensor; is it a softprompt checkpoint?")
    return tensors[key]


def read_trainer_state(directory: str | Path, checkpoint: Checkpoint | None = None) -> TrainerState | None:
    directory = Path(directory)
    if not (directory / STATE_JSON).is_file():
        return None
    checkpoint = checkpoint or read_checkpoint(directory)
    tensors = load_file(str(_verified(directory, STATE_TENSORS, checkpoint)))
    rest = json.loads((directory / STATE_JSON).read_text())
    optimizer = _unflatten_optimizer(tensors, rest["optimizer"])
    if checkpoint.format == 1:  # counters at the top level; the prompt module under its old prefix
        counters = {k: v for k, v in rest.items() if k != "optimizer"}
        prefix = "training_prompt."
    else:
        counters, prefix = rest["counters"], "prompt_module."
    module = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    rng = {name[len("rng."):]: value for name, value in tensors.items() if name.startswith("rng.")}
    return TrainerState(counters, optimizer, rng, module)


def _from_format_1(meta: dict[str, Any]) -> Checkpoint:
    """A checkpoint of softprompt 0.1.0 before the run spec: its settings through today's resolver, with the
    prompt, task and input length it recorded, and the defaults of that release where it recorded none."""
    prompt = PromptTuningConfig.from_dict(meta["prompt"])
    training = dict(meta["training"])
    if training.get("head_init") == "cosine" and prompt.pooling != "siamese":
        training["head_init"] = None  # saved before `fit` existed, when every run recorded cosine
    if training.get("lr") is None:  # saved before runs recorded their lr: the default then, for every run
        training["lr"] = 0.3 if training.get("optimizer") == "adafactor" else 3e-2
    training.update(task_type=prompt.task_type.value, init=prompt.init.value, init_text=prompt.init_text,
                    init_file=prompt.init_file, pooling=prompt.pooling, template=None, verbalizer=None,
                    max_length=meta.get("max_length", training.get("max_length", 128)))
    if training.get("epochs") == 1.0 and (training.get("max_steps") or training.get("max_time")):
        training["epochs"] = None  # 0.1.0 recorded 1.0 whenever a step or time budget ruled
    cfg = TrainConfig(**{k: v for k, v in training.items() if k in TrainConfig.__dataclass_fields__})
    model = ModelInfo(meta["base_model"], meta["base_model"], None, meta["family"])
    spec = resolve(cfg, model, TaskSpec.from_dict(meta["task"]), bf16_fast=False)
    spec = replace(spec, prompt=prompt, truncation="head", decided={})  # 0.1.0 cut every text's end
    return Checkpoint(prompt, meta["family"], meta["base_model"], meta["base_fingerprint"], spec, meta.get("step"),
                      meta.get("metrics") or {}, {}, {}, format=1)
