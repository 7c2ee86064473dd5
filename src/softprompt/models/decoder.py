"""Decoder-only causal LMs (Llama, Qwen, Mistral, GPT-2, ...).

Rows are left-aligned and the prompt goes right before each row's first real token:
pads p1..pk text. Position ids count real tokens only, so left and right padding give identical
results, the last column is always a real token (generation and last-token pooling rely on it), and the
first real token's loss is predicted from the last virtual token, exactly as without padding.

The label loss, rank classification, generation and a head (over the last token, the text's mean, or both) go
through the shared-prefix engine (`softprompt.engine`, `model.engine`), which runs the prompt once per batch; where
it cannot serve a call (a model whose cache or output head is not plain, a batch longer than a sliding window, a
tail reaching into the prompt, sampling), this adapter takes the concatenated sequence, `forward`'s path.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import GenerationMixin
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from ..config import TaskType
from ..engine import SharedPrefix, positions_from_mask
from .base import PromptModel, align_order, masked_mean
from .registry import register_family

__all__ = ["DecoderPromptModel"]


@register_family("decoder")
class DecoderPromptModel(PromptModel):
    pad_side = "left"
    family = "decoder"

    def __init__(self, base, config, tokenizer=None) -> None:
        super().__init__(base, config, tokenizer)
        self.engine = SharedPrefix(base, self.prompt, reads_logits=config.task_type is TaskType.CAUSAL_LM)
        if config.pooling == "last_mean":  # a fresh linear head reads [last state, mean state]
            self._new_head(2 * self.embedding_matrix().shape[1])

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        if name == "prompt" and "engine" in self.__dict__:  # a replaced prompt is the engine's new source
            self.engine.source = value

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

    # -- through the shared-prefix engine ------------------------------------------------------------------
    def shares(self, length: int) -> bool:
        """Whether a call over `length` tokens per row (input plus anything run after it) goes through the engine:
        label words or a head, and `engine.shares`; otherwise the adapter takes the concatenated sequence."""
        return self.config.task_type in (TaskType.CAUSAL_LM, TaskType.SEQ_CLS) and self.engine.shares(length)

    def _aligned(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The caller's batch left-aligned (what every shared-prefix path runs on), and the permutation used."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = align_order(attention_mask, self.pad_side)
        return input_ids.gather(1, order), attention_mask.gather(1, order), order

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        """With a head, the pooled input states (`pooled`) through the shared prefix, as the same pooling (for the
        last token, the model's own) and loss on the concatenated sequence would give; other outputs take the
        concat."""
        if self.config.task_type is not TaskType.SEQ_CLS:
            return super().forward(input_ids, attention_mask, token_type_ids, labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)  # Trainer's token count for token losses; a head's loss is per row
        if not kwargs and self.shares(input_ids.shape[1]):
            ids, mask, _ = self._aligned(input_ids, attention_mask)
            hidden = self.engine.states(ids, mask).hidden
        elif self.config.pooling != "cls":
            hidden, mask = self._text_states(input_ids, attention_mask, **kwargs)
        else:  # the model's own last-token pooling over the concat
            return super().forward(input_ids, attention_mask, token_type_ids, labels, **kwargs)
        logits = self.head(self.pooled(hidden, mask))
        loss = None
        if labels is not None:
            loss = self.base.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.base.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)

    def pooled(self, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """What the head reads from left-aligned final states (B, n, d) whose text columns `text` (B, n) marks:
        the last column (each row's last real token), the mean over the text (`pooling="mean"`), or both side by
        side (`"last_mean"`): the last state sits at the text's end, the mean hears all of it (docs/recipe.md,
        "Custom data")."""
        if self.config.pooling == "mean":
            return masked_mean(hidden, text)
        if self.config.pooling == "last_mean":
            return torch.cat([hidden[:, -1], masked_mean(hidden, text)], dim=-1)
        return hidden[:, -1]

    def _text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final states of the concat (no shared prefix) and its text columns (the prompt's left out)."""
        inputs, _, offsets = self.prompted_inputs(input_ids, attention_mask)
        text = inputs["attention_mask"].clone()
        columns = torch.arange(text.shape[1], device=text.device).unsqueeze(0)
        text[(columns >= offsets.unsqueeze(1)) & (columns < offsets.unsqueeze(1) + self.prompt.num_tokens)] = 0
        return self.base.base_model(**inputs, **kwargs).last_hidden_state, text

    def continuation_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              continuations: list[list[int]]) -> torch.Tensor | None:
        """(B, continuations) summed log-likelihoods (rank classification of multi-token label strings), as
        `engine.continuation_logprobs`; None where the model cannot share a prefix."""
        if not self.shares(input_ids.shape[1] + max(map(len, continuations), default=0)):
            return None
        return self.engine.continuation_logprobs(*self._aligned(input_ids, attention_mask)[:2], continuations)

    def tail_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: int) -> torch.Tensor:
        """Logits of the last `keep` columns only (real tokens, after left alignment).

        The LM head over a large vocabulary at every position costs as much as several layers; label
        words sit at the end of each row, so scoring and the label loss need only the tail. The concat serves
        where the engine cannot, or where the tail would reach into the prompt of a short row.
        """
        ids, mask, _ = self._aligned(input_ids, attention_mask)
        if self.shares(ids.shape[1]) and keep <= int(mask.sum(1).min()):
            return self.engine.tail_logits(ids, mask, keep)
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask)
        # indices rather than a count: the head then reads a gathered, contiguous tail (on a sliced one it runs as a
        # slower batched matmul)
        width = inputs["inputs_embeds"].shape[1]
        return self.base(**inputs, logits_to_keep=torch.arange(width - keep, width, device=input_ids.device)).logits

    def training_loss(self, input_ids, attention_mask=None, labels=None, **kwargs) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled tokens, as `forward(...).loss`, from the tail only."""
        if self.config.task_type is not TaskType.CAUSAL_LM:
            return super().training_loss(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        ids, mask, order = self._aligned(input_ids, attention_mask)
        aligned = labels.gather(1, order)
        if self.shares(ids.shape[1]):
            return self.engine.lm_loss(ids, mask, aligned)
        labelled = aligned != -100
        width = aligned.shape[1]
        first = torch.where(labelled.any(1), labelled.int().argmax(1), width)  # first labelled column per row
        keep = int((width - first).max()) + 1
        if keep > int(mask.sum(1).min()):  # a row's first real token is labelled: the prompt end predicts it
            return self(input_ids, attention_mask, labels=labels, **kwargs).loss
        logits = self.tail_logits(input_ids, attention_mask, keep)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 aligned[:, width - keep + 1:].flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """Continuation after prompt + input; returns only the new token ids.

        Greedy decoding runs from the kept prompt keys/values; sampling and other `generate` options go
        through transformers' `generate` on the concatenated sequence."""
        if kwargs.get("do_sample") or not self.shares(input_ids.shape[1] + max_new_tokens):
            inputs, _, _ = self.prompted_inputs(input_ids, attention_mask)
            inputs.pop("position_ids")
            return cast(GenerationMixin, self.base).generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        return self.engine.generate(*self._aligned(input_ids, attention_mask)[:2], max_new_tokens)
