"""The shared-prefix engine: a decoder's prompt run once per batch instead of once per row.

sources.py    what a prompt method contributes: input vectors or per-layer keys/values (`LayerKV`)
sharing.py    which models may share a prefix (the model checks, the sliding-window rule)
probe.py      the one-time check against the model's own forward, with its tolerances
cache.py      the prefix's keys/values, kept until the prompt changes; as a transformers cache; stacked
paths.py      the packed training step, rows after cached keys/values, the continuations' trie, greedy
              continuation, the LM head and loss
engine.py     `SharedPrefix`, one adapter's engine: the above behind its public calls
attention.py  the attention functions registered with transformers (packed, grouped-query SDPA on CPU)
lm_loss.py    cross-entropy through the frozen LM head without keeping logits
splice.py     where a prompt goes in each row of the concatenated sequence
"""

from .cache import as_cache, cache_layers, positions_from_mask, stack_prefixes
from .engine import SharedPrefix
from .lm_loss import lm_cross_entropy
from .paths import ContinuationTrie, Rows, RowsCache, continuation_trie
from .sharing import cache_kwarg, cannot_share
from .sources import InputVectors, KeyValues, LayerKV, PrefixSource, parameters_version
from .splice import insertion_index, splice

__all__ = [
    "SharedPrefix", "InputVectors", "KeyValues", "PrefixSource", "LayerKV", "parameters_version", "cannot_share",
    "cache_kwarg", "as_cache", "cache_layers", "positions_from_mask", "stack_prefixes", "Rows", "RowsCache",
    "ContinuationTrie", "continuation_trie", "lm_cross_entropy", "insertion_index", "splice",
]
