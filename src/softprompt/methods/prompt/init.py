"""How a prompt starts: random, sampled vocabulary, class labels, a text's tokens, or an earlier prompt (a file).

Every start is a set of vectors in the frozen input-embedding space; a prefix starts from the keys/values the
frozen model computes for them (methods/prefix).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch

from ...checkpoint import load_prompt_file
from ...config import PromptInit, PromptTuningConfig
from ...errors import SoftpromptError
from .model import PROMPT_KEY


def frequent_token_ids(tokenizer, corpus: Iterable[str] | None, top: int) -> list[int]:
    """The `top` most frequent non-special token ids.

    Frequency is counted on the task's own training texts when they are given. Without them it is
    approximated by id order: BPE and WordPiece vocabularies are built by merging the most frequent
    pairs first, so low ids after the special and single-character block are the common words.
    """
    special = set(tokenizer.all_special_ids)
    if corpus is not None:
        counts: Counter[int] = Counter()
        for text in corpus:
            counts.update(i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i not in special)
        if counts:
            return [i for i, _ in counts.most_common(top)]
    vocab = tokenizer.get_vocab()
    words = sorted(i for t, i in vocab.items() if i not in special and len(t.strip("Ġ▁#")) > 1)
    return words[:top]


def _token_embedding_mean(tokenizer, embeddings: torch.Tensor, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SoftpromptError(f"label word {text!r} tokenizes to nothing; pick a non-empty label word")
    return embeddings[ids].mean(0)


@torch.no_grad()
def initial_prompt(
    config: PromptTuningConfig,
    embeddings: torch.Tensor,
    tokenizer=None,
    corpus: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The starting (k, d) prompt for `config.init`, taken from the frozen input-embedding matrix."""
    k, dim = config.num_virtual_tokens, embeddings.shape[1]
    if config.init is PromptInit.RANDOM:
        return torch.rand(k, dim, generator=generator, dtype=torch.float32) - 0.5
    if config.init is PromptInit.FILE:
        prompt = load_prompt_file(str(config.init_file), PROMPT_KEY)  # set: PromptTuningConfig checks it
        if prompt.shape != (k, dim):
            raise SoftpromptError(
                f"prompt in {config.init_file} has shape {tuple(prompt.shape)}, this model needs ({k}, {dim}): "
                "use the same prompt length and a base model with the same hidden size"
            )
        return prompt.float()
    if tokenizer is None:
        raise SoftpromptError(f"init='{config.init.value}' needs the tokenizer of the base model")

    def sampled(n: int) -> torch.Tensor:
        pool = torch.tensor(frequent_token_ids(tokenizer, corpus, config.vocab_sample_size))
        pick = torch.randint(len(pool), (n,), generator=generator) if n > len(pool) else torch.randperm(
            len(pool), generator=generator
        )[:n]
        return embeddings[pool[pick]].float()

    if config.init is PromptInit.VOCAB:
        return sampled(k)
    if config.init is PromptInit.TEXT:
        ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SoftpromptError("init_text tokenizes to nothing; give a non-empty string")
        ids = (ids * (k // len(ids) + 1))[:k]
        return embeddings[ids].float().clone()
    # class labels: one virtual token per label word, the rest from the vocabulary
    rows = [_token_embedding_mean(tokenizer, embeddings, w).float() for w in config.label_words[:k]]
    rest = sampled(k - len(rows)) if k > len(rows) else embeddings.new_zeros(0, dim).float()
    return torch.cat([torch.stack(rows), rest]) if rows else rest
