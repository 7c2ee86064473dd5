"""The shared-prefix engine: a prompt that comes first in a causal model runs once for the whole batch.

Attention is causal and the prompt comes first, so its keys and values at every layer do not depend on the
input. The label loss, rank classification, generation and a head over the last token run the prompt once
per call (packed with the rows in a training step; otherwise a batch of one whose keys/values reach every
row through the transformers cache, kept under no_grad until the prompt changes) instead of pushing k extra
tokens through the model per example. A prompt method contributes either input vectors (prompt tuning,
P-tuning) or keys/values at every layer (prefix tuning), the two small protocols below, so a new method
touches neither the engine nor its callers. Models whose cache or output head is not plain are refused, and
every model is checked against its own forward once on a probe batch; the adapter then takes the
concatenated sequence.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Hashable
from typing import NamedTuple, Protocol, Union, cast, runtime_checkable

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import SoftpromptError
from .attention import can_pack, grouped_attention, packed_attention
from .base import insertion_index, splice
from .lm_loss import lm_cross_entropy

log = logging.getLogger(__name__)

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (batch, kv_heads, length, head_dim)


@runtime_checkable
class InputVectors(Protocol):
    """A prompt the model reads as k vectors in its input-embedding space, before each row (prompt tuning,
    P-tuning); `SoftPrompt` is one. They run through the model like tokens, so the last one's output state
    predicts each row's first real token."""

    @property
    def num_tokens(self) -> int: ...

    def version(self) -> Hashable:
        """Changes whenever `embeddings()` may: the engine keeps what it computed from them under this key."""

    def embeddings(self) -> torch.Tensor:
        """(k, d), in autograd's graph when training."""


@runtime_checkable
class KeyValues(Protocol):
    """A prompt given as keys and values at every attention layer (prefix tuning). Rows attend to them as to
    k earlier tokens and count their positions from k; there is no output state at the prefix, so nothing
    predicts a row's first real token (the LM loss refuses a label there)."""

    @property
    def num_tokens(self) -> int: ...

    def version(self) -> Hashable:
        """Changes whenever `key_values()` may."""

    def key_values(self) -> LayerKV:
        """Per layer (keys, values), each (1, kv_heads, k, head_dim), in autograd's graph when training."""


PrefixSource = Union[InputVectors, KeyValues]


class Rows(NamedTuple):
    """What a run of (left-aligned) rows after the shared prefix gives. `hidden` (B, n, d): the rows' final
    states, what an LM head or a classification head reads. `last` (1, 1, d): the prefix's last state, which
    predicts each row's first real token (input vectors only). `cache` (with keep_cache): the keys/values of
    prefix + rows, the mask over both (B, k + n) and each row's last position (B, 1), to run more tokens."""

    hidden: torch.Tensor
    last: torch.Tensor | None
    cache: tuple[LayerKV, torch.Tensor, torch.Tensor] | None


class ContinuationTrie(NamedTuple):
    """Continuations (token lists, the same after every row) as the distinct proper prefixes they run through.
    Token j of a continuation is predicted by the state after its first j tokens, so only its proper prefixes
    need to run, and continuations that start alike share them: node i is one such prefix, run as its last
    token. CPU tensors, built by `continuation_trie`."""

    tokens: torch.Tensor  # (nodes,) each node's last token; a parent comes before its children
    depth: torch.Tensor  # (nodes,) each node's length, its position after the row's last token
    sees: torch.Tensor  # (nodes, nodes) bool: node i attends to node j, i itself or an ancestor of i
    reads: torch.Tensor  # (tokens,) for each token of each continuation, in order: the state that predicts it,
    # 0 for the row's last, 1 + i for node i
    targets: torch.Tensor  # (tokens,) that token
    owner: torch.Tensor  # (tokens,) its continuation
    count: int  # how many continuations


def continuation_trie(continuations: list[list[int]]) -> ContinuationTrie:
    nodes: dict[tuple[int, ...], int] = {}
    tokens, depth, parent, reads, targets, owner = [], [], [], [], [], []
    for c, continuation in enumerate(continuations):
        for j, token in enumerate(continuation):
            before = tuple(continuation[:j])
            if j and before not in nodes:  # shorter prefixes were added at earlier j
                nodes[before] = len(tokens)
                tokens.append(before[-1])
                depth.append(j)
                parent.append(nodes.get(before[:-1], -1))
            reads.append(1 + nodes[before] if j else 0)
            targets.append(token)
            owner.append(c)
    sees = torch.eye(len(tokens), dtype=torch.bool)
    for i, p in enumerate(parent):
        if p >= 0:
            sees[i] |= sees[p]
    return ContinuationTrie(torch.tensor(tokens, dtype=torch.long), torch.tensor(depth, dtype=torch.long), sees,
                            torch.tensor(reads, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                            torch.tensor(owner, dtype=torch.long), len(continuations))


def stack_prefixes(prefixes: list[LayerKV], owner: torch.Tensor) -> tuple[LayerKV, torch.Tensor]:
    """Keys/values for a batch whose rows follow different prefixes (several tasks in one batch): row i gets
    prefixes[owner[i]] (each batch 1), right-aligned in the longest one's length K, so that it ends where the
    row's own tokens begin. Returns them (B rows) and the (B, K) mask of the slots each row's prefix fills."""
    lengths = torch.tensor([layers[0][0].shape[2] for layers in prefixes], device=owner.device)
    longest = int(lengths.max())
    stacked = []
    for layer in zip(*prefixes):  # one layer of every prefix: ((keys, values), ...)
        keys, values = (torch.cat([nn.functional.pad(kv[part], (0, 0, longest - kv[part].shape[2], 0)) for kv in layer])
                        for part in (0, 1))
        stacked.append((keys[owner], values[owner]))
    slots = torch.arange(longest, device=owner.device).unsqueeze(0)
    return stacked, (slots >= (longest - lengths[owner]).unsqueeze(1)).long()


def as_cache(base: nn.Module, layers: LayerKV, rows: int) -> DynamicCache:
    """A transformers cache holding `layers` (each batch 1) for `rows` rows, in the frozen weights' dtype."""
    cache, dtype = DynamicCache(config=base.config), base.get_input_embeddings().weight.dtype
    for i, (keys, values) in enumerate(layers):
        cache.update(keys.expand(rows, -1, -1, -1).to(dtype), values.expand(rows, -1, -1, -1).to(dtype), i)
    return cache


def cache_kwarg(model: nn.Module) -> str | None:
    """The model's name for the cache argument (transformers renamed past_key_values to cache)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only (pads before the first real token get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class SharedPrefix:
    """The shared prefix of a frozen causal LM `base` and a prompt `source`; every call takes left-aligned rows
    (input_ids, attention_mask), pads first. `reads_logits`: callers read the LM head's logits (what the probe
    then compares); otherwise the final states a classification head reads.

    Not an nn.Module: the base model and the prompt belong to the adapter that holds this engine, which sees
    them moved, cast or reloaded in place (kept keys/values are keyed on the source's `version()`). A key/value
    source has no concatenation to fall back on: where `shares` says no, its adapter has to refuse the call."""

    def __init__(self, base: nn.Module, source: PrefixSource, reads_logits: bool = True) -> None:
        self.base = base
        self.reads_logits = reads_logits
        self.forced_off: str | None = None  # a caller's reason to take the concatenated sequence (tests, benchmarks)
        self._checked = False  # whether `_reason` holds the outcome of the checks and the probe yet
        self._reason: str | None = None
        self._window_logged = False
        self._kept: tuple[Hashable, LayerKV, torch.Tensor | None] | None = None  # version, keys/values, last state
        self._source: PrefixSource = source
        self.kind = ""  # "input_vectors" or "key_values": what the source contributes
        self.source = source

    @property
    def source(self) -> PrefixSource:
        return self._source

    @source.setter
    def source(self, source: PrefixSource) -> None:
        """A new source (its adapter's prompt replaced): nothing kept or probed with the old one is used again.
        One with `key_values()` is taken as keys/values."""
        if isinstance(source, KeyValues):
            self.kind = "key_values"
        elif isinstance(source, InputVectors):
            self.kind = "input_vectors"
        else:
            raise TypeError(f"a shared prefix takes input vectors or per-layer keys/values, not "
                            f"{type(source).__name__}")
        self._source, self._kept, self._checked = source, None, False

    # -- whether to share ---------------------------------------------------------------------------------
    def force_off(self, reason: str | None = "forced off") -> None:
        """Make `shares` answer no (the adapter then takes the concatenation), or, with None, let it decide
        again from the model checks and the probe, whose outcome is kept."""
        self.forced_off = reason

    def cannot_share(self) -> str | None:
        """Why this model cannot share a prefix across a batch, from its config and layers (None: it can; a
        sliding window is checked per call, `shares`, and the probe once, `reason`)."""
        config = self.base.config.get_text_config()
        if not self.source.num_tokens:
            return "no prompt to share"
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
            return "logit soft-capping"
        if any(name.endswith("sinks") for name, _ in self.base.named_parameters()):
            return "attention sinks"
        try:
            layers = DynamicCache(config=self.base.config).layers
        except Exception as error:  # noqa: BLE001 - a config transformers' cache cannot lay out
            return f"no standard cache for it ({type(error).__name__}: {error})"
        if any("LinearAttention" in type(layer).__name__ for layer in layers):
            return "state-space or linear-attention layers"  # a packed row's state would run on into the next
        if self._cache_kwarg() is None:
            return f"{type(self.base.base_model).__name__} takes no cache"
        return None

    def reason(self) -> str | None:
        """`cannot_share`, or else the probe's objection; worked out on the first call (and logged), then kept."""
        if not self._checked:
            self._reason = self.cannot_share() or self._probe_mismatch()
            self._checked = True
            if self._reason and self._reason != "no prompt to share":
                log.warning("softprompt: %s cannot share the prompt across the batch (%s)%s", type(self.base).__name__,
                            self._reason, "; using the concatenated sequence" if self.kind == "input_vectors" else "")
        return self._reason

    def shares(self, length: int) -> bool:
        """Whether a call over `length` tokens per row (input plus anything generated after it) shares the
        prefix. With a sliding window only if prefix + row fit in it: then the window hides nothing, and
        attention is the full causal attention the shared prefix computes."""
        if self.forced_off is not None or self.reason() is not None:
            return False
        window = getattr(self.base.config.get_text_config(), "sliding_window", None)
        if window and self.source.num_tokens + length > window:
            if not self._window_logged:
                self._window_logged = True
                log.warning("softprompt: %d virtual + %d input tokens exceed %s's sliding window of %d; such "
                            "batches use the concatenated sequence", self.source.num_tokens, length,
                            type(self.base).__name__, window)
            return False
        return True

    def _probe_mismatch(self) -> str | None:
        """Check the shared prefix against the model's own forward once, on two ragged rows, before trusting it:
        a model whose attention does something the engine does not model (a bias, a custom kernel) then takes
        the concat instead of giving silently different results. The reference is the concatenation for input
        vectors, the model called with the keys/values as its cache for keys/values. None when both agree."""
        window = getattr(self.base.config.get_text_config(), "sliding_window", None)
        n = min(5, window - self.source.num_tokens) if window else 5
        if n < 2:
            return "a sliding window shorter than the prompt + 2 tokens"
        device = self.base.get_input_embeddings().weight.device
        vocab = self.base.get_input_embeddings().num_embeddings
        ids = (torch.arange(2 * n, device=device).view(2, n) * 7 + 100) % vocab
        ids[:, -2:] = ids[1, -2:]  # one tail for both rows: it runs again below as a branch of a continuation trie
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # left-padded, so the rows differ in length
        training = self.base.training
        self.base.eval()  # no dropout in either path
        # what is compared: the LM's logits (so a head beyond the output embeddings, or a rescaling, shows), or
        # the states a classification head reads
        try:
            with torch.no_grad():
                want = self._reference(ids, mask)[:, -2:].float()
            try:
                got = []
                for grad in (True, False):  # a training step's path (packed for input vectors), inference's (kept)
                    with torch.set_grad_enabled(grad):
                        hidden = self.states(ids, mask).hidden[:, -2:]
                        got.append((self.lm_logits(hidden) if self.reads_logits else hidden).detach().float())
                if n >= 5:  # each row keeps a real token before the tail
                    with torch.no_grad():  # the tail as trie nodes beside a sibling branch they must not see
                        hidden, _, cache = self.states(ids[:, :-2], mask[:, :-2], keep_cache=True)
                        tail = ids[1, -2:].tolist()
                        trie = continuation_trie([[(tail[0] + 1) % vocab, tail[1], tail[1]], tail + [tail[1]]])
                        hidden = self.trie_states(hidden[:, -1:], cache, trie)[:, -2:]
                        got.append((self.lm_logits(hidden) if self.reads_logits else hidden).float())
            except Exception as error:  # noqa: BLE001 - any failure means: use the concat
                return f"the shared prefix failed on a probe batch ({type(error).__name__}: {error})"
        finally:
            self.base.train(training)
        gap = max(float((g - want).abs().max()) for g in got) / max(float(want.abs().max()), 1e-6)
        dtype = self.base.get_input_embeddings().weight.dtype
        half = dtype != torch.float32 or torch.is_autocast_enabled(device.type)
        # fp32 paths agree up to rounding. In bf16 they round differently, so there only gross differences (a
        # missing head, cross-row leakage) show
        tolerance = 1e-1 if half else 1e-4
        if gap > tolerance:
            reference = "the concatenation" if self.kind == "input_vectors" else "the model given them as its cache"
            return f"on a probe batch it differed from {reference} by {gap:.1e} (relative)"
        return None

    def _reference(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model's own forward over prefix + left-aligned rows: logits, or final states with `reads_logits`
        off. Input vectors go in at each row's first real token (pads, prompt, text, as the decoder adapter's
        concatenation); keys/values go in as the cache, with the mask over prefix + tokens."""
        k, rows = self.source.num_tokens, ids.shape[0]
        model = self.base if self.reads_logits else self.base.base_model
        if self.kind == "key_values":
            out = self.cache_forward(ids, mask, model)
        else:
            embeds = self.base.get_input_embeddings()(ids)
            index = insertion_index(mask.shape[1] - mask.long().sum(1), ids.shape[1], k)
            prompt = self.source.embeddings()[None].expand(rows, -1, -1).to(embeds.dtype)
            full_mask = splice(mask, mask.new_ones(rows, k), index)
            out = model(inputs_embeds=splice(embeds, prompt, index), attention_mask=full_mask,
                        position_ids=positions_from_mask(full_mask))
        return out.logits if self.reads_logits else out.last_hidden_state

    def cache_forward(self, ids: torch.Tensor, mask: torch.Tensor, model: nn.Module | None = None, **kwargs):
        """`model` (default: the base)'s own forward over left-aligned rows with the key/value source as its
        cache, one copy per row (how peft runs prefix tuning): the probe's reference, and the path of a call the
        engine cannot share."""
        k, rows = self.source.num_tokens, ids.shape[0]
        cache = as_cache(self.base, cast(KeyValues, self.source).key_values(), rows)
        full_mask = torch.cat([mask.new_ones(rows, k), mask], 1)
        return (model or self.base)(input_ids=ids, attention_mask=full_mask,
                                    position_ids=positions_from_mask(full_mask)[:, k:],
                                    **{self._cache_kwarg(): cache}, **kwargs)

    # -- running rows after the prefix ----------------------------------------------------------------------
    def _cache_kwarg(self) -> str | None:
        """The backbone's name for the cache argument."""
        return cache_kwarg(self.base.base_model)

    def logit_scale(self) -> float:
        """What the model's own forward multiplies the LM head's output by: Cohere multiplies by
        `logit_scale`, Granite divides by `logits_scaling`; the shared prefix applies the head itself."""
        config = self.base.config.get_text_config()
        return (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over final states, rescaled as the model's own forward does."""
        logits = self.base.get_output_embeddings()(hidden)
        scale = self.logit_scale()
        return logits if scale == 1.0 else logits * scale

    def prefix_states(self) -> tuple[LayerKV, torch.Tensor | None]:
        """Per-layer keys/values of the prefix (batch 1) and, for input vectors, their last hidden state; kept
        under no_grad until the source's version changes."""
        key = self.source.version()
        if not torch.is_grad_enabled() and self._kept is not None and self._kept[0] == key:
            return self._kept[1], self._kept[2]
        dtype = self.base.get_input_embeddings().weight.dtype
        if self.kind == "key_values":  # in the frozen weights' dtype, as the rows' own keys/values come
            layers, last = [(keys.to(dtype), values.to(dtype)) for keys, values in self.source.key_values()], None
        else:
            cache = DynamicCache(config=self.base.config)
            prompt = self.source.embeddings()
            positions = torch.arange(self.source.num_tokens, device=prompt.device)[None]
            out = self.base.base_model(inputs_embeds=prompt[None].to(dtype), position_ids=positions, use_cache=True,
                                       **{self._cache_kwarg(): cache})
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            last = out.last_hidden_state[:, -1:]
        if not torch.is_grad_enabled():
            self._kept = (key, layers, last)
        return layers, last

    def run_cached(self, layers: LayerKV, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        """Run tokens after cached keys/values (expanded to the batch); `mask` covers cache and tokens. Returns
        the tokens' final states and the keys/values of cache + tokens."""
        cache = DynamicCache(config=self.base.config)
        for i, (keys, values) in enumerate(layers):
            cache.update(keys.expand(input_ids.shape[0], -1, -1, -1), values.expand(input_ids.shape[0], -1, -1, -1), i)
        with grouped_attention(self.base):
            out = self.base.base_model(inputs_embeds=self.base.get_input_embeddings()(input_ids), attention_mask=mask,
                                       position_ids=positions, use_cache=True, **{self._cache_kwarg(): cache})
        return out.last_hidden_state, [(layer.keys, layer.values) for layer in cache.layers]

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_cache: bool = False) -> Rows:
        """Final states of the rows after the prefix (positions counted from k), with the prefix's last state
        and, with `keep_cache`, the keys/values of prefix + rows. A training step of input vectors runs prompt
        and rows packed into one sequence; otherwise (and always for keys/values, which keep their graph) the
        rows run after the prefix's keys/values."""
        k = self.source.num_tokens
        full_mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], k), attention_mask], 1)
        positions = positions_from_mask(full_mask)[:, k:]
        if torch.is_grad_enabled() and not keep_cache and self.kind == "input_vectors" and can_pack(self.base):
            return Rows(*self._packed(input_ids, attention_mask, positions), None)
        layers, last = self.prefix_states()
        hidden, layers = self.run_cached(layers, input_ids, full_mask, positions)
        return Rows(hidden, last, (layers, full_mask, positions[:, -1:]))

    def _packed(self, input_ids, attention_mask, positions):
        """One forward over prompt + every row as a single sequence of k + B*n; see attention.packed_sdpa."""
        k, (rows, n) = self.source.num_tokens, input_ids.shape
        embeds = self.base.get_input_embeddings()(input_ids)
        packed = torch.cat([self.source.embeddings().to(embeds.dtype), embeds.flatten(0, 1)])[None]
        packed_positions = torch.cat([torch.arange(k, device=positions.device), positions.flatten()])[None]
        with packed_attention(self.base, k, attention_mask):
            hidden = self.base.base_model(inputs_embeds=packed, position_ids=packed_positions,
                                          use_cache=False).last_hidden_state[0]
        return hidden[k:].view(rows, n, -1), hidden[None, k - 1:k]

    # -- what callers read -------------------------------------------------------------------------------
    def tail_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
        """LM logits of the last `keep` columns only: the head over a large vocabulary at every position costs
        as much as several layers, and label words sit at the end of each row."""
        hidden = self.states(input_ids, attention_mask).hidden[:, -keep:]
        return self.lm_logits(hidden.contiguous())  # on a strided view the head runs as a slower batched matmul

    def lm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled tokens (-100: none), the LM head run only where there is
        a label and without keeping the logits. Input vectors predict each row's first real token from their
        last state; keys/values have none, so a label there is refused rather than dropped."""
        labelled = labels != -100
        if self.kind == "key_values":
            first_real = (attention_mask.cumsum(1) == 1) & (attention_mask == 1)
            if bool((labelled & first_real).any()):
                raise SoftpromptError("a row's first real token is labelled, but a key/value prefix has no output "
                                      "state to predict it from; leave the first token unlabelled (e.g. start rows "
                                      "with BOS)")
            # column j is predicted by column j-1, a real token wherever j is labelled
            hidden = self.states(input_ids, attention_mask).hidden[:, :-1]
            return lm_cross_entropy(hidden[labelled[:, 1:]], self.base.get_output_embeddings(),
                                    labels[:, 1:][labelled[:, 1:]], self.logit_scale())
        hidden, last, _ = self.states(input_ids, attention_mask)
        # the state that predicts column j: column j-1's, or the prompt's last for each row's first real token
        before = torch.cat([last.expand(hidden.shape[0], 1, -1), hidden[:, :-1]], dim=1)
        first_real = (attention_mask.cumsum(1) == 1) & (attention_mask == 1)
        before = torch.where(first_real.unsqueeze(-1), last, before)
        return lm_cross_entropy(before[labelled], self.base.get_output_embeddings(), labels[labelled],
                                self.logit_scale())

    def continuation_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            continuations: list[list[int]]) -> list[torch.Tensor]:
        """For each continuation (the same token list after every row), the logits (B, len, V) predicting its
        tokens, read off one forward of the continuations' trie (`trie_states`) after prefix and input."""
        hidden, _, cache = self.states(input_ids, attention_mask, keep_cache=True)
        trie = continuation_trie(continuations)
        logits = self.lm_logits(self.trie_states(hidden[:, -1:], cache, trie))
        reads = trie.reads.to(logits.device)
        owner = trie.owner.to(logits.device)
        return [logits[:, reads[owner == c]] for c in range(trie.count)]

    def continuation_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              continuations: list[list[int]]) -> torch.Tensor:
        """(B, continuations): each continuation's log-likelihood after each row, the sum over its tokens (rank
        classification of multi-token label strings). Prefix and input run once, then every continuation's
        tokens for every row in one more forward; differentiable, for the rank loss."""
        hidden, _, cache = self.states(input_ids, attention_mask, keep_cache=True)
        return self.logprobs_after(hidden[:, -1:], cache, continuations)

    def logprobs_after(self, last: torch.Tensor, cache: tuple[LayerKV, torch.Tensor, torch.Tensor],
                       continuations: list[list[int]]) -> torch.Tensor:
        """`continuation_logprobs` from rows already run: their last states (B, 1, d) and `Rows.cache`."""
        trie = continuation_trie(continuations)
        logits = self.lm_logits(self.trie_states(last, cache, trie)).float()  # (B, 1 + nodes, V)
        reads, targets, owner = (t.to(logits.device) for t in (trie.reads, trie.targets, trie.owner))
        # each state's log-normaliser once, however many continuations read a token off it
        picked = logits[:, reads, targets] - logits.logsumexp(-1)[:, reads]  # (B, tokens of all continuations)
        return picked.new_zeros(logits.shape[0], trie.count).index_add(1, owner, picked)

    def trie_states(self, last: torch.Tensor, cache: tuple[LayerKV, torch.Tensor, torch.Tensor],
                    trie: ContinuationTrie) -> torch.Tensor:
        """(B, 1 + nodes, d): the rows' last states (B, 1, d), then the final state of every node of `trie` after
        every row, all nodes of all rows in one forward over the rows' keys/values (`Rows.cache`). A node attends
        to its row's prefix and real tokens, its ancestors and itself, at its depth after the row's last
        position: what it would see with its continuation appended to the row."""
        if not trie.tokens.numel():  # one-token continuations only: the rows' last states predict them all
            return last
        layers, mask, last_position = cache
        rows, nodes, device = last.shape[0], trie.tokens.shape[0], last.device
        sees = torch.cat([mask.bool()[:, None].expand(-1, nodes, -1), trie.sees.to(device).expand(rows, -1, -1)], 2)
        dtype = layers[0][0].dtype
        # additive, so that eager attention reads it as SDPA does; transformers passes a 4-d mask on unchanged
        bias = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill_(~sees, torch.finfo(dtype).min)
        ids = trie.tokens.to(device).expand(rows, -1)
        hidden = self.run_cached(layers, ids, bias[:, None], last_position + trie.depth.to(device))[0]
        return torch.cat([last, hidden], dim=1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation after prefix + rows, from their keys/values; only the new token ids."""
        hidden, _, cache = self.states(input_ids, attention_mask, keep_cache=True)
        return self.greedy_after(hidden[:, -1], cache, max_new_tokens)

    @torch.no_grad()
    def greedy_after(self, last: torch.Tensor, cache: tuple[LayerKV, torch.Tensor, torch.Tensor],
                     max_new_tokens: int) -> torch.Tensor:
        """`generate` from rows already run: their last states (B, d) and `Rows.cache`."""
        layers, mask, position = cache
        new = []
        for _ in range(max_new_tokens):
            token = self.lm_logits(last).argmax(-1, keepdim=True)
            new.append(token)
            mask, position = torch.cat([mask, mask.new_ones(token.shape)], dim=1), position + 1
            hidden, layers = self.run_cached(layers, token, mask, position)
            last = hidden[:, -1]
        return torch.cat(new, dim=1)
