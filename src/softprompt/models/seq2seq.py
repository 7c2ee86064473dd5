"""T5-style encoder-decoders: the prompt leads the encoder input; the decoder is untouched.

Padding is moved to the right so that relative-position biases see the text right after the prompt.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import GenerationMixin

from .base import PromptModel
from .registry import register_family


@register_family("seq2seq")
class Seq2SeqPromptModel(PromptModel):
    pad_side = "right"
    family = "seq2seq"

    def _offsets(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Run the prompted encoder once, so several decoder targets can share it (rank classification)."""
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask)
        encoded = self.base.get_encoder()(**inputs)
        return encoded, inputs["attention_mask"]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask)
        return cast(GenerationMixin, self.base).generate(**inputs, **kwargs)
