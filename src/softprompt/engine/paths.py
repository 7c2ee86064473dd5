"""How rows run after a shared prefix: the packed training step, rows after cached keys/values, the
continuations' trie, continuation (greedy or sampled); and the LM head and loss over the states they give."""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from transformers import PreTrainedModel

from .attention import grouped_attention, packed_attention
from .cache import cache_layers, filled_cache
from .lm_loss import lm_cross_entropy
from .sharing import cache_argument
from .sources import InputVectors, LayerKV

RowsCache = tuple[LayerKV, torch.Tensor, torch.Tensor]  # keys/values of prefix + rows, mask over both (B, k + n),
# each row's last position (B, 1): what running more tokens after the rows needs


class Rows(NamedTuple):
    """What a run of (left-aligned) rows after the shared prefix gives. `hidden` (B, n, d): the rows' final
    states, what an LM head or a classification head reads. `last` (1, 1, d): the prefix's last state, which
    predicts each row's first real token (input vectors only). `cache` (with keep_cache): to run more tokens."""

    hidden: torch.Tensor
    last: torch.Tensor | None
    cache: RowsCache | None


def first_real(mask: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: each left-aligned row's first real token."""
    return (mask.cumsum(1) == 1) & (mask == 1)


def packed(base: PreTrainedModel, source: InputVectors, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           positions: torch.Tensor) -> Rows:
    """One forward over prompt + every row as a single sequence of k + B*n; see attention.packed_sdpa."""
    k, (rows, n) = source.num_tokens, input_ids.shape
    embeds = base.get_input_embeddings()(input_ids)
    sequence = torch.cat([source.embeddings().to(embeds.dtype), embeds.flatten(0, 1)])[None]
    sequence_positions = torch.cat([torch.arange(k, device=positions.device), positions.flatten()])[None]
    with packed_attention(base, k, attention_mask):
        hidden = base.base_model(inputs_embeds=sequence, position_ids=sequence_positions,
                                 use_cache=False).last_hidden_state[0]
    return Rows(hidden[k:].view(rows, n, -1), hidden[None, k - 1:k], None)


def run_cached(base: PreTrainedModel, layers: LayerKV, input_ids: torch.Tensor, mask: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, LayerKV]:
    """Run tokens after cached keys/values (expanded to the batch); `mask` covers cache and tokens. Returns the
    tokens' final states and the keys/values of cache + tokens."""
    cache = filled_cache(base, layers, input_ids.shape[0])
    with grouped_attention(base):
        out = base.base_model(inputs_embeds=base.get_input_embeddings()(input_ids), attention_mask=mask,
                              position_ids=positions, use_cache=True, **cache_argument(base, cache))
    return out.last_hidden_state, cache_layers(cache)


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
    continuations: int  # how many continuations (`count` would shadow tuple.count)


def continuation_trie(continuations: list[list[int]]) -> ContinuationTrie:
    nodes: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    depth, parent, reads, targets, owner = [], [], [], [], []
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


def trie_states(base: PreTrainedModel, last: torch.Tensor, cache: RowsCache, trie: ContinuationTrie) -> torch.Tensor:
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
    hidden = run_cached(base, layers, ids, bias[:, None], last_position + trie.depth.to(device))[0]
    return torch.cat([last, hidden], dim=1)


def logit_scale(base: PreTrainedModel) -> float:
    """What the model's own forward multiplies the LM head's output by: Cohere multiplies by `logit_scale`,
    Granite divides by `logits_scaling`; the shared prefix applies the head itself."""
    config = base.config.get_text_config()
    return (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)


def lm_logits(base: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head over final states, rescaled as the model's own forward does."""
    logits = base.get_output_embeddings()(hidden)
    scale = logit_scale(base)
    return logits if scale == 1.0 else logits * scale


def logprobs_after(base: PreTrainedModel, last: torch.Tensor, cache: RowsCache,
                   continuations: list[list[int]]) -> torch.Tensor:
    """(B, continuations): each continuation's summed token log-probs after rows already run, from their last
    states (B, 1, d) and `Rows.cache`: every continuation of every row in one forward of their trie."""
    trie = continuation_trie(continuations)
    logits = lm_logits(base, trie_states(base, last, cache, trie)).float()  # (B, 1 + nodes, V)
    reads, targets, owner = (t.to(logits.device) for t in (trie.reads, trie.targets, trie.owner))
    # each state's log-normaliser once, however many continuations read a token off it
    picked = logits[:, reads, targets] - logits.logsumexp(-1)[:, reads]  # (B, tokens of all continuations)
    return picked.new_zeros(logits.shape[0], trie.continuations).index_add(1, owner, picked)


class Sampler(NamedTuple):
    """How the next token is picked from the LM head's logits: the most likely at temperature 0 (greedy), else
    drawn from the softmax at `temperature` over the nucleus (the most likely tokens whose probability first
    reaches `top_p`). Each row draws from its own generator (None: torch's global one), one number per token, so a
    seeded row picks the same tokens whatever rows share its batch."""

    temperature: float = 0.0
    top_p: float = 1.0

    def pick(self, logits: torch.Tensor, generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
        """(B, 1) token ids from logits (B, V)."""
        if self.temperature == 0:
            return logits.argmax(-1, keepdim=True)
        probs, order = torch.softmax(logits.float() / self.temperature, -1).sort(-1, descending=True)
        if self.top_p < 1:
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0)  # past the nucleus (its first stays)
        cumulative = probs.cumsum(-1)
        # uniform draws on the CPU, each from its row's generator: the same numbers on any device
        draws = torch.stack([torch.rand((), generator=g) for g in generators or [None] * len(probs)])
        at = torch.searchsorted(cumulative, draws.to(cumulative.device)[:, None] * cumulative[:, -1:])
        return order.gather(-1, at.clamp(max=probs.shape[-1] - 1))


Finished = Callable[[torch.Tensor], torch.Tensor]  # each step's new tokens (B, 1) -> (B,) bool: the row is done


@torch.no_grad()
def sample_after(base: PreTrainedModel, last: torch.Tensor, cache: RowsCache, max_new_tokens: int,
                 sampler: Sampler = Sampler(), generators: Sequence[torch.Generator | None] | None = None,
                 finished: Finished | None = None) -> torch.Tensor:
    """Continuation of rows already run, from their last states (B, d) and `Rows.cache`: the new token ids (B, t),
    t at most `max_new_tokens`, fewer once `finished` says every row is done (a finished row's later tokens are
    whatever came; its caller reads up to its end). Greedy with the default sampler."""
    layers, mask, position = cache
    new = []
    for step in range(max_new_tokens):
        token = sampler.pick(lm_logits(base, last), generators)
        new.append(token)
        done = finished is not None and bool(finished(token).all())  # every token seen, the last one too
        if done or step + 1 == max_new_tokens:
            break
        mask, position = torch.cat([mask, mask.new_ones(token.shape)], dim=1), position + 1
        hidden, layers = run_cached(base, layers, token, mask, position)
        last = hidden[:, -1]
    return torch.cat(new, dim=1)


def lm_loss(base: PreTrainedModel, rows: Rows, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens (-100: none) from the rows' states, the LM head run only
    where there is a label and without keeping the logits. A row's first real token is predicted by the prefix's
    last state (`rows.last`), which a key/value prefix does not have: its caller refuses a label there."""
    labelled, last = labels != -100, rows.last
    if last is None:  # column j is predicted by column j-1, a real token wherever j is labelled
        hidden = rows.hidden[:, :-1]
        return lm_cross_entropy(hidden[labelled[:, 1:]], base.get_output_embeddings(),
                                labels[:, 1:][labelled[:, 1:]], logit_scale(base))
    # the state that predicts column j: column j-1's, or the prompt's last for each row's first real token
    before = torch.cat([last.expand(rows.hidden.shape[0], 1, -1), rows.hidden[:, :-1]], dim=1)
    before = torch.where(first_real(attention_mask).unsqueeze(-1), last, before)
    return lm_cross_entropy(before[labelled], base.get_output_embeddings(), labels[labelled], logit_scale(base))
