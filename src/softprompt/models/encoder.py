"""BERT/RoBERTa-style encoders with a classification head.

The pooled position ([CLS] or <s>) must stay the first real token, so the prompt goes right after it:
[CLS] p1..pk text [SEP] pads. Padding is moved to the right so absolute positions stay contiguous.

`pooling="mean"` feeds the head the mean of the text's final states (virtual tokens and pads left out)
instead of the model's pooled [CLS]: sentence-embedding models such as all-MiniLM-L6-v2 were trained
through mean pooling, and their [CLS] state and pooler never were. `pooling="siamese"` is how such a model
was trained on pairs: each text runs alone (prompt included), is mean-pooled and scaled to unit length, and
the head reads [u, v, |u - v|, u * v] (Reimers & Gurevych 2019), so the prompt tunes the embedding the model
already compares pairs with, instead of asking it to read two texts in one sequence as it never did.

The splice (`after_cls`) and the readout (`EncoderPromptModel.read`) are the ones the multi-task model uses for
rows of many prompts in one batch, so a prompt reads the same there as alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, cast

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from ..errors import SoftpromptError
from ..engine import insertion_index, splice
from .base import PromptModel, align_order, masked_mean
from .registry import register_family


def after_cls(embed: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
              types: torch.Tensor | None, prompts: torch.Tensor, lengths: torch.Tensor
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """An encoder backbone's inputs for right-padded rows, row i's prompt (the first lengths[i] of prompts[i],
    (B, K, d)) right after its [CLS]; and the (B, K + n) mask of the columns that are text ([CLS], the text,
    [SEP]: no virtual tokens, no pads), what mean pooling averages."""
    rows = ids.shape[0]
    index = insertion_index(torch.ones(rows, dtype=torch.long, device=ids.device), ids.shape[1], lengths)
    embeds = embed(ids)
    columns = torch.arange(index.shape[1], device=ids.device).unsqueeze(0)
    full_mask = (columns < (mask.sum(1) + lengths).unsqueeze(1)).long()
    inputs = {"inputs_embeds": splice(embeds, prompts.to(embeds.dtype), index), "attention_mask": full_mask}
    if types is not None:  # virtual tokens belong to the first segment
        inputs["token_type_ids"] = splice(types, types.new_zeros(rows, prompts.shape[1]), index) * full_mask
    return inputs, full_mask * ((columns < 1) | (columns >= 1 + lengths.unsqueeze(1)))


class _Replay(nn.Module):
    """Stands in for a backbone that already ran: gives back its output, so a model's own head code reads it."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextmanager
def _replayed(wrapper: nn.Module, output: Any) -> Iterator[None]:
    prefix = cast(str, wrapper.base_model_prefix)
    backbone = getattr(wrapper, prefix)
    setattr(wrapper, prefix, _Replay(output))
    try:
        yield
    finally:
        setattr(wrapper, prefix, backbone)


def rows_of(output: Any, index: torch.Tensor) -> Any:
    """The given rows of every tensor of a model output."""
    return type(output)(**{k: v[index] for k, v in output.items() if torch.is_tensor(v)})


@register_family("encoder")
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

    def spliced(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The backbone's inputs for the rows (pads moved right, this prompt after each [CLS]) and their text
        columns, as `after_cls` gives them."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = align_order(attention_mask, self.pad_side)
        ids, mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        types = None if token_type_ids is None else token_type_ids.gather(1, order)
        lengths = torch.full((ids.shape[0],), self.prompt.num_tokens, dtype=torch.long, device=ids.device)
        return after_cls(self.base.get_input_embeddings(), ids, mask, types, self.prompt(ids.shape[0]), lengths)

    def backbone(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs) -> tuple[Any, torch.Tensor]:
        """The backbone's output over the prompted rows, and their text columns."""
        inputs, text = self.spliced(input_ids, attention_mask, token_type_ids)
        return self.base.base_model(**inputs, **kwargs), text

    def read(self, output: Any, text: torch.Tensor, pair: tuple[Any, torch.Tensor] | None = None) -> torch.Tensor:
        """The head's logits over the backbone's output for some rows: with `cls` pooling the model's own pooler
        and head (its output replayed into them), with `mean` the mean of the text's states, with `siamese` the
        pair's two texts compared (`pair`: the output and text columns of the second texts)."""
        if self.config.pooling == "cls":
            with _replayed(self.base, output):
                return self.base().logits
        features = masked_mean(output.last_hidden_state, text)
        if self.config.pooling == "siamese":
            if pair is None:
                raise SoftpromptError("siamese pooling needs the second text of each pair (pair_ids, pair_mask)")
            second = masked_mean(pair[0].last_hidden_state, pair[1])
            u, v = (nn.functional.normalize(x, dim=-1) for x in (features, second))
            features = self.pair_features(u, v)
        return self.head_logits(features)

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

        output, text = self.backbone(torch.cat([widen(input_ids), widen(pair_ids)]),
                                     torch.cat([widen(first_mask), widen(second_mask)]), **kwargs)
        return torch.nn.functional.normalize(masked_mean(output.last_hidden_state, text), dim=-1).chunk(2)

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
        if self.config.pooling == "siamese":
            u, v = self.pair_embeddings(input_ids, attention_mask, pair_ids, pair_mask, **kwargs)
            logits = self.head_logits(self.pair_features(u, v))
        else:
            logits = self.read(*self.backbone(input_ids, attention_mask, token_type_ids, **kwargs))
        loss = None
        if labels is not None:
            if logits.shape[-1] == 1:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
