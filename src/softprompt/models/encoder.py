"""BERT/RoBERTa-style encoders with a classification head.

The pooled position ([CLS] or <s>) must stay the first real token, so the prompt goes right after it:
[CLS] p1..pk text [SEP] pads. Padding is moved to the right so absolute positions stay contiguous.

`pooling="mean"` feeds the head the mean of the text's final states (virtual tokens and pads left out)
instead of the model's pooled [CLS]: sentence-embedding models such as all-MiniLM-L6-v2 were trained
through mean pooling, and their [CLS] state and pooler never were.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from ..errors import SoftpromptError
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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if self.config.pooling != "mean":
            return super().forward(input_ids, attention_mask, token_type_ids, labels, **kwargs)
        if not isinstance(self.head, torch.nn.Linear):
            raise SoftpromptError(f"mean pooling needs a linear classifier head; {type(self.base).__name__} has "
                                  f"{type(self.head).__name__}: use pooling='cls'")
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask, token_type_ids)
        text = inputs["attention_mask"].clone()
        text[:, 1:1 + self.prompt.num_tokens] = 0  # the prompt sits right after [CLS]
        hidden = self.base.base_model(**inputs, **kwargs).last_hidden_state
        pooled = (hidden * text.unsqueeze(-1).to(hidden.dtype)).sum(1) / text.sum(1, keepdim=True).to(hidden.dtype)
        logits = self.head(getattr(self.base, "dropout", torch.nn.Identity())(pooled))
        loss = None
        if labels is not None:
            if logits.shape[-1] == 1:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
