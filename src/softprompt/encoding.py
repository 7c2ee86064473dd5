"""Examples -> token ids -> padded batches, for head classification and for text-to-text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .config import TaskType
from .data import Example
from .errors import SoftpromptError
from .tasks import TaskSpec


@dataclass
class Feature:
    input_ids: list[int]
    label: int | float | None
    token_type_ids: list[int] | None = None
    target: list[int] | None = None  # text-to-text: token ids of the gold label words
    pair_ids: list[int] | None = None  # siamese pairs: the second text, encoded on its own

    def __len__(self) -> int:
        return len(self.input_ids) + len(self.target or ()) + len(self.pair_ids or ())


BLANK = "empty or blank input; give it some text"


def is_blank(texts: Iterable[str]) -> bool:
    """Whether an input has no text in any field: refused everywhere (docs/reliability.md)."""
    return not any(str(t).strip() for t in texts)


def kept(tokens: list[int], keep: int, truncation: str) -> list[int]:
    """The `keep` tokens of a too-long text that stay: its start (head), or its start and its end (head_tail: half
    each, the middle cut; Sun et al. 2019 found that best for long reviews)."""
    if truncation == "head" or keep <= 0:
        return tokens[:max(keep, 0)]
    return tokens[:keep - keep // 2] + tokens[len(tokens) - keep // 2:]


class TaskEncoder:
    """Turns a task's examples into model inputs; the max length leaves room for the virtual tokens.
    `separate`: a head's pair is encoded as two texts (siamese pooling) instead of one sequence. `truncation`:
    what of a too-long text is kept (`kept`)."""

    def __init__(self, tokenizer, task: TaskSpec, task_type: TaskType, max_length: int,
                 separate: bool = False, truncation: str = "head") -> None:
        self.tokenizer, self.task, self.task_type, self.max_length = tokenizer, task, task_type, max_length
        self.separate, self.truncation = separate, truncation
        self.truncated = 0  # inputs cut to max_length so far (the template and the label slot are never cut)
        if max_length < 8:
            raise SoftpromptError(f"max input length {max_length} leaves no room for text; "
                                  "shorten the prompt or raise --max-length")
        if separate and (task_type is not TaskType.SEQ_CLS or len(task.fields) < 2):
            raise SoftpromptError(f"siamese pooling compares the two texts of a pair with a head; task {task.name} "
                                  f"has {len(task.fields)} input field(s) and type {task_type.value}: use "
                                  "--pooling cls or mean")
        self.label_ids: list[list[int]] = []
        if task_type is not TaskType.SEQ_CLS:
            if task.is_regression:
                raise SoftpromptError(f"task {task.name} is regression: train it with a head (--task-type SEQ_CLS)")
            end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
            eos = [end] if task_type is TaskType.SEQ_2_SEQ_LM and end is not None else []
            self.label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] + eos for w in task.verbalizer]
            if any(not ids for ids in self.label_ids) or len({tuple(i) for i in self.label_ids}) < len(self.label_ids):
                raise SoftpromptError(f"label words {task.verbalizer} must tokenize to distinct, non-empty ids")

    @property
    def text_to_text(self) -> bool:
        return self.task_type is not TaskType.SEQ_CLS

    def _prefix_ids(self, fields: dict[str, str]) -> list[int]:
        """The rendered template, with the longest field cut (by tokens) until it fits; the template survives."""
        budget = self.max_length - max((len(i) for i in self.label_ids), default=0)
        fields = dict(fields)
        for attempt in range(8):
            ids = self.tokenizer(self.task.render(fields))["input_ids"]
            excess = len(ids) - budget
            if excess <= 0:
                self.truncated += attempt > 0
                return ids
            longest = max(fields, key=lambda f: len(fields[f]))
            tokens = self.tokenizer(fields[longest], add_special_tokens=False)["input_ids"]
            fields[longest] = self.tokenizer.decode(kept(tokens, len(tokens) - excess - 1, self.truncation))
        self.truncated += 1
        return ids[-budget:]

    def encode(self, example: Example) -> Feature:
        """Token ids of one example. An input with no text (every field empty or blank), or one of whose texts
        leaves a head nothing to read, is refused: a mean over no tokens has no value, and a label read off
        nothing would be arbitrary (docs/reliability.md)."""
        missing = [f for f in self.task.fields if f not in example.fields]
        if missing:
            raise SoftpromptError(f"example lacks field(s) {', '.join(missing)} that task {self.task.name} needs")
        if is_blank(example.fields[f] for f in self.task.fields):
            raise SoftpromptError(BLANK)
        fields = self.task.input_fields(example.fields)
        if self.text_to_text:
            prefix = self._prefix_ids(fields)
            target = self.label_ids[int(example.label)] if example.label is not None else None
            return Feature(prefix, example.label, target=target)
        texts = [fields[f] for f in self.task.fields]
        pair = (texts[0], " ".join(texts[1:])) if len(texts) > 1 else (texts[0],)
        if self.separate:
            first, second = (self._cut(t) for t in pair)
            feature = Feature(first["input_ids"], example.label, pair_ids=second["input_ids"])
        else:
            enc = self._cut(*pair)
            feature = Feature(enc["input_ids"], example.label, enc.get("token_type_ids"))
        if not feature.input_ids or feature.pair_ids == []:
            raise SoftpromptError("no token this model reads in the input (only characters its tokenizer drops); "
                                  "give it some text")
        return feature

    def _cut(self, *texts: str):
        """The tokenizer's encoding cut to max_length, counted in `truncated` when it was cut. The tokenizer cuts
        a text's end; head_tail first cuts the middle of the text (or of a pair's longer texts) by the excess."""
        enc = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
        if len(enc["input_ids"]) < self.max_length:
            return enc
        excess = len(self.tokenizer(*texts)["input_ids"]) - self.max_length
        self.truncated += excess > 0
        if excess <= 0 or self.truncation == "head":
            return enc
        tokens = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        keep = [len(t) for t in tokens]
        for _ in range(excess):  # as the tokenizer's longest_first: each token cut from the longer text of a pair
            keep[keep.index(max(keep))] -= 1
        cut = [t if k == len(ids) else self.tokenizer.decode(kept(ids, k, "head_tail"))
               for t, ids, k in zip(texts, tokens, keep)]
        # decoding and re-encoding may shift a token or two: the tokenizer's own cut takes what still overflows
        return self.tokenizer(*cut, truncation=True, max_length=self.max_length)

    def encode_all(self, examples: list[Example]) -> list[Feature]:
        """`encode` of each example; a refused one is named by its position."""
        features = []
        for i, example in enumerate(examples):
            try:
                features.append(self.encode(example))
            except SoftpromptError as err:
                raise SoftpromptError(f"input {i}: {err}") from None
        return features


def pad(rows: list[list[int]], value: int, side: str = "right", device: torch.device | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids padded to the longest on `side`, and their mask; built on the host, then moved to `device`
    in one copy each."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def collate(features: list[Feature], encoder: TaskEncoder) -> dict[str, torch.Tensor]:
    """A training batch: dynamic padding to the longest row; labels where the loss is taken."""
    pad_id = encoder.tokenizer.pad_token_id
    if encoder.task_type is TaskType.CAUSAL_LM:
        rows = [f.input_ids + (f.target or []) for f in features]
        ids, mask = pad(rows, pad_id)
        labels, _ = pad([[-100] * len(f.input_ids) + (f.target or []) for f in features], -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ids, mask = pad([f.input_ids for f in features], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if encoder.task_type is TaskType.SEQ_2_SEQ_LM:
        batch["labels"], _ = pad([f.target or [] for f in features], -100)
        return batch
    if features[0].token_type_ids is not None:
        batch["token_type_ids"], _ = pad([f.token_type_ids or [] for f in features], 0)
    if features[0].pair_ids is not None:
        batch["pair_ids"], batch["pair_mask"] = pad([f.pair_ids or [] for f in features], pad_id)
    dtype = torch.float if encoder.task.is_regression else torch.long
    batch["labels"] = torch.tensor([f.label for f in features], dtype=dtype)
    return batch
