"""Rank classification over label strings of several tokens: every label string of a batch is scored in one
forward over the rows' kept keys/values (the continuations' trie, `engine.paths.trie_states`), held to a
hand-built reference, the plain model run on prompt + input + label tokens with the label tokens' log-probs
summed, for the scores and for the rank loss's gradient to the prompt. Tiny random Llama (grouped-query
attention: 2 key/value heads for 4 heads) and GPT-2; soft prompt and prefix tuning."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptTuningConfig, get_prompt_model
from softprompt.config import PromptInit, TaskType
from softprompt.data import Example
from softprompt.encoding import TaskEncoder, pad
from softprompt.engine import as_cache, cannot_share, continuation_trie, probe
from softprompt.scoring import label_scores, score
from softprompt.tasks import TaskSpec

# 1 to 5 tokens each (MiniLM's WordPiece), "sports" and "world politics" leading others
LABELS = ("sports", "sports news", "sports news today and", "world politics", "world politics and economy today",
          "science")
TEXTS = ["the film was good", "a dull and lifeless story about nothing at all", "great", "it rains"]
GOLD = [0, 4, 2, 5]


def _encoder(tokenizer) -> TaskEncoder:
    task = TaskSpec("topics", ("text",), tuple(f"topic{i}" for i in range(len(LABELS))), ("accuracy",),
                    verbalizer=LABELS)
    encoder = TaskEncoder(tokenizer, task, TaskType.CAUSAL_LM, 64)
    assert sorted(map(len, encoder.label_ids)) == [1, 1, 2, 2, 4, 5]
    return encoder


def _model(base, tokenizer, method: str):
    config = PromptTuningConfig(num_virtual_tokens=3, task_type=TaskType.CAUSAL_LM, method=method,
                                init=PromptInit.VOCAB)
    model = get_prompt_model(base, config, tokenizer, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # trained-looking values, so that nothing passes on an init prompt
        for p in model.prompt.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    return model.eval()


def _reference(model, rows: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
    """(rows, labels): the plain model over prompt + row + label, unpadded, one sequence at a time, summing the
    label tokens' log-probabilities. The soft prompt goes in as input vectors before the row; a prefix as the
    model's cache, the row's positions counted from k."""
    base, k = model.base, model.prompt.num_tokens
    scores = []
    for row in rows:
        for label in labels:
            ids = torch.tensor([row + label])
            if model.engine.kind == "key_values":
                logits = base(input_ids=ids, attention_mask=torch.ones(1, k + ids.shape[1], dtype=torch.long),
                              position_ids=torch.arange(k, k + ids.shape[1])[None],
                              cache=as_cache(base, model.prompt.key_values(), 1)).logits[0]
            else:
                embeds = torch.cat([model.prompt.embeddings(), base.get_input_embeddings()(ids[0])])[None]
                logits = base(inputs_embeds=embeds).logits[0, k:]
            # the logit at row token t predicts token t + 1
            predicting = torch.log_softmax(logits[len(row) - 1:-1].float(), -1)
            scores.append(predicting.gather(-1, torch.tensor(label)[:, None]).sum())
    return torch.stack(scores).view(len(rows), len(labels))


def _prompt_grad(model, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    (grad,) = [p.grad.clone() for p in model.prompt.parameters()]
    assert grad.abs().sum() > 0
    return grad


def test_the_trie_runs_each_shared_leading_run_of_tokens_once():
    trie = continuation_trie([[5], [5, 6], [5, 6, 7], [5, 8], [9, 10], [5, 6, 7]])
    # proper prefixes: (5), (5, 6), (9); a continuation's token j is read off the state after its first j tokens
    assert trie.tokens.tolist() == [5, 6, 9] and trie.depth.tolist() == [1, 2, 1] and trie.continuations == 6
    assert trie.sees.tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert trie.reads.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 0, 3, 0, 1, 2]
    assert trie.targets.tolist() == [5, 5, 6, 5, 6, 7, 5, 8, 9, 10, 5, 6, 7]
    assert trie.owner.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 5]
    assert continuation_trie([[1], [2]]).tokens.numel() == 0


@pytest.mark.parametrize(("name", "method"), [("tiny_llama", "prompt"), ("tiny_llama", "prefix"),
                                              ("tiny_gpt2", "prompt")])
def test_label_scores_and_rank_loss_gradient_equal_the_concatenation(tokenizer, name, method, request):
    """label_scores (right-padded rows) and the model's continuation_logprobs on left-padded rows give the
    reference's scores, and the rank loss through them the reference's gradient to the prompt."""
    model = _model(request.getfixturevalue(name), tokenizer, method)
    encoder = _encoder(tokenizer)
    features = encoder.encode_all([Example({"text": t}, g) for t, g in zip(TEXTS, GOLD)])
    rows = [f.input_ids for f in features]
    assert len({len(r) for r in rows}) > 1  # padded
    gold = torch.tensor(GOLD)

    want = _reference(model, rows, encoder.label_ids)
    want_grad = _prompt_grad(model, torch.nn.functional.cross_entropy(want, gold))
    got = label_scores(model, encoder, features)
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_prompt_grad(model, torch.nn.functional.cross_entropy(got, gold)), want_grad,
                               atol=1e-5, rtol=1e-4)

    ids, mask = pad(rows, tokenizer.pad_token_id, side="left")
    left = model.continuation_logprobs(ids, mask, encoder.label_ids)
    torch.testing.assert_close(left, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_prompt_grad(model, torch.nn.functional.cross_entropy(left, gold)), want_grad,
                               atol=1e-5, rtol=1e-4)

    # evaluation: without gradients, from the prefix's kept keys/values, batches of 3 sorted by length
    torch.testing.assert_close(score(model, encoder, features, batch_size=3), want.detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and from the rows run after the kept keys/values
        torch.testing.assert_close(model.continuation_logprobs(ids, mask, encoder.label_ids), want.detach(),
                                   atol=1e-5, rtol=1e-5)


def test_the_engine_scores_every_label_in_one_forward_after_the_rows(tokenizer, tiny_llama):
    """A training step runs the backbone over the prompt, the rows, and once more for all label strings of all
    rows, however many labels there are (evaluation reuses the prompt's kept keys/values); the concatenation
    (the engine forced off) runs once per label and agrees."""
    model = _model(tiny_llama, tokenizer, "prompt")
    encoder = _encoder(tokenizer)
    features = encoder.encode_all([Example({"text": t}, None) for t in TEXTS])
    model.engine.reason()  # the one-time probe, outside what is counted
    calls: list[int] = []
    model.base.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    got = label_scores(model, encoder, features)
    assert len(calls) == 3  # prompt, rows, every label string
    with torch.no_grad():
        torch.testing.assert_close(label_scores(model, encoder, features), got.detach())
        assert len(calls) == 3 + 2
        model.engine.force_off("the concatenation, for the test")
        want = label_scores(model, encoder, features)
    assert len(calls) == 3 + 2 + len(LABELS)
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)


def test_the_probe_refuses_a_trie_whose_branches_see_each_other(tokenizer, tiny_llama, monkeypatch):
    """A model whose attention ignored the trie's mask (each node seeing every node before it, as plain causal
    attention would) gives a node its sibling branch's tokens; the one-time probe catches that."""
    def causal(continuations):
        trie = continuation_trie(continuations)
        return trie._replace(sees=torch.ones_like(trie.sees).tril())

    monkeypatch.setattr(probe, "continuation_trie", causal)
    model = _model(tiny_llama, tokenizer, "prompt")
    assert cannot_share(model.base, model.prompt) is None and not model.engine.shares(4)
    assert "differed from the concatenation" in model.engine.reason()
