"""The shared-prefix engine: a decoder's prompt run once per batch instead of once per row.

By job: sources.py (what a prompt method hands it), sharing.py (which models may share), probe.py (the one-time
check against the model's own forward), cache.py (the prefix's keys/values), paths.py (how rows run after them),
engine.py (`SharedPrefix`, composing them), attention.py and lm_loss.py (the kernels), splice.py (the
concatenation's layout); docs/architecture.md has a line on each.
"""

from .cache import as_cache, cache_layers, positions_from_mask, stack_prefixes
from .engine import SharedPrefix
from .lm_loss import lm_cross_entropy
from .paths import ContinuationTrie, Finished, Rows, RowsCache, Sampler, continuation_trie
from .sharing import cache_kwarg, cannot_share
from .sources import InputVectors, KeyValues, LayerKV, PrefixSource, parameters_version
from .splice import insertion_index, splice

__all__ = [
    "SharedPrefix", "InputVectors", "KeyValues", "PrefixSource", "LayerKV", "parameters_version", "cannot_share",
    "cache_kwarg", "as_cache", "cache_layers", "positions_from_mask", "stack_prefixes", "Rows", "RowsCache",
    "ContinuationTrie", "continuation_trie", "Sampler", "Finished", "lm_cross_entropy", "insertion_index", "splice",
]
