"""Where a prompt goes in each row of the concatenated sequence: the layout the prompt adapters build, and the
probe's reference beside them. Here, below both, so that the engine imports nothing of `models/`."""

from __future__ import annotations

import torch


def insertion_index(offsets: torch.Tensor, length: int, k: int | torch.Tensor) -> torch.Tensor:
    """Gather index into cat([prompt, tokens]) that places the prompt at column offsets[i] of row i.

    `k` is the prompt's length, or each row's (B,) when rows carry prompts of different lengths (several tasks
    in one batch), padded at their end to the longest; a row with a shorter prompt then ends in repeats of its
    last column, which the caller masks."""
    longest = int(k.max()) if torch.is_tensor(k) else k
    j = torch.arange(length + longest, device=offsets.device).unsqueeze(0)
    off = offsets.unsqueeze(1)
    k = k.unsqueeze(1) if torch.is_tensor(k) else k
    return torch.where(j < off, j + longest, torch.where(j < off + k, j - off, (j - k).clamp(max=length - 1) + longest))


def splice(tokens: torch.Tensor, fill: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    src = torch.cat([fill, tokens], dim=1)
    if src.dim() == 3:
        index = index.unsqueeze(-1).expand(-1, -1, src.shape[-1])
    return src.gather(1, index)
