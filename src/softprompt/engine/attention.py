"""Attention functions swapped into transformers models for the shared prompt prefix.

Packed training step: the prompt's k tokens and all B rows of n tokens run as one sequence of k + B*n
(every linear layer sees one big matrix, the prompt is computed once); only attention splits it, the
prompt attending to itself and each row to the prompt and itself, so nothing attends across rows.

Grouped-query attention without repeated key/value heads when a mask is present (CPU): transformers'
SDPA path copies every key/value head once per query head of its group whenever the attention mask is
explicit, and the shared prefix always needs one (queries are fewer than keys). On
CPU, torch's SDPA accepts the mask and grouped heads together, so the copy, which costs as much as the
attention itself there, can go. Other devices keep transformers' own path.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import cast

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "softprompt_gqa_sdpa"
PACKED = "softprompt_packed"
_TORCH_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
_layout: ContextVar[tuple[int, torch.Tensor]] = ContextVar("softprompt_packed_layout")


def _sdpa(query, key, value, **kwargs):
    """SDPA over grouped heads; torch before 2.5 gets the key/value heads repeated instead.

    bf16 on CPU runs in fp32: torch's CPU flash-attention backward is several times slower in bf16 than in
    fp32, where attention is a small part of the work (docs/recipe.md, "Precision")."""
    if query.device.type == "cpu" and query.dtype == torch.bfloat16:
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kwargs["attn_mask"] = mask.float()
        with torch.autocast("cpu", enabled=False):
            return _sdpa(query.float(), key.float(), value.float(), **kwargs).to(query.dtype)
    if query.shape[1] == key.shape[1]:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, **kwargs)
    if _TORCH_HAS_GQA:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True, **kwargs)
    group = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), **kwargs)


# attention arguments some models pass that change what attention computes; the functions here implement
# none of them, so they refuse rather than silently ignore one (models with these normally fall back to the
# concat before getting here: see sharing.cannot_share). A sliding window is harmless when every key a query
# could see lies within it.
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias", "indices", "block_indices")


def _refuse_unsupported(module, kwargs, keys: int) -> None:
    """`keys`: the most keys one query attends to (prompt + row)."""
    used = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if "sliding_window" in used and keys <= kwargs["sliding_window"]:
        used.remove("sliding_window")
    if used:
        raise NotImplementedError(f"softprompt's shared prompt prefix cannot run {type(module).__name__} attention "
                                  f"with {', '.join(used)}; please report this model, which should have fallen "
                                  "back to the concatenated sequence")


def gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
             **kwargs):
    """transformers' attention-function signature; query (B, H, q, d), key/value (B, G, kv, d)."""
    _refuse_unsupported(module, kwargs, key.shape[2])
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal  # no mask only when q == kv or q == 1
    out = _sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal)
    return out.transpose(1, 2).contiguous(), None


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (1, H, k + B*n, d), key/value (1, G, k + B*n, d) in the packed layout; returns (1, k + B*n, H, d)."""
    k, row_mask = _layout.get()  # row_mask (B, 1, n, k + n): which prompt and row keys each row token sees
    rows, n = row_mask.shape[0], row_mask.shape[2]
    _refuse_unsupported(module, kwargs, k + n)

    # split rather than sliced: the backward of a split concatenates the parts' gradients, where each slice
    # would zero-fill a gradient of the whole packed tensor and copy its part in
    (q_prompt, q_rows), (k_prompt, k_rows), (v_prompt, v_rows) = (t.split([k, t.shape[2] - k], dim=2)
                                                                  for t in (query, key, value))

    def per_row(t):  # (1, heads, B*n, d) -> (B, heads, n, d); squeeze, as indexing's backward zero-fills a copy
        return t.squeeze(0).unflatten(1, (rows, n)).transpose(0, 1)

    # copies, so that what the prompt's attention saves for backward does not pin the packed keys/values
    k_prompt, v_prompt = k_prompt.clone(), v_prompt.clone()
    prompt_out = _sdpa(q_prompt, k_prompt, v_prompt, dropout_p=dropout, scale=scaling, is_causal=True)
    keys = torch.cat([k_prompt.expand(rows, -1, -1, -1), per_row(k_rows)], dim=2)
    values = torch.cat([v_prompt.expand(rows, -1, -1, -1), per_row(v_rows)], dim=2)
    row_out = _sdpa(per_row(q_rows), keys, values, attn_mask=row_mask, dropout_p=dropout, scale=scaling)
    # SDPA gives its output in the query's memory layout, (B, n, H, d) here, so this is the one copy
    out = torch.cat([prompt_out.squeeze(0).transpose(0, 1), row_out.transpose(1, 2).flatten(0, 1)])
    return out.unsqueeze(0), None  # (1, k + B*n, H, d)


def _no_mask(*args, **kwargs):
    return None  # packed_sdpa builds its own masks from the layout


AttentionInterface.register(NAME, gqa_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)
AttentionInterface.register(PACKED, packed_sdpa)
AttentionMaskInterface.register(PACKED, _no_mask)


def _layers_config(model: torch.nn.Module):
    """The config the attention layers read: the backbone's. A head wrapper built around a backbone shared by
    several tasks (multitask/backbones.py) has a config of its own, so switching the wrapper's would change nothing."""
    return cast(PreTrainedModel, model.base_model).config


def can_pack(model: torch.nn.Module) -> bool:
    """The packed step replaces SDPA, so it runs where the model uses SDPA."""
    return _layers_config(model)._attn_implementation == "sdpa"


@contextmanager
def packed_attention(model: torch.nn.Module, prompt_tokens: int, row_mask: torch.Tensor):
    """Run `model` on the packed layout while inside: `row_mask` (B, n) marks each row's real tokens."""
    n = row_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=row_mask.device).tril()
    visible = torch.cat([causal.new_ones(n, prompt_tokens), causal], dim=1)  # (n, k + n)
    keys = torch.cat([row_mask.new_ones(row_mask.shape[0], prompt_tokens), row_mask], dim=1).bool()
    token = _layout.set((prompt_tokens, (visible[None] & keys[:, None])[:, None]))
    config = _layers_config(model)
    config._attn_implementation = PACKED
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
        _layout.reset(token)


@contextmanager
def grouped_attention(model: torch.nn.Module):
    """Run `model` with `gqa_sdpa` while inside, where it uses SDPA on CPU; otherwise leave it alone."""
    config = _layers_config(model)
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
