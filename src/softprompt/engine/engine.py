"""`SharedPrefix`: a prompt that comes first in a causal model runs once for the whole batch.

Attention is causal and the prompt comes first, so its keys and values at every layer do not depend on the
input. The label loss, rank classification, generation and a head over the rows' states run the prompt once per
call (packed with the rows in a training step; otherwise a batch of one whose keys/values reach every row through
the transformers cache, kept under no_grad until the prompt changes) instead of pushing k extra tokens through the
model per example. Which models may share (sharing.py, and the probe once, probe.py), the kept keys/values
(cache.py) and the paths rows run (paths.py) live beside it; this class holds one adapter's base model and prompt
source, and its public calls.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import SoftpromptError
from .attention import can_pack
from .cache import KeptPrefix, cache_forward, positions_from_mask, prefix_states
from .paths import Finished, Rows, RowsCache, Sampler, first_real, lm_logits, lm_loss, logit_scale, logprobs_after, \
    packed, run_cached, sample_after
from .probe import probe_mismatch
from .sharing import cannot_share, fits_window, sliding_window
from .sources import InputVectors, KeyValues, Kind, LayerKV, PrefixSource, source_kind

log = logging.getLogger(__name__)


class SharedPrefix:
    """The shared prefix of a frozen causal LM `base` and a prompt `source`; every call takes left-aligned rows
    (input_ids, attention_mask), pads first. `reads_logits`: callers read the LM head's logits (what the probe
    then compares); otherwise the final states a classification head reads.

    Not an nn.Module: the base model and the prompt belong to the adapter that holds this engine, which sees
    them moved, cast or reloaded in place (kept keys/values are keyed on the source's `version()`). A key/value
    source has no concatenation to fall back on: where `shares` says no, its adapter has to refuse the call."""

    def __init__(self, base: PreTrainedModel, source: PrefixSource, reads_logits: bool = True) -> None:
        self.base = base
        self.reads_logits = reads_logits
        self.forced_off: str | None = None  # a caller's reason to take the concatenated sequence (force_off)
        self._reason: str | None = None
        self._window_logged = False
        self._source: PrefixSource
        self.kind: Kind  # what the source contributes
        self._kept: KeptPrefix | None  # the prefix's states last computed under no_grad, with their version
        self._checked: bool  # whether `_reason` holds the outcome of the checks and the probe yet
        self.source = source  # sets the four above

    @property
    def source(self) -> PrefixSource:
        return self._source

    @source.setter
    def source(self, source: PrefixSource) -> None:
        """A new source (its adapter's prompt replaced): nothing kept or probed with the old one is used again."""
        self.kind = source_kind(source)
        self._source, self._kept, self._checked = source, None, False

    # -- whether to share ---------------------------------------------------------------------------------
    def force_off(self, reason: str | None = "forced off") -> None:
        """Make `shares` answer no, so that the adapter takes the concatenated sequence: how tests and benchmarks
        get the plain model's computation to hold the shared prefix to. None lets `shares` decide again from the
        model checks and the probe, whose outcome is kept."""
        self.forced_off = reason

    def reason(self) -> str | None:
        """Why this model cannot share the prefix (sharing.cannot_share), or else the probe's objection; worked out
        on the first call (and logged), then kept."""
        if not self._checked:
            self._reason = cannot_share(self.base, self.source) or probe_mismatch(self)
            self._checked = True
            if self._reason and self._reason != "no prompt to share":
                log.warning("softprompt: %s cannot share the prompt across the batch (%s)%s", type(self.base).__name__,
                            self._reason, "; using the concatenated sequence" if self.kind == "input_vectors" else "")
        return self._reason

    def shares(self, length: int) -> bool:
        """Whether a call over `length` tokens per row (input plus anything generated after it) shares the
        prefix; under a sliding window only if prefix + row fit in it."""
        if self.forced_off is not None or self.reason() is not None:
            return False
        if not fits_window(self.base, self.source.num_tokens + length):
            if not self._window_logged:
                self._window_logged = True
                log.warning("softprompt: %d virtual + %d input tokens exceed %s's sliding window of %d; such "
                            "batches use the concatenated sequence", self.source.num_tokens, length,
                            type(self.base).__name__, sliding_window(self.base))
            return False
        return True

    # -- running rows after the prefix ----------------------------------------------------------------------
    def prefix_states(self) -> tuple[LayerKV, torch.Tensor | None]:
        """Per-layer keys/values of the prefix (batch 1) and, for input vectors, their last hidden state; kept
        under no_grad until the source's version changes."""
        states = prefix_states(self.base, self.source, self.kind, self._kept)
        if not torch.is_grad_enabled():
            self._kept = states
        return states.layers, states.last

    def run_cached(self, layers: LayerKV, input_ids: torch.Tensor, mask: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, LayerKV]:
        """paths.run_cached on this engine's model: rows of several prompts' stacked keys/values
        (multitask/forward.py)."""
        return run_cached(self.base, layers, input_ids, mask, positions)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_cache: bool = False) -> Rows:
        """Final states of the rows after the prefix (positions counted from k), with the prefix's last state
        and, with `keep_cache`, the keys/values of prefix + rows. A training step of input vectors runs prompt
        and rows packed into one sequence; otherwise (and always for keys/values, which keep their graph) the
        rows run after the prefix's keys/values."""
        k = self.source.num_tokens
        full_mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], k), attention_mask], 1)
        positions = positions_from_mask(full_mask)[:, k:]
        if torch.is_grad_enabled() and not keep_cache and self.kind == "input_vectors" and can_pack(self.base):
            return packed(self.base, cast(InputVectors, self.source), input_ids, attention_mask, positions)
        layers, last = self.prefix_states()
        hidden, layers = self.run_cached(layers, input_ids, full_mask, positions)
        return Rows(hidden, last, (layers, full_mask, positions[:, -1:]))

    def cache_forward(self, ids: torch.Tensor, mask: torch.Tensor, model: nn.Module | None = None,
                      **kwargs: Any) -> Any:
        """`model` (default: the base)'s own forward over left-aligned rows with the key/value source as its
        cache (cache.cache_forward): the probe's reference, and the path of a call the engine cannot share."""
        return cache_forward(self.base, cast(KeyValues, self.source), ids, mask, model, **kwargs)

    # -- what callers read -------------------------------------------------------------------------------
    def logit_scale(self) -> float:
        return logit_scale(self.base)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.base, hidden)

    def tail_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
        """LM logits of the last `keep` columns only: the head over a large vocabulary at every position costs
        as much as several layers, and label words sit at the end of each row."""
        hidden = self.states(input_ids, attention_mask).hidden[:, -keep:]
        return self.lm_logits(hidden.contiguous())  # on a strided view the head runs as a slower batched matmul

    def lm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled tokens (-100: none), without keeping logits (paths.lm_loss).
        Keys/values have no state to predict a row's first real token from, so a label there is refused rather
        than dropped."""
        if self.kind == "key_values" and bool(((labels != -100) & first_real(attention_mask)).any()):
            raise SoftpromptError("a row's first real token is labelled, but a key/value prefix has no output "
                                  "state to predict it from; leave the first token unlabelled (e.g. start rows "
                                  "with BOS)")
        return lm_loss(self.base, self.states(input_ids, attention_mask), attention_mask, labels)

    def continuation_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              continuations: list[list[int]]) -> torch.Tensor:
        """(B, continuations): each continuation's log-likelihood after each row, the sum over its tokens (rank
        classification of multi-token label strings). Prefix and input run once, then every continuation's
        tokens for every row in one more forward; differentiable, for the rank loss."""
        hidden, _, cache = self.states(input_ids, attention_mask, keep_cache=True)
        return self.logprobs_after(hidden[:, -1:], cast(RowsCache, cache), continuations)

    def logprobs_after(self, last: torch.Tensor, cache: RowsCache, continuations: list[list[int]]) -> torch.Tensor:
        """`continuation_logprobs` from rows already run: their last states (B, 1, d) and `Rows.cache`."""
        return logprobs_after(self.base, last, cache, continuations)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation after prefix + rows, from their keys/values; only the new token ids."""
        hidden, _, cache = self.states(input_ids, attention_mask, keep_cache=True)
        return self.sample_after(hidden[:, -1], cast(RowsCache, cache), max_new_tokens)

    def sample_after(self, last: torch.Tensor, cache: RowsCache, max_new_tokens: int, sampler: Sampler = Sampler(),
                     generators: Sequence[torch.Generator | None] | None = None,
                     finished: Finished | None = None) -> torch.Tensor:
        """Continuation (greedy, or sampled by `sampler` with each row's generator) from rows already run: their
        last states (B, d) and `Rows.cache` (paths.sample_after)."""
        return sample_after(self.base, last, cache, max_new_tokens, sampler, generators, finished)
