"""P-tuning (Liu et al. 2021): the virtual tokens are the output of a small network over trainable inputs.

The inputs are `SoftPrompt.weight` (started by the prompt's own init), the network its `reparam`: trained
through, then folded into plain vectors at save, so a P-tuning checkpoint serves and exports as a prompt-tuning
one. Layers and names follow peft's PromptEncoder (`mlp_head`, `lstm_head`), so its parameters load into ours."""

from __future__ import annotations

import torch
from torch import nn

from .config import PromptEncoderFields


class PromptEncoder(nn.Module):
    """MLP: Linear-ReLU-Linear-ReLU-Linear (peft's three layers whatever `num_layers` says). LSTM: a
    bidirectional LSTM over the k inputs in order, then Linear-ReLU-Linear from its 2 * hidden outputs."""

    def __init__(self, dim: int, hidden: int, kind: str = "MLP", num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.lstm_head: nn.LSTM | None = None
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(k, d) inputs -> (k, d) virtual-token embeddings."""
        if self.lstm_head is not None:
            inputs = self.lstm_head(inputs[None])[0][0]
        return self.mlp_head(inputs)


def prompt_encoder(config: PromptEncoderFields, dim: int) -> PromptEncoder:
    """The encoder `config` describes for a model of width `dim` (hidden size: the width, as peft's default)."""
    return PromptEncoder(dim, config.encoder_hidden_size or dim, config.encoder_reparameterization_type,
                         config.encoder_num_layers, config.encoder_dropout)
