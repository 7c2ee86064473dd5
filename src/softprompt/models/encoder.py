"""BERT/RoBERTa-style encoders with a classification head.

The pooled position ([CLS] or <s>) must stay the first real token, so the prompt goes right after it:
[CLS] p1..pk text [SEP] pads. Padding is moved to the right so absolute positions stay contiguous.
"""

from __future__ import annotations

import torch

from .base import PromptModel


class EncoderPromptModel(PromptModel):
    pad_side = "right"
    family = "encoder"

    def _offsets(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.ones(mask.shape[0], dtype=torch.long, device=mask.device)

    def _extra_inputs(self, mask, token_type_ids, fill) -> dict:
        if token_type_ids is None:
            return {}
        return {"token_type_ids": fill(token_type_ids, 0)}  # virtual tokens belong to the first segment
