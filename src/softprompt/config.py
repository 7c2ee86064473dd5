"""What a prompt is: its length, how it starts, its method, and which kind of model output it trains against.

Field names are ours, but peft's spellings are accepted too (`prompt_tuning_init`, `prompt_tuning_init_text`,
`tokenizer_name_or_path`, ...), so a peft `adapter_config.json` for prompt tuning builds the same config. The
`method` is one registered in methods/; the settings only a method reads are declared in its folder
(methods/<name>/config.py, under peft's names) and validated when that method is chosen.
"""

from __future__ import annotations

import json
from dataclasses import InitVar, asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import SoftpromptError
from .methods import by_peft_type, get_method
from .methods.prefix.config import PrefixFields
from .methods.ptuning.config import PromptEncoderFields
from .tensor_names import PEFT_CONFIG_FILE


class TaskType(str, Enum):
    """Same names as peft's TaskType, so a peft config reads the same here."""

    SEQ_CLS = "SEQ_CLS"  # classifier/regression head on the pooled token; the head trains with the prompt
    CAUSAL_LM = "CAUSAL_LM"  # decoder-only; classification as generation of label words
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"  # encoder-decoder; prompt on the encoder input only


POOLINGS = ("cls", "mean", "siamese", "last_mean")
TRUNCATIONS = ("head", "head_tail")  # what of a too-long text is kept (encoding.TaskEncoder)


class PromptInit(str, Enum):
    RANDOM = "random"  # uniform in [-0.5, 0.5], the paper's random init
    VOCAB = "vocab"  # embeddings of tokens sampled from the most frequent ones
    CLASS_LABELS = "class_labels"  # embeddings of the label words, the rest sampled vocabulary
    TEXT = "text"  # embeddings of a text string's tokens, repeated to length
    FILE = "file"  # an existing prompt (prompt transfer from another task)


PEFT_INITS = {"RANDOM": PromptInit.RANDOM, "TEXT": PromptInit.TEXT, "SAMPLE_VOCAB": PromptInit.VOCAB}
# peft fields that say nothing a softprompt prompt needs: the model's shape is read off the model itself
PEFT_IGNORED = ("peft_type", "init_weights", "auto_mapping", "peft_version", "revision", "inference_mode", "token_dim",
                "num_transformer_submodules", "num_attention_heads", "num_layers", "modules_to_save",
                "tokenizer_kwargs")


@dataclass
class PromptTuningConfig(PromptEncoderFields, PrefixFields):
    """The soft prompt's settings; saved beside the prompt so a checkpoint rebuilds itself. Method settings
    (P-tuning's encoder, a prefix projection) come from the methods' own folders, keyword-only."""

    num_virtual_tokens: int = 20
    task_type: TaskType = TaskType.CAUSAL_LM
    init: PromptInit = PromptInit.RANDOM
    init_text: str | None = None
    init_file: str | None = None
    label_words: list[str] = field(default_factory=list)
    vocab_sample_size: int = 5000  # the paper samples from T5's 5,000 most common tokens
    # SEQ_CLS encoders: the model's own pooled [CLS] (cls), the mean of the text's states (mean), or each text of
    # a pair mean-pooled apart and compared (siamese)
    pooling: str = "cls"
    tokenizer_name_or_path: str | None = None  # where `text`/`vocab` inits find a tokenizer when none is passed
    base_model_name_or_path: str | None = None
    # a registered method (methods/): prompt, ptuning (input vectors out of a prompt encoder while training),
    # prefix (keys and values at every layer); a training reparameterisation folds away at save
    method: str = "prompt"
    # peft's names for init and init_text: RANDOM, TEXT or SAMPLE_VOCAB, and the text
    prompt_tuning_init: InitVar[str | None] = None
    prompt_tuning_init_text: InitVar[str | None] = None

    def __post_init__(self, prompt_tuning_init: str | None, prompt_tuning_init_text: str | None) -> None:
        if prompt_tuning_init is not None:
            name = str(getattr(prompt_tuning_init, "value", prompt_tuning_init)).upper()
            if name not in PEFT_INITS:
                raise SoftpromptError(f"prompt_tuning_init must be one of {', '.join(PEFT_INITS)}, not {name!r}")
            if self.init is not PromptInit.RANDOM and PromptInit(self.init) is not PEFT_INITS[name]:
                raise SoftpromptError(f"init={PromptInit(self.init).value!r} and prompt_tuning_init={name!r} "
                                      "disagree; give one of them")
            self.init = PEFT_INITS[name]
        if prompt_tuning_init_text is not None:
            if self.init_text not in (None, prompt_tuning_init_text):
                raise SoftpromptError("init_text and prompt_tuning_init_text disagree; give one of them")
            self.init_text = prompt_tuning_init_text
        self.task_type = TaskType(getattr(self.task_type, "value", self.task_type))
        self.init = PromptInit(self.init)
        self.label_words = list(self.label_words)
        if self.num_virtual_tokens < 0:
            raise SoftpromptError(f"num_virtual_tokens must be >= 0, got {self.num_virtual_tokens}")
        if self.init is PromptInit.TEXT and not self.init_text:
            raise SoftpromptError("init='text' needs init_text: the string whose token embeddings start the prompt")
        if self.init is PromptInit.FILE and not self.init_file:
            raise SoftpromptError("init='file' needs init_file: a checkpoint folder or a .safetensors prompt file")
        if self.pooling not in POOLINGS:
            raise SoftpromptError(f"pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}")
        get_method(self.method)  # a registered one
        self.check_prompt_encoder()
        if self.init is PromptInit.CLASS_LABELS and not self.label_words:
            raise SoftpromptError("init='class_labels' needs label_words (the verbalizer of the task)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task_type"] = self.task_type.value
        d["init"] = self.init.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptTuningConfig":
        """Our own `to_dict`, or a peft prompt-tuning, P-tuning or prefix-tuning config (its `adapter_config.json`)."""
        d = dict(d)
        if d.get("peft_type") is not None:
            peft_type = str(d["peft_type"]).split(".")[-1].upper()
            method = by_peft_type(peft_type)
            if get_method(d.setdefault("method", method.name)).peft_type != peft_type:
                raise SoftpromptError(f"method {d['method']!r} and peft_type {peft_type} disagree; give one of them")
        for name in PEFT_IGNORED:
            d.pop(name, None)
        known = set(cls.__dataclass_fields__) | {"prompt_tuning_init", "prompt_tuning_init_text"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SoftpromptError(f"unknown prompt setting(s) {', '.join(unknown)}")
        if d.get("task_type") not in (None, *(t.value for t in TaskType)):
            raise SoftpromptError(f"task type {d['task_type']!r} is not one softprompt trains: "
                                  f"{', '.join(t.value for t in TaskType)}")
        return cls(**d)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "PromptTuningConfig":
        """The config in a peft adapter folder (`adapter_config.json`)."""
        path = Path(directory) / PEFT_CONFIG_FILE
        if not path.is_file():
            raise SoftpromptError(f"{directory} has no {PEFT_CONFIG_FILE}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError:
            raise SoftpromptError(f"{path} is not valid JSON") from None
