"""The soft prompt: k trainable vectors in the model's input-embedding space, and the ways to start them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file
from torch import nn

from .config import PromptInit, PromptTuningConfig
from .engine import parameters_version
from .errors import SoftpromptError

PROMPT_KEY = "prompt"


class ResidualReparam(nn.Module):
    """P + LayerNorm(up(relu(down(P)))), a bottleneck MLP shared by the virtual tokens (residual prompt
    tuning, Razdaibiedina et al. 2023, who report steadier training across learning rates): the tokens
    share parameters, so they move together early on. The norm's gain starts at zero, so the prompt starts
    exactly at its init (a text or vocabulary init keeps its zero-shot accuracy) and the MLP grows in as it
    learns."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.zeros_(self.norm.weight)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        return prompt + self.norm(self.up(torch.relu(self.down(prompt))))


class SoftPrompt(nn.Module):
    """k vectors in the input-embedding space. While training they may come out of a reparameterisation over
    the weight (a `ResidualReparam`, or P-tuning's `PromptEncoder`), folded into the weight at save."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_tokens, dim))
        self.reparam: nn.Module | None = None

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    def embeddings(self) -> torch.Tensor:
        """The (k, d) vectors the model sees: the weight, through the reparameterisation while training."""
        return self.weight if self.reparam is None else self.reparam(self.weight)

    @torch.no_grad()
    def served(self) -> torch.Tensor:
        """`embeddings()` with dropout off (a P-tuning LSTM's): what `fold` bakes in and a checkpoint stores."""
        training = self.training
        self.eval()
        try:
            return self.embeddings()
        finally:
            self.train(training)

    def version(self) -> tuple:
        """Changes whenever `embeddings()` may: kept keys/values computed from the prompt are keyed on it."""
        return parameters_version(self)

    def add_reparam(self, bottleneck: int) -> None:
        self.set_reparam(ResidualReparam(self.weight.shape[1], bottleneck))

    def set_reparam(self, module: nn.Module) -> None:
        """Train the prompt as `module(weight)` until `fold`."""
        self.reparam = module.to(self.weight.device)

    @torch.no_grad()
    def fold(self) -> None:
        """Bake the reparameterisation into a plain prompt (what a checkpoint stores) and drop it."""
        if self.reparam is not None:
            self.weight.copy_(self.served())
            self.reparam = None

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeddings().unsqueeze(0).expand(batch_size, -1, -1)


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


def load_prompt_file(path: str | Path, key: str = PROMPT_KEY) -> torch.Tensor:
    """The prompt (`key`: a prefix's for prefix tuning) of a checkpoint folder (checked against its checksum), of a
    peft adapter folder, or of a bare .safetensors file."""
    from .checkpoint import META_FILE, load_tensors
    from .methods import PREFIX_KEY
    from .peft_interop import is_peft_adapter, peft_prompt

    path = Path(path)
    if path.is_dir() and is_peft_adapter(path) and not (path / META_FILE).is_file():
        return peft_prompt(path)
    if path.is_dir():
        tensors = load_tensors(path)
    elif path.is_file():
        tensors = load_file(str(path))
    else:
        raise SoftpromptError(f"no prompt at {path}: give a checkpoint folder or a .safetensors prompt file")
    if key not in tensors and {PROMPT_KEY, PREFIX_KEY} & set(tensors):
        held = "a prefix (method prefix)" if PREFIX_KEY in tensors else "input vectors (method prompt or ptuning)"
        raise SoftpromptError(f"{path} holds {held}; start a run of the same method from it")
    if key not in tensors:
        raise SoftpromptError(f"{path} holds no '{key}' tensor; is it a softprompt checkpoint?")
    return tensors[key]


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
        prompt = load_prompt_file(str(config.init_file))  # set: PromptTuningConfig checks it
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
