"""BERT/RoBERTa-style encoders with a classification head.

The pooled position ([CLS] or <s>) must stay the first real token, so the prompt goes right after it:
[CLS] p1..pk text [SEP] pads. Padding is moved to the right so absolute positions stay contiguous.

`pooling="mean"` feeds the head the mean of the text's final states (virtual tokens and pads left out)
instead of the model's pooled [CLS]: sentence-embedding models such as all-MiniLM-L6-v2 were trained
through mean pooling, and their [CLS] state and pooler never were. `pooling="siamese"` is how such a model
was trained on pairs: each text runs alone (prompt included), is mean-pooled and scaled to unit length, and
the head reads [u, v, |u - v|, u * v] (Reimers & Gurevych 2019), so the prompt tunes the embedding the model
already compares pairs with, instead of asking it to read two texts in one sequence as it never did.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from ..errors import SoftpromptError
from .base import PromptModel, masked_mean


class EncoderPromptModel(PromptModel):
    pad_side = "right"
    family = "encoder"

    def __init__(self, base, config, tokenizer=None) -> None:
        super().__init__(base, config, tokenizer)
        if config.pooling == "siamese":  # a fresh linear head reads [u, v, |u - v|, u * v]
            self._new_head(4 * int(self.base.config.hidden_size))

    @property
    def head(self) -> torch.nn.Module:
        """An encoder always has one: SEQ_CLS is its only task type."""
        return getattr(self.base, str(self.head_name))

    def _offsets(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.ones(mask.shape[0], dtype=torch.long, device=mask.device)

    def _extra_inputs(self, mask, token_type_ids, fill) -> dict:
        if token_type_ids is None:
            return {}
        return {"token_type_ids": fill(token_type_ids, 0)}  # virtual tokens belong to the first segment

    def _mean_states(self, input_ids, attention_mask, token_type_ids=None, **kwargs) -> torch.Tensor:
        """(B, h): the mean of each row's final text states, virtual tokens and pads left out."""
        inputs, _, _ = self.prompted_inputs(input_ids, attention_mask, token_type_ids)
        return masked_mean(self.base.base_model(**inputs, **kwargs).last_hidden_state,
                           self._text_columns(inputs["attention_mask"]))

    def _text_columns(self, mask: torch.Tensor) -> torch.Tensor:
        """Which columns of the prompted mask are the text's: the prompt sits right after [CLS]."""
        text = mask.clone()
        text[:, 1:1 + self.prompt.num_tokens] = 0
        return text

    def pair_embeddings(self, input_ids, attention_mask=None, pair_ids=None, pair_mask=None, **kwargs):
        """(u, v): each text of a pair run alone with the prompt, mean-pooled, at unit length (as the model
        was trained to compare texts)."""
        if pair_ids is None:
            raise SoftpromptError("siamese pooling needs the second text of each pair (pair_ids, pair_mask)")
        first_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        second_mask = torch.ones_like(pair_ids) if pair_mask is None else pair_mask
        width = max(input_ids.shape[1], pair_ids.shape[1])

        def widen(t):  # right-pad to the common width, so both texts run as one batch
            return torch.nn.functional.pad(t, (0, width - t.shape[1]))

        both = self._mean_states(torch.cat([widen(input_ids), widen(pair_ids)]),
                                 torch.cat([widen(first_mask), widen(second_mask)]), **kwargs)
        return torch.nn.functional.normalize(both, dim=-1).chunk(2)

    @torch.no_grad()
    def start_head_at_cosine(self, cosine: torch.Tensor, labels: torch.Tensor) -> None:
        """Set the siamese head to a function of cos(u, v) alone, fitted to training labels: per class
        w_c * cos + b_c (a least-squares line for regression). The model was trained to score a pair by that
        cosine; a random head over [u, v, |u - v|, u * v] must find it from a few thousand pairs, and on RTE did
        worse after 600 s than the fitted cosine alone (docs/recipe.md, "MiniLM-L6"). w_c sits in the u * v
        block, whose sum is cos."""
        x, head = cosine.double(), cast(torch.nn.Linear, self.head)  # the siamese head is one linear layer
        if head.out_features == 1:
            slope, intercept = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), labels.double()[:, None]
                                                  ).solution[:, 0]
            w, b = slope[None], intercept[None]
        else:
            w = torch.zeros(head.out_features, dtype=torch.double, requires_grad=True)
            b = torch.zeros_like(w, requires_grad=True)
            fit = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

            def closure():
                fit.zero_grad()
                loss = torch.nn.functional.cross_entropy(x[:, None] * w + b, labels)
                loss.backward()
                return loss

            with torch.enable_grad():
                fit.step(closure)
        dim = head.in_features // 4
        head.weight.zero_()
        head.weight[:, 3 * dim:] = w.detach()[:, None].to(head.weight.dtype)
        head.bias.copy_(b.detach())

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The head over pooled features (mean or siamese pooling), as the model's own dropout + head."""
        features = getattr(self.base, "dropout", torch.nn.Identity())(features)
        # RoBERTa-style heads (dense, tanh, projection) read the first position of a sequence of states
        return self.head(features) if isinstance(self.head, torch.nn.Linear) else self.head(features[:, None])

    @staticmethod
    def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """What the siamese head reads from two unit-length embeddings."""
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, pair_ids=None,
                pair_mask=None, **kwargs):
        pooling = self.config.pooling
        if pooling == "cls":
            return super().forward(input_ids, attention_mask, token_type_ids, labels, **kwargs)
        if pooling == "mean":
            features = self._mean_states(input_ids, attention_mask, token_type_ids, **kwargs)
        else:
            u, v = self.pair_embeddings(input_ids, attention_mask, pair_ids, pair_mask, **kwargs)
            features = self.pair_features(u, v)
        logits = self.head_logits(features)
        loss = None
        if labels is not None:
            if logits.shape[-1] == 1:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
