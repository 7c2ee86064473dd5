"""Every prompt initialisation starts where it says it does."""

from __future__ import annotations

import pytest
import torch

from safetensors.torch import save_file

from softprompt import PromptModel, PromptTuningConfig, SoftpromptError, get_prompt_model
from softprompt.methods.prompt.init import frequent_token_ids


def _wrap(model, tokenizer, **kw):
    return get_prompt_model(model, PromptTuningConfig(task_type="CAUSAL_LM", **kw), tokenizer,
                            generator=torch.Generator().manual_seed(0))


def _rows_from_vocab(model, prompt) -> list[int]:
    table = model.base.get_input_embeddings().weight
    return [int((table == row).all(1).nonzero()[0]) for row in prompt]


def test_random_is_uniform_in_half_unit(tokenizer, tiny_llama):
    w = _wrap(tiny_llama, tokenizer, num_virtual_tokens=50, init="random").prompt.weight
    assert w.min() >= -0.5 and w.max() <= 0.5 and w.std() > 0.2  # uniform(-0.5, 0.5) has std 0.289


def test_vocab_samples_the_most_frequent_corpus_tokens(tokenizer, tiny_llama):
    corpus = ["apple banana"] * 5 + ["cherry"] * 3 + ["durian"]
    top2 = frequent_token_ids(tokenizer, corpus, 2)
    assert top2[0] in tokenizer("apple banana", add_special_tokens=False)["input_ids"]
    model = get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM",
                                                            init="vocab", vocab_sample_size=2), tokenizer, corpus)
    assert set(_rows_from_vocab(model, model.prompt.weight)) <= set(top2)


def test_vocab_without_corpus_uses_low_ids_and_no_specials(tokenizer):
    ids = frequent_token_ids(tokenizer, None, 100)
    assert len(ids) == 100 and not set(ids) & set(tokenizer.all_special_ids)


def test_class_labels_then_vocabulary(tokenizer, tiny_llama):
    model = _wrap(tiny_llama, tokenizer, num_virtual_tokens=4, init="class_labels", label_words=["good", "bad"])
    table = tiny_llama.get_input_embeddings().weight
    for row, word in zip(model.prompt.weight[:2], ["good", "bad"]):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(row, table[ids].mean(0))
    assert len(_rows_from_vocab(model, model.prompt.weight[2:])) == 2


def test_text_repeats_to_length(tokenizer, tiny_llama):
    model = _wrap(tiny_llama, tokenizer, num_virtual_tokens=5, init="text", init_text="hello world")
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert _rows_from_vocab(model, model.prompt.weight) == (ids * 5)[:5]


def test_file_transfers_a_prompt_and_checks_its_shape(tokenizer, tiny_llama, tmp_path):
    source = torch.randn(3, 32)
    save_file({"prompt": source}, str(tmp_path / "p.safetensors"))
    model = _wrap(tiny_llama, tokenizer, num_virtual_tokens=3, init="file", init_file=str(tmp_path / "p.safetensors"))
    assert torch.equal(model.prompt.weight.detach(), source)
    with pytest.raises(SoftpromptError, match=r"shape \(3, 32\).*\(4, 32\)"):
        _wrap(tiny_llama, tokenizer, num_virtual_tokens=4, init="file", init_file=str(tmp_path / "p.safetensors"))


def test_config_validation():
    with pytest.raises(SoftpromptError, match="init_text"):
        PromptTuningConfig(init="text")
    with pytest.raises(SoftpromptError, match=">= 0"):
        PromptTuningConfig(num_virtual_tokens=-1)


def test_residual_reparam_starts_at_the_init_trains_and_folds_into_the_saved_prompt(tokenizer, tiny_llama, tmp_path):
    """The reparameterised prompt starts exactly at its init, gradients reach the MLP, and the checkpoint holds
    the folded prompt: a fresh model loading it gives the same logits as the reparameterised one."""
    model = _wrap(tiny_llama, tokenizer, num_virtual_tokens=4, init="random")
    start = model.prompt.weight.detach().clone()
    model.prompt.add_reparam(8)
    assert torch.equal(model.prompt.embeddings(), start)
    enc = tokenizer(["a fine film", "bad"], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for step in range(3):
        model.training_loss(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).backward()
        if step:  # from the second step on, the gain is off zero and the MLP itself learns
            assert model.prompt.reparam.down.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    assert (model.prompt.embeddings() - model.prompt.weight).abs().max() > 0  # the MLP now moves the prompt
    with torch.no_grad():
        want = model(enc["input_ids"], enc["attention_mask"]).logits
    model.save_pretrained(tmp_path)
    fresh = PromptModel.from_pretrained(tiny_llama, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(enc["input_ids"], enc["attention_mask"]).logits, want, atol=1e-5, rtol=0)
    model.prompt.fold()
    assert model.prompt.reparam is None
    torch.testing.assert_close(model.prompt.weight, fresh.prompt.weight, atol=0, rtol=0)
