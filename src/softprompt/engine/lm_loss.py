"""Next-token cross-entropy through a frozen LM head, without keeping the logits.

Over a large vocabulary the logits of a batch's labelled tokens are large, and the plain path walks them
several times (log-softmax, its backward, a zero-filled gradient the size of the logits), and autograd keeps
them until backward. The head is frozen, so the only gradient needed is the one to the hidden states, and it
is known as soon as the softmax is: (softmax - one-hot) @ W. This computes it chunk by chunk during the
forward and keeps only that (N, d) gradient for backward: less memory saved, the same time (the two matmuls
dominate either way; docs/benchmarks.md, "the LM loss without logits").
"""

from __future__ import annotations

import torch

ROWS_PER_CHUNK = 128  # bounds the logits alive at once; chunk sizes around it timed the same (docs/benchmarks.md)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        count = targets.numel()
        for start in range(0, count, ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            logits = torch.nn.functional.linear(hidden[rows], weight, bias).float()
            if scale != 1.0:
                logits *= scale
            picked = torch.arange(logits.shape[0], device=logits.device)
            log_probs = torch.log_softmax(logits, dim=1)  # one fused pass, where logsumexp + subtract took two
            del logits  # so only one chunk-sized buffer stays alive through the matmul below
            total -= log_probs[picked, targets[rows]].sum()
            if grad is not None:
                probs = log_probs.exp_()  # in place: no second chunk-sized buffer
                probs[picked, targets[rows]] -= 1
                grad[rows] = (probs.to(weight.dtype) @ weight) * (scale / count)  # after the matmul: (c, d)
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def lm_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                     scale: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy of `targets` (N,) under `head(hidden) * scale` for hidden (N, d), as
    `cross_entropy(head(hidden).float() * scale, targets)`; a trainable head takes that plain path."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.requires_grad or (bias is not None and bias.requires_grad) or not isinstance(head, torch.nn.Linear):
        return torch.nn.functional.cross_entropy(head(hidden).float() * scale, targets)
    if torch.is_autocast_enabled(hidden.device.type):  # the head runs in the autocast dtype, as it would in the model
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, scale)
