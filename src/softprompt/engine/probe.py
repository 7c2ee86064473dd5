"""The one-time probe: the shared prefix checked against the model's own forward on two ragged rows before it is
trusted, so that a model whose attention does something the engine does not model (a bias, a custom kernel, a
head beyond the output embeddings) takes the concatenation instead of giving silently different results.

The reference is the model's own forward: over the concatenation for input vectors, with the keys/values as its
cache for keys/values. Compared are the LM's logits (a head beyond the output embeddings, or a missed rescaling,
shows) or, without label words, the states a classification head reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from .cache import cache_forward, positions_from_mask
from .paths import RowsCache, continuation_trie, trie_states
from .sharing import sliding_window
from .sources import InputVectors, KeyValues
from .splice import insertion_index, splice

if TYPE_CHECKING:
    from .engine import SharedPrefix

# The largest gap (max |shared - reference| / max |reference|) the probe accepts, by device type and the dtype the
# model computes in. The paths add the same products in other orders (a batch of one against two, packed against
# padded rows, other attention kernels), so they differ by rounding alone. Measured on an AMD EPYC (1 and 2
# threads): fp32 up to 3e-7 on the tiny test models and 2e-5 on SmolLM2, and 1.6e-4 seen on another AMD EPYC; bf16
# up to 1.4e-2 on the tiny models, 2.7e-2 on SmolLM2 with a prompt, 9e-2 with a prefix whose keys/values moved far
# from their start (and one draw of a dozen: 5e-1). Planted faults differ by 1.2e-3 (BertGeneration attending both
# ways, fp32; 4e-3 in bf16), by 6e-2 to 5e-1 (a trie branch seeing its sibling) and by 1e-1 to 3 (keys/values
# dropped, a bias skipped, a rescaling or a head missed).
TOLERANCES: dict[tuple[str, torch.dtype], tuple[float, str]] = {
    ("cpu", torch.float32): (1e-3, "6x the largest fp32 rounding seen, under the subtlest planted fault"),
    ("cpu", torch.bfloat16): (1e-1, "above bf16 rounding but for rare draws; only the gross faults show"),
    ("cpu", torch.float16): (1e-1, "as bf16 (not measured): finer rounding, a narrower range"),
    ("cuda", torch.float32): (1e-3, "as on CPU (not measured on a GPU); TF32 matmuls count as bf16"),
    ("cuda", torch.bfloat16): (1e-1, "as on CPU (not measured on a GPU)"),
    ("cuda", torch.float16): (1e-1, "as on CPU (not measured on a GPU)"),
}


class ProbeFailed(Exception):
    """A shared path raised on the probe batch (the error it raised is the cause)."""


def tolerance(base: PreTrainedModel) -> float:
    """`TOLERANCES`' bound for where `base` computes: under autocast in its dtype; fp32 whose matmuls may run in
    TF32 or bf16 (`torch.set_float32_matmul_precision`) counts as bf16; another accelerator is held to CUDA's."""
    weight = cast(nn.Embedding, base.get_input_embeddings()).weight
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if dtype.itemsize >= 4:
        dtype = torch.float32 if torch.get_float32_matmul_precision() == "highest" else torch.bfloat16
    elif dtype != torch.float16:
        dtype = torch.bfloat16
    return TOLERANCES[("cpu" if device == "cpu" else "cuda", dtype)][0]


def reference(engine: SharedPrefix, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's own forward over prefix + left-aligned rows: logits, or final states with `reads_logits`
    off. Input vectors go in at each row's first real token (pads, prompt, text, as the decoder adapter's
    concatenation); keys/values go in as the cache, with the mask over prefix + tokens."""
    base, k, rows = engine.base, engine.source.num_tokens, ids.shape[0]
    model = base if engine.reads_logits else base.base_model
    if engine.kind == "key_values":
        out = cache_forward(base, cast(KeyValues, engine.source), ids, mask, model)
    else:
        embeds = base.get_input_embeddings()(ids)
        index = insertion_index(mask.shape[1] - mask.long().sum(1), ids.shape[1], k)
        prompt = cast(InputVectors, engine.source).embeddings()[None].expand(rows, -1, -1).to(embeds.dtype)
        full_mask = splice(mask, mask.new_ones(rows, k), index)
        out = model(inputs_embeds=splice(embeds, prompt, index), attention_mask=full_mask,
                    position_ids=positions_from_mask(full_mask))
    return out.logits if engine.reads_logits else out.last_hidden_state


def probe_length(engine: SharedPrefix) -> int:
    """Tokens per probe row: 5, or fewer where prefix + 5 would pass a sliding window."""
    window = sliding_window(engine.base)
    return min(5, window - engine.source.num_tokens) if window else 5


def probe_gap(engine: SharedPrefix, n: int) -> float:
    """The largest relative gap between the engine's paths and `reference` over the last two columns of two rows of
    `n` tokens, one left-padded: a training step's path (packed, for input vectors), inference's (from kept
    keys/values) and, with n >= 5, the continuation trie's, its nodes beside a sibling branch they must not see.
    Dropout is off for both. A shared path that raises raises `ProbeFailed`; the reference's errors pass."""
    base = engine.base
    embedding = cast(nn.Embedding, base.get_input_embeddings())
    vocab = embedding.num_embeddings
    ids = (torch.arange(2 * n, device=embedding.weight.device).view(2, n) * 7 + 100) % vocab
    ids[:, -2:] = ids[1, -2:]  # one tail for both rows: it runs again below as a branch of a continuation trie
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left-padded, so the rows differ in length

    def read(hidden: torch.Tensor) -> torch.Tensor:
        return engine.lm_logits(hidden) if engine.reads_logits else hidden

    training = base.training
    base.eval()
    try:
        with torch.no_grad():
            want = reference(engine, ids, mask)[:, -2:].float()
        try:
            got = []
            for grad in (True, False):
                with torch.set_grad_enabled(grad):
                    got.append(read(engine.states(ids, mask).hidden[:, -2:]).detach().float())
            if n >= 5:  # each row keeps a real token before the tail
                with torch.no_grad():
                    hidden, _, cache = engine.states(ids[:, :-2], mask[:, :-2], keep_cache=True)
                    tail = ids[1, -2:].tolist()
                    trie = continuation_trie([[(tail[0] + 1) % vocab, tail[1], tail[1]], tail + [tail[1]]])
                    got.append(read(trie_states(base, hidden[:, -1:], cast(RowsCache, cache), trie)[:, -2:]).float())
        except Exception as error:  # noqa: BLE001 - any failure means: use the concat
            raise ProbeFailed from error
    finally:
        base.train(training)
    return max(float((g - want).abs().max()) for g in got) / max(float(want.abs().max()), 1e-6)


def probe_mismatch(engine: SharedPrefix) -> str | None:
    """Why the probe refuses the shared prefix for `engine`'s model (None: it agrees with the model's own forward
    within `tolerance`)."""
    n = probe_length(engine)
    if n < 2:
        return "a sliding window shorter than the prompt + 2 tokens"
    try:
        gap = probe_gap(engine, n)
    except ProbeFailed as failure:
        error = failure.__cause__
        return f"the shared prefix failed on a probe batch ({type(error).__name__}: {error})"
    if gap > tolerance(engine.base):
        against = "the concatenation" if engine.kind == "input_vectors" else "the model given them as its cache"
        return f"on a probe batch it differed from {against} by {gap:.1e} (relative)"
    return None
