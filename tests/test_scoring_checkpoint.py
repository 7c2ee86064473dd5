"""Rank classification over multi-token labels, and save -> load round trips."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from softprompt import PromptTuningConfig, get_prompt_model
from softprompt.config import TaskType
from softprompt.data import Example
from softprompt.encoding import TaskEncoder
from softprompt.pipeline import PromptedTask
from softprompt.scoring import predictions, score
from softprompt.tasks import TaskSpec


def test_rank_classification_with_multi_token_labels_that_share_a_first_token(tokenizer):
    """Labels 'very good' / 'very bad' share 'very': only scoring every label token can tell them apart."""
    task = TaskSpec("toy", ("text",), ("neg", "pos"), ("accuracy",), "{text} verdict:", (" very bad", " very good"))
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                        pad_token_id=tokenizer.pad_token_id))
    encoder = TaskEncoder(tokenizer, task, TaskType.CAUSAL_LM, 64)
    assert all(len(ids) == 2 for ids in encoder.label_ids) and encoder.label_ids[0][0] == encoder.label_ids[1][0]
    examples = [Example({"text": t}, y) for t, y in [("apple", 1), ("stone", 0), ("river", 1), ("cloud", 0)]]
    # teach the frozen-to-be base model the mapping by ordinary fine-tuning, then freeze it under a prompt
    from softprompt.encoding import collate

    batch = collate(encoder.encode_all(examples), encoder)
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    for _ in range(60):
        loss = base(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model = get_prompt_model(base, PromptTuningConfig(num_virtual_tokens=0, task_type="CAUSAL_LM"))
    scores = score(model, encoder, encoder.encode_all(examples), batch_size=3)
    assert predictions(scores) == [1, 0, 1, 0]
    # and the scores are the summed token log-likelihoods, computed here by hand for one example
    ids = encoder.encode(examples[0]).input_ids
    for label, label_ids in enumerate(encoder.label_ids):
        full = torch.tensor([ids + label_ids])
        logp = torch.log_softmax(base(full).logits[0], -1)
        want = sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(label_ids))
        torch.testing.assert_close(scores[0, label], want, atol=1e-4, rtol=0)


def test_single_token_fast_path_equals_full_scoring(tokenizer, tiny_llama):
    task = TaskSpec("toy", ("text",), ("neg", "pos"), ("accuracy",), "{text} =", (" bad", " good"))
    encoder = TaskEncoder(tokenizer, task, TaskType.CAUSAL_LM, 64)
    model = get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), tokenizer)
    feats = encoder.encode_all([Example({"text": t}, 0) for t in ["a long sentence here", "short"]])
    fast = score(model, encoder, feats)
    encoder.label_ids = [ids + [tokenizer.sep_token_id] for ids in encoder.label_ids]  # force the general path
    slow = score(model, encoder, feats)
    eos = torch.log_softmax(model(torch.tensor([feats[0].input_ids + encoder.label_ids[0]])).logits[0, -2], -1)
    torch.testing.assert_close(slow[0, 0], fast[0, 0] + eos[tokenizer.sep_token_id], atol=1e-4, rtol=0)


def _examples():
    return [Example({"text": t}, i % 2) for i, t in enumerate(["good film", "awful", "fine cast, thin plot"])]


def test_save_load_gives_identical_outputs(tiny_dirs, tmp_path):
    from softprompt import TrainConfig, describe_model, resolve
    from softprompt.tasks import get_task

    for name, task_type in (("llama", TaskType.CAUSAL_LM), ("bert", TaskType.SEQ_CLS)):
        model = describe_model(tiny_dirs[name])
        spec = resolve(TrainConfig(model=tiny_dirs[name], prompt_length=4, task_type=task_type.value, init="random",
                                   max_length=32, seed=3), model, get_task("rotten_tomatoes"))
        prompted = PromptedTask.build(spec, model)
        with torch.no_grad():
            prompted.model.prompt.weight.add_(0.1)  # not the init any more
            if prompted.model.head is not None:
                prompted.model.head.weight.mul_(2)
        before = prompted.scores(_examples())
        prompted.save_pretrained(tmp_path / name)
        loaded = PromptedTask.from_pretrained(tmp_path / name)
        assert torch.equal(loaded.scores(_examples()), before)
        size = (tmp_path / name / "prompt.safetensors").stat().st_size
        assert size < 4096  # KB-sized: the prompt (and head) only


def test_multi_token_labels_from_one_shared_prefix_equal_one_pass_per_label(tokenizer, tiny_llama):
    task = TaskSpec("toy", ("text",), ("a", "b", "c"), ("accuracy",), "{text} =",
                    (" very good", " very bad indeed", " fine"))
    encoder = TaskEncoder(tokenizer, task, TaskType.CAUSAL_LM, 64)
    model = get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), tokenizer)
    feats = encoder.encode_all([Example({"text": t}, 0) for t in ["a long sentence here", "short", "mid size one"]])
    shared = score(model, encoder, feats, batch_size=3)
    model.engine.force_off()
    per_label = score(model, encoder, feats, batch_size=3)
    torch.testing.assert_close(shared, per_label, atol=1e-4, rtol=0)
