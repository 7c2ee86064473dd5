"""Grouped-query attention without repeated key/value heads when a mask is present (CPU).

transformers' SDPA path copies every key/value head once per query head of its group whenever the
attention mask is explicit, and the shared prefix always needs one (queries are fewer than keys). On
CPU, torch's SDPA accepts the mask and grouped heads together, so the copy, which costs as much as the
attention itself there, can go. Other devices keep transformers' own path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "softprompt_gqa_sdpa"
_TORCH_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
             **kwargs):
    """transformers' attention-function signature; query (B, H, q, d), key/value (B, G, kv, d)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal  # no mask only when q == kv or q == 1
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, gqa_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def grouped_attention(model: torch.nn.Module):
    """Run `model` with `gqa_sdpa` while inside, where it uses SDPA on CPU; otherwise leave it alone."""
    config = model.config
    text = config.get_text_config()
    grouped = getattr(text, "num_key_value_heads", None) not in (None, text.num_attention_heads)
    swap = _TORCH_HAS_GQA and grouped and config._attn_implementation == "sdpa" and model.device.type == "cpu"
    if not swap:
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
