"""Rows of many prompts in one forward: decoders run every row after its own prompt's kept keys/values (prompts
of different lengths right-aligned in one cache, so a row attends to its own prompt only); encoders splice each
row's prompt after its [CLS] (`models.encoder.after_cls`, as a prompt alone does). The backbone runs once for
the batch, then each prompt reads its rows as it would alone (label words, its head, or the model's own
pooling). Rows of one precision only (each precision has its own weights); rows that cannot mix (a prompt the
engine refuses, an encoder prefix, encoder-decoders) run one sub-batch per prompt."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel, StoppingCriteriaList

from ..config import TaskType
from ..data import Example
from ..encoding import Feature, pad
from ..engine import positions_from_mask, stack_prefixes
from ..methods import INPUT_VECTORS
from ..models.decoder import DecoderPromptModel
from ..models.encoder import EncoderPromptModel, after_cls, rows_of
from ..scoring import first_token_scores, head_scores, label_scores
from .generation import Progress, Reporting, Sampling, report, seeded
from .registry import LoadedPrompt


@dataclass(frozen=True)
class Row:
    """One (prompt, encoded input) pair of a batch."""

    prompt: LoadedPrompt
    feature: Feature
    example: Example


def by_prompt(rows: list[Row]) -> dict[int, list[int]]:
    """Row indices per prompt, in order of first appearance."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[id(row.prompt)].append(i)
    return groups


def _decoder(row: Row) -> DecoderPromptModel:
    return cast(DecoderPromptModel, row.prompt.prompted.model)


def _encoder(row: Row) -> EncoderPromptModel:
    return cast(EncoderPromptModel, row.prompt.prompted.model)


def _placed(index: list[int], scores, out: list) -> None:
    for i, s in zip(index, scores):
        out[i] = s


def forward(rows: list[Row], family: str, pad_id: int) -> list[torch.Tensor]:
    """Each row's scores (label log-likelihoods, head log-probabilities, or a value): rows of one precision and
    able to mix in one forward, the others one sub-batch per prompt."""
    if family == "decoder":
        mixes, run = [_decoder_mixes(r) for r in rows], decoder_scores
    elif family == "encoder":
        mixes, run = [r.prompt.prompted.model.method.contributes == INPUT_VECTORS for r in rows], encoder_scores
    else:
        return each_prompt_alone(rows)
    group = [(r.prompt.prompted.spec.precision, mix) for r, mix in zip(rows, mixes)]
    out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    for key in dict.fromkeys(group):
        index = [i for i, g in enumerate(group) if g == key]
        part = [rows[i] for i in index]
        _placed(index, run(part, pad_id) if key[1] else each_prompt_alone(part), out)
    return out


def each_prompt_alone(rows: list[Row]) -> list[torch.Tensor]:
    """The single-task path, one sub-batch per prompt."""
    out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    for index in by_prompt(rows).values():
        prompted = rows[index[0]].prompt.prompted
        _placed(index, label_scores(prompted.model, prompted.encoder, [rows[i].feature for i in index]), out)
    return out


# -- decoders: every row after its own prompt's keys/values --------------------------------------------------
def _decoder_mixes(row: Row) -> bool:
    longest_label = max(map(len, row.prompt.prompted.encoder.label_ids), default=0)
    return _decoder(row).shares(len(row.feature.input_ids) + longest_label)


def decoder_run(rows: list[Row], pad_id: int):
    """Run the rows (all of prompts that share) after their prompts in one forward: their final states and the
    cache of prompts + rows (keys/values, mask, each row's last position), and the rows of each prompt."""
    groups = by_prompt(rows)
    owner = torch.empty(len(rows), dtype=torch.long, device=_decoder(rows[0]).device)
    prefixes = []
    for g, index in enumerate(groups.values()):
        owner[index] = g
        prefixes.append(_decoder(rows[index[0]]).engine.prefix_states()[0])
    layers, prefix_mask = stack_prefixes(prefixes, owner)
    device = _decoder(rows[0]).device
    ids, mask = pad([r.feature.input_ids for r in rows], pad_id, side="left", device=device)
    full_mask = torch.cat([prefix_mask, mask], dim=1)
    positions = positions_from_mask(full_mask)[:, prefix_mask.shape[1]:]
    hidden, layers = _decoder(rows[0]).engine.run_cached(layers, ids, full_mask, positions)
    return hidden, (layers, full_mask, positions[:, -1:]), groups


def decoder_scores(rows: list[Row], pad_id: int) -> list[torch.Tensor]:
    """Rows of prompts the engine shares, in one forward; then each prompt reads its rows."""
    out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    hidden, (layers, mask, last_position), groups = decoder_run(rows, pad_id)
    for index in groups.values():
        prompted, model = rows[index[0]].prompt.prompted, _decoder(rows[index[0]])
        at = torch.tensor(index, device=hidden.device)
        last = hidden[at, -1]
        if model.head is not None:  # the rows' own columns of the mask over prompts + rows mark their text
            features = model.pooled(hidden[at], mask[at, -hidden.shape[1]:])
            scores = head_scores(model.head(features), prompted.task.is_regression)
        elif all(len(ids) == 1 for ids in prompted.encoder.label_ids):
            scores = first_token_scores(model.engine.lm_logits(last), prompted.encoder.label_ids)
        else:
            cache = ([(keys[at], values[at]) for keys, values in layers], mask[at], last_position[at])
            scores = model.engine.logprobs_after(last[:, None], cache, prompted.encoder.label_ids)
        _placed(index, scores, out)
    return out


def generate(rows: list[Row], sampling: Sampling, progress: list[Progress], pad_id: int) -> None:
    """Each row's continuation after its prompt + template, every token reported to the row's `Progress`: the rows
    of one precision whose prompts the engine shares in one batch (`engine.sample_after`), each other row alone
    through its prompt's own `generate` (transformers', on the concatenated sequence, seeded by the row's seed)."""
    alone = []
    for precision in dict.fromkeys(r.prompt.prompted.spec.precision for r in rows):  # each on its own weights
        index = [i for i, r in enumerate(rows) if r.prompt.prompted.spec.precision == precision]
        shared = [i for i in index
                  if _decoder(rows[i]).shares(len(rows[i].feature.input_ids) + sampling.max_new_tokens)]
        alone += [i for i in index if i not in shared]
        if shared:
            group, tracks = [rows[i] for i in shared], [progress[i] for i in shared]
            hidden, cache, _ = decoder_run(group, pad_id)
            _decoder(group[0]).engine.sample_after(hidden[:, -1], cache, sampling.max_new_tokens, sampling.sampler,
                                                   [t.generator for t in tracks], partial(report, tracks))
    for i in alone:
        model = _decoder(rows[i])
        ids = torch.tensor([rows[i].feature.input_ids], device=model.device)
        with seeded(progress[i].wants.seed, model.base.device):
            model.generate(ids, torch.ones_like(ids), sampling.max_new_tokens,
                           stopping_criteria=StoppingCriteriaList([Reporting([progress[i]])]),
                           **sampling.generate_kwargs())


def can_generate(row: Row) -> bool:
    return row.prompt.prompted.spec.task_type is TaskType.CAUSAL_LM


# -- encoders: each row's prompt spliced after its [CLS] -----------------------------------------------------
def encoder_scores(rows: list[Row], pad_id: int) -> list[torch.Tensor]:
    """One backbone forward for every row (a siamese prompt's second texts as more sequences); then each prompt
    reads its rows with its own readout (`EncoderPromptModel.read`)."""
    sequences = [(i, r.feature.input_ids, r.feature.token_type_ids) for i, r in enumerate(rows)]
    second = {}
    for i, r in enumerate(rows):
        if r.feature.pair_ids is not None:
            second[i] = len(sequences)
            sequences.append((i, r.feature.pair_ids, None))
    device = _encoder(rows[0]).device
    ids, mask = pad([s[1] for s in sequences], pad_id, device=device)
    types = None
    if any(s[2] is not None for s in sequences):
        types, _ = pad([s[2] or [0] * len(s[1]) for s in sequences], 0, device=device)
    models = [_encoder(rows[i]) for i, _, _ in sequences]
    lengths = torch.tensor([m.prompt.num_tokens for m in models], device=device)
    prompts = nn.utils.rnn.pad_sequence([m.prompt.embeddings() for m in models], batch_first=True)
    backbone = cast(PreTrainedModel, models[0].base.base_model)  # the frozen weights of these rows' precision
    inputs, text = after_cls(backbone.get_input_embeddings(), ids, mask, types, prompts, lengths)
    output = backbone(**inputs)
    out: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    for index in by_prompt(rows).values():
        model = _encoder(rows[index[0]])
        first = torch.tensor(index, device=device)  # a row's first sequence sits at its index
        pair = None
        if model.config.pooling == "siamese":
            at = torch.tensor([second[i] for i in index], device=device)
            pair = (rows_of(output, at), text[at])
        logits = model.read(rows_of(output, first), text[first], pair)
        _placed(index, head_scores(logits, rows[index[0]].prompt.prompted.task.is_regression), out)
    return out
