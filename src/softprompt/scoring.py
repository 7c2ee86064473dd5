"""Prediction: rank classification over label strings for text-to-text, head outputs otherwise.

Rank classification scores each label string by its log-likelihood after the prompt and input, the
paper's way of reading a class off a generative model; multi-token label strings sum their tokens.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import torch

from .config import TaskType
from .devices import to_device
from .encoding import Feature, TaskEncoder, collate, pad
from .errors import SoftpromptError
from .models import DecoderPromptModel, PromptModel


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log p(target) under logits (B, r, V); targets (B, r) aligned with them."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


def first_token_scores(last_logits: torch.Tensor, label_ids: list[list[int]]) -> torch.Tensor:
    """(B, labels) scores of one-token label strings from the logits after each row (B, V)."""
    return torch.log_softmax(last_logits.float(), -1)[:, [i[0] for i in label_ids]]


def _decoder_label_scores(model: DecoderPromptModel, prefixes: list[list[int]], label_ids: list[list[int]],
                          pad_id: int) -> torch.Tensor:
    """Rows are left-aligned inside the model, so each row ends with its label: only the tail needs logits."""
    device = model.device
    if all(len(ids) == 1 for ids in label_ids):  # one forward: the next-token distribution after the prefix
        ids, mask = pad(prefixes, pad_id, device=device)
        return first_token_scores(model.tail_logits(ids, mask, 1)[:, 0], label_ids)
    ids, mask = pad(prefixes, pad_id, device=device)
    shared = model.continuation_logprobs(ids, mask, label_ids)
    if shared is not None:  # the prompt and the input ran once, then every label string in one more forward
        return shared
    columns = []
    for label in label_ids:
        ids, mask = pad([p + label for p in prefixes], pad_id, device=device)
        # the logit at column t predicts token t+1: the last len(label)+1 columns cover the label
        logits = model.tail_logits(ids, mask, len(label) + 1)[:, :-1]
        targets = torch.tensor([label] * len(prefixes), device=device)
        columns.append(_token_logprobs(logits, targets))
    return torch.stack(columns, dim=1)


def _seq2seq_label_scores(model, prefixes, label_ids, pad_id) -> torch.Tensor:
    ids, mask = pad(prefixes, pad_id, device=model.device)
    encoded, enc_mask = model.encode(ids, mask)
    columns = []
    for label in label_ids:
        labels = torch.tensor([label] * len(prefixes), device=model.device)
        logits = model.base(encoder_outputs=encoded, attention_mask=enc_mask, labels=labels).logits
        columns.append(_token_logprobs(logits, labels))
    return torch.stack(columns, dim=1)


def label_scores(model: PromptModel, encoder: TaskEncoder, features: list[Feature]) -> torch.Tensor:
    """(B, num_labels) scores for one batch, differentiable (the rank-classification training loss uses it)."""
    pad_id = encoder.tokenizer.pad_token_id
    prefixes = [f.input_ids for f in features]
    if encoder.task_type is TaskType.CAUSAL_LM:
        return _decoder_label_scores(cast(DecoderPromptModel, model), prefixes, encoder.label_ids, pad_id)
    if encoder.task_type is TaskType.SEQ_2_SEQ_LM:
        return _seq2seq_label_scores(model, prefixes, encoder.label_ids, pad_id)
    batch = to_device(collate([replace(f, label=0) for f in features], encoder), model.device)  # labels may be unknown
    batch.pop("labels")
    return head_scores(model(**batch).logits, encoder.task.is_regression)


def head_scores(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    """What a head's logits score: the value for regression, log-probabilities over the classes otherwise."""
    logits = logits.float()
    return logits[:, 0] if regression else torch.log_softmax(logits, -1)


def by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of rows of similar length (they pad less), shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.inference_mode()
def score(model: PromptModel, encoder: TaskEncoder, features: list[Feature], batch_size: int = 32) -> torch.Tensor:
    """(N, num_labels) label log-likelihoods (or log-softmax head logits); (N,) values for regression."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = [None] * len(features)  # type: ignore[list-item]
    for batch in by_length([len(f) for f in features], batch_size):
        for i, s in zip(batch, label_scores(model, encoder, [features[i] for i in batch])):
            out[i] = s
    model.train(was_training)
    return torch.stack(out)


def labelled(labels: tuple[str, ...], probs: torch.Tensor) -> dict[str, Any]:
    """A classification answer: the most probable label and every label's probability (6 decimals)."""
    return {"label": labels[int(probs.argmax())],
            "scores": {name: round(float(p), 6) for name, p in zip(labels, probs)}}


def check_finite(scores: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    """`scores` (one row per input), or an error naming the first input whose scores are not all finite: a label
    picked from NaN would be arbitrary, so no such number leaves softprompt (docs/reliability.md)."""
    finite = torch.isfinite(scores.float()).reshape(len(scores), -1).all(1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise SoftpromptError(f"{names[i] if names else f'input {i}'}: the model's scores are not finite "
                              f"({scores[i].tolist()}), so it has no answer; please report this input")
    return scores


def predictions(scores: torch.Tensor) -> list:
    return scores.tolist() if scores.dim() == 1 else scores.argmax(-1).tolist()
