"""What a prompt is: its length, how it starts, and which kind of model output it trains against."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from .errors import SoftpromptError


class TaskType(str, Enum):
    """Same names as peft's TaskType, so a peft config reads the same here."""

    SEQ_CLS = "SEQ_CLS"  # classifier/regression head on the pooled token; the head trains with the prompt
    CAUSAL_LM = "CAUSAL_LM"  # decoder-only; classification as generation of label words
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"  # encoder-decoder; prompt on the encoder input only


POOLINGS = ("cls", "mean", "siamese")


class PromptInit(str, Enum):
    RANDOM = "random"  # uniform in [-0.5, 0.5], the paper's random init
    VOCAB = "vocab"  # embeddings of tokens sampled from the most frequent ones
    CLASS_LABELS = "class_labels"  # embeddings of the label words, the rest sampled vocabulary
    TEXT = "text"  # embeddings of a text string's tokens, repeated to length
    FILE = "file"  # an existing prompt (prompt transfer from another task)


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

    def __post_init__(self) -> None:
        self.task_type = TaskType(self.task_type)
        self.init = PromptInit(self.init)
        if self.num_virtual_tokens < 0:
            raise SoftpromptError(f"num_virtual_tokens must be >= 0, got {self.num_virtual_tokens}")
        if self.init is PromptInit.TEXT and not self.init_text:
            raise SoftpromptError("init='text' needs init_text: the string whose token embeddings start the prompt")
        if self.init is PromptInit.FILE and not self.init_file:
            raise SoftpromptError("init='file' needs init_file: a checkpoint folder or a .safetensors prompt file")
        if self.pooling not in POOLINGS:
            raise SoftpromptError(f"pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}")
        if self.init is PromptInit.CLASS_LABELS and not self.label_words:
            raise SoftpromptError("init='class_labels' needs label_words (the verbalizer of the task)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task_type"] = self.task_type.value
        d["init"] = self.init.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptTuningConfig":
        return cls(**d)
