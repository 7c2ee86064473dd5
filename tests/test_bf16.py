"""bf16 frozen weights: what trains stays fp32, CPU attention runs in fp32, the shared prefix still matches
the concatenation, and a bf16 run's checkpoint is scored exactly as the run scored it."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptedTask, TrainConfig
from softprompt import training
from softprompt.checkpoint import read_checkpoint
from softprompt.engine.attention import _sdpa

from .test_models import batch, wrap


def test_frozen_weights_in_bf16_and_what_trains_in_fp32(tokenizer, tiny_bert):
    enc = batch(tokenizer, "right")
    labels = torch.tensor([0, 1, 1])
    model = wrap(tiny_bert, 4, "SEQ_CLS", tokenizer)
    with torch.no_grad():
        fp32_logits = model(**enc).logits
    model.freeze_in(torch.bfloat16)
    trained = {id(p) for p in model.trainable_parameters()}
    assert len(trained) == 3  # prompt, head weight and bias
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    frozen = [p for p in model.base.parameters() if id(p) not in trained]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    out = model(**enc, labels=labels)
    assert out.logits.dtype == torch.float32  # the fp32 head read the bf16 features in fp32
    torch.testing.assert_close(out.logits, fp32_logits, atol=5e-2, rtol=0)  # bf16 rounding of the same function
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in model.trainable_parameters())


def test_siamese_head_reads_bf16_features_in_fp32(tokenizer, tiny_bert):
    """Siamese pooling replaces the model's head with its own; that head, not the replaced one, is kept fp32."""
    enc = batch(tokenizer, "right")
    pair = {"pair_ids": enc["input_ids"].flip(0), "pair_mask": enc["attention_mask"].flip(0)}
    model = wrap(tiny_bert, 4, "SEQ_CLS", tokenizer, pooling="siamese")
    with torch.no_grad():
        fp32_logits = model(enc["input_ids"], enc["attention_mask"], **pair).logits
    model.freeze_in(torch.bfloat16)
    assert model.head.weight.dtype == torch.float32
    out = model(enc["input_ids"], enc["attention_mask"], labels=torch.tensor([0, 1, 1]), **pair)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, fp32_logits, atol=5e-2, rtol=0)
    out.loss.backward()
    assert model.head.weight.grad.dtype == torch.float32 and model.head.weight.grad.abs().sum() > 0


def test_cpu_attention_in_bf16_runs_in_fp32():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    got = _sdpa(q, k, v, attn_mask=mask)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                            enable_gqa=True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))
    got.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and k.grad.abs().sum() > 0


def test_shared_prefix_matches_concat_with_bf16_weights(tokenizer, tiny_llama):
    model = wrap(tiny_llama, 6, "CAUSAL_LM", tokenizer)
    model.freeze_in(torch.bfloat16)
    enc = batch(tokenizer, "left")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    losses, grads = [], []
    for reason in (None, "forced off"):
        if reason:
            model.engine.force_off(reason)
        loss = model.training_loss(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.prompt.weight.grad)
        model.prompt.weight.grad = None
    torch.testing.assert_close(losses[0], losses[1], atol=2e-2, rtol=0)  # bf16 rounding, not a different loss
    assert grads[0].dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.99


@pytest.mark.parametrize("fast", [True, False])
def test_timed_decoder_runs_default_to_bf16_where_it_is_fast_and_checkpoints_keep_it(tiny_dirs, tiny_csv,
                                                                                     tmp_path, monkeypatch, fast):
    monkeypatch.setattr("softprompt.spec.fast_bf16", lambda: fast)
    trainer = training.prepare(TrainConfig(model=tiny_dirs["llama"], data=tiny_csv, prompt_length=4, max_steps=3,
                                           max_time=600, eval_every=3, task_type="CAUSAL_LM",
                                           output=str(tmp_path / "run"), progress=False),
                               log=lambda _: None)
    assert trainer.spec.bf16 is fast
    result = trainer.train()
    assert read_checkpoint(result.best_checkpoint).spec.bf16 is fast
    loaded = PromptedTask.from_pretrained(result.best_checkpoint)
    dtype = torch.bfloat16 if fast else torch.float32
    assert loaded.model.base.get_input_embeddings().weight.dtype == dtype
    assert loaded.model.prompt.weight.dtype == torch.float32
    # the checkpoint is scored by the same bf16 (or fp32) model the run used
    assert torch.equal(loaded.scores(trainer.splits.dev), trainer.prompted.scores(trainer.splits.dev))
    assert loaded.evaluate(trainer.splits.dev) == result.dev
    # fp32: encoders, and step budgets (bf16 buys no steps there); a decoder's head on a user's file (this CSV)
    # takes bf16 under a time budget as label words do (docs/recipe.md, "Custom data")
    for model, task_type, max_time, want in (("bert", None, 600, False), ("llama", "SEQ_CLS", 600, fast),
                                             ("llama", None, None, False)):
        other = training.prepare(TrainConfig(model=tiny_dirs[model], data=tiny_csv, prompt_length=4, max_steps=1,
                                             max_time=max_time, task_type=task_type, output=str(tmp_path / model),
                                             progress=False), log=lambda _: None)
        assert other.spec.bf16 is want
