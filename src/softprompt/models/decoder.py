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

    def tail_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: int) -> torch.Tensor:
        """Logits of the last `keep` columns only (real tokens, after left alignment).

        The LM head over a 49k vocabulary at every position costs as much as several layers; label
        words sit at the end of each row, so scoring and the label loss need only the tail.
        """
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask)
        return self.base(**inputs, logits_to_keep=keep).logits

    def training_loss(self, input_ids, attention_mask=None, labels=None, **kwargs) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled tokens, as `forward(...).loss`, from the tail only."""
        if self.config.task_type is not TaskType.CAUSAL_LM:
            return super().training_loss(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask, labels=labels)
        labels = inputs.pop("labels")
        width, labelled = labels.shape[1], labels != -100
        first = torch.where(labelled.any(1), labelled.int().argmax(1), width)  # first labelled column per row
        keep = min(width, int((width - first).max()) + 1)
        logits = self.base(**inputs, logits_to_keep=keep, **kwargs).logits
        targets = labels[:, labels.shape[1] - keep + 1:]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                 ignore_index=-100)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Greedy/sampled continuation after prompt + input; returns only the new token ids."""
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask)
        inputs.pop("position_ids")
        return self.base.generate(**inputs, **kwargs)
