"""Decoder-only causal LMs (Llama, Qwen, Mistral, GPT-2, ...).

Rows are left-aligned and the prompt goes right before each row's first real token:
pads p1..pk text. Position ids count real tokens only, so left and right padding give identical
results, the last column is always a real token (generation and last-token pooling rely on it), and the
first real token's loss is predicted from the last virtual token, exactly as without padding.
"""

from __future__ import annotations

import torch

from ..config import TaskType
from .base import PromptModel


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class DecoderPromptModel(PromptModel):
    pad_side = "left"
    family = "decoder"

    def _offsets(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.shape[1] - mask.long().sum(1)

    def _extra_inputs(self, mask, token_type_ids, fill) -> dict:
        return {"position_ids": positions_from_mask(mask)}

    def _postprocess(self, out, order, offsets):
        """Give back logits for the caller's own tokens, in the caller's own layout (no virtual columns)."""
        if self.config.task_type is not TaskType.CAUSAL_LM or getattr(out, "logits", None) is None:
            return out
        # column of aligned token j in the spliced sequence: j before the prompt, j + k after it
        j = torch.arange(order.shape[1], device=order.device).unsqueeze(0)
        token_cols = torch.where(j < offsets.unsqueeze(1), j, j + self.prompt.num_tokens)
        logits = out.logits.gather(1, token_cols.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))
        out.logits = logits.gather(1, torch.argsort(order, dim=1).unsqueeze(-1).expand_as(logits))
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Greedy/sampled continuation after prompt + input; returns only the new token ids."""
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask)
        inputs.pop("position_ids")
        return self.base.generate(**inputs, **kwargs)
