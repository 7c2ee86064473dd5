"""What a prompt is: its length, how it starts, and which kind of model output it trains against.

Field names are ours, but peft's spellings are accepted too (`prompt_tuning_init`, `prompt_tuning_init_text`,
`tokenizer_name_or_path`, ...), so a peft `adapter_config.json` for prompt tuning builds the same config. The
`method` picks prompt tuning's relatives (methods/): P-tuning's prompt encoder and prefix tuning's keys/values,
set by the fields peft's PromptEncoderConfig and PrefixTuningConfig name the same way.
"""

from __future__ import annotations

import json
from dataclasses import InitVar, asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import SoftpromptError


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


METHODS = ("prompt", "ptuning", "prefix")
ENCODER_TYPES = ("MLP", "LSTM")

PEFT_INITS = {"RANDOM": PromptInit.RANDOM, "TEXT": PromptInit.TEXT, "SAMPLE_VOCAB": PromptInit.VOCAB}
# peft fields that say nothing a softprompt prompt needs: the model's shape is read off the model itself
# peft's prompt-learning types and the method each is here: P-tuning and prefix adapters store what their encoder
# produced, the plain vectors or keys/values a softprompt checkpoint of that method holds
PEFT_METHODS = {"PROMPT_TUNING": "prompt", "P_TUNING": "ptuning", "PREFIX_TUNING": "prefix"}
PEFT_IGNORED = ("peft_type", "init_weights", "auto_mapping", "peft_version", "revision", "inference_mode", "token_dim",
                "num_transformer_submodules", "num_attention_heads", "num_layers", "modules_to_save",
                "tokenizer_kwargs")
PEFT_CONFIG_FILE = "adapter_config.json"


@dataclass
class PromptTuningConfig:
    """The soft prompt's settings; saved beside the prompt so a checkpoint rebuilds itself."""

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
    # prompt: input vectors; ptuning: input vectors produced by a prompt encoder while training; prefix: keys and
    # values at every layer, optionally through an MLP while training. Both reparameterisations fold away at save
    method: str = "prompt"
    encoder_reparameterization_type: str = "MLP"  # ptuning: MLP | LSTM (peft's names from here on)
    encoder_hidden_size: int | None = None  # ptuning, prefix with projection: default the model's width, as peft
    encoder_num_layers: int = 2  # ptuning LSTM layers (peft's MLP always has 3 linear layers)
    encoder_dropout: float = 0.0  # ptuning LSTM dropout between layers
    prefix_projection: bool = False  # prefix: train through Embedding -> Linear-Tanh-Linear
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
        if self.method not in METHODS:
            raise SoftpromptError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        self.encoder_reparameterization_type = str(getattr(self.encoder_reparameterization_type, "value",
                                                           self.encoder_reparameterization_type)).upper()
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise SoftpromptError(f"encoder_reparameterization_type must be MLP or LSTM, not "
                                  f"{self.encoder_reparameterization_type!r}")
        if (self.encoder_hidden_size is not None and self.encoder_hidden_size < 1) or self.encoder_num_layers < 1:
            raise SoftpromptError("encoder_hidden_size and encoder_num_layers must be >= 1")
        if not 0 <= self.encoder_dropout < 1:
            raise SoftpromptError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
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
            if peft_type not in PEFT_METHODS:
                raise SoftpromptError(f"this is a peft {peft_type} config; PromptTuningConfig reads "
                                      f"{', '.join(PEFT_METHODS)} ones")
            if d.setdefault("method", PEFT_METHODS[peft_type]) != PEFT_METHODS[peft_type]:
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
