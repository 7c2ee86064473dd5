"""The LM-head loss that keeps no logits, against cross-entropy over the full logits."""

import pytest
import torch

from softprompt.engine import lm_loss

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_lm_cross_entropy_equals_the_plain_loss_and_gradient(bias, scale, monkeypatch):
    """Chunked, with the gradient formed in the forward (a partial last chunk included), against
    cross_entropy over the full (rescaled) logits."""
    monkeypatch.setattr(lm_loss, "ROWS_PER_CHUNK", 4)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden = torch.randn(10, 16, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    results = []
    for loss_fn in (lambda: torch.nn.functional.cross_entropy(head(hidden).float() * scale, targets),
                    lambda: lm_loss.lm_cross_entropy(hidden, head, targets, scale)):
        loss = loss_fn() * 3.0  # a non-unit upstream gradient
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone()))
        hidden.grad = None
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


def test_lm_cross_entropy_under_bf16_autocast_and_with_a_trainable_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(10, 16, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    lm_loss.lm_cross_entropy(hidden, head, targets).backward()  # a trainable head takes the plain path
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    head.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.functional.cross_entropy(head(hidden).float(), targets)
        fused = lm_loss.lm_cross_entropy(hidden, head, targets)
    torch.testing.assert_close(fused, plain, atol=1e-3, rtol=0)
    (grad,) = torch.autograd.grad(fused, hidden)
    (want,) = torch.autograd.grad(plain, hidden)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, want, atol=2e-3, rtol=0)
