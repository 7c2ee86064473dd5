"""One answer from a task's members: the mean probability (or value), each member's own, the majority vote."""

from __future__ import annotations

from typing import Any

import torch

from ..scoring import labelled
from .registry import LoadedPrompt


def majority_vote(probs: torch.Tensor) -> int:
    """The class most members pick (probs: members x classes); a tie goes to the higher mean probability."""
    votes = torch.bincount(probs.argmax(-1), minlength=probs.shape[-1])
    tied = votes == votes.max()
    return int(torch.where(tied, probs.mean(0), torch.tensor(-1.0, dtype=probs.dtype)).argmax())


def prediction(scores: torch.Tensor, regression: bool) -> float | int:
    return float(scores) if regression else int(scores.argmax())


def combine(task: str, members: list[tuple[LoadedPrompt, torch.Tensor]]) -> dict[str, Any]:
    """One item's answer from its members' scores: their mean (probability, or value for regression)."""
    spec = members[0][0].prompted.task
    if spec.is_regression:
        out: dict[str, Any] = {"task": task, "value": sum(float(s) for _, s in members) / len(members)}
        if len(members) > 1:
            out["members"] = [{"member": p.member, "value": float(s)} for p, s in members]
        return out
    probs = torch.stack([torch.softmax(s.float(), -1) for _, s in members])
    out = {"task": task, **labelled(spec.labels, probs.mean(0))}
    if len(members) > 1:
        out["members"] = [{"member": p.member, **labelled(spec.labels, probs[i])} for i, (p, _) in enumerate(members)]
        out["vote"] = spec.labels[majority_vote(probs)]
    return out
