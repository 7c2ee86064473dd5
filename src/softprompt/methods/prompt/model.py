"""Prompt tuning's trainable module: k vectors in the model's input-embedding space (Lester et al., 2021)."""

from __future__ import annotations

import torch
from torch import nn

from ...engine import parameters_version

PROMPT_KEY = "prompt"  # the tensor a checkpoint stores the vectors under


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
