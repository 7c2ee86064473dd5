"""The shared-prefix engine with both kinds of prompt source: input vectors (the soft prompt) and per-layer
keys/values (what prefix tuning will give), against the plain model."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import DynamicCache

from softprompt.errors import SoftpromptError
from softprompt.engine import InputVectors, KeyValues, SharedPrefix, cannot_share
from softprompt.methods.prompt.model import SoftPrompt

from .test_models import ATOL, batch, every_next_token, faulty_states, wrap


def cache_kwarg(base) -> str:
    return "cache" if "cache" in inspect.signature(base.base_model.forward).parameters else "past_key_values"


def filled_cache(base, layers, rows: int) -> DynamicCache:
    cache = DynamicCache(config=base.config)
    for i, (keys, values) in enumerate(layers):
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), i)
    return cache


class PromptKeyValues:
    """A key/value source computed from a soft prompt: its keys/values at every layer, run through the model
    (in autograd's graph when training, so gradients reach the prompt through them)."""

    def __init__(self, base, prompt: SoftPrompt) -> None:
        self.base, self.prompt = base, prompt

    @property
    def num_tokens(self) -> int:
        return self.prompt.num_tokens

    def version(self):
        return self.prompt.version()

    def key_values(self):
        cache = DynamicCache(config=self.base.config)
        embeds = self.prompt.embeddings()[None]
        self.base.base_model(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1])[None], use_cache=True,
                             **{cache_kwarg(self.base): cache})
        return [(layer.keys, layer.values) for layer in cache.layers]


class FixedKeyValues:
    """Given keys/values, e.g. trainable leaves."""

    def __init__(self, layers) -> None:
        self.layers = layers

    @property
    def num_tokens(self) -> int:
        return self.layers[0][0].shape[2]

    def version(self):
        return tuple((t.data_ptr(), t._version) for pair in self.layers for t in pair)

    def key_values(self):
        return self.layers


def random_key_values(base, k: int, generator: torch.Generator):
    config = base.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    return FixedKeyValues([tuple(torch.randn(1, heads, k, dim, generator=generator).requires_grad_(True)
                                 for _ in range(2)) for _ in range(config.num_hidden_layers)])


def with_key_values(model, source):
    """A second decoder adapter over the same frozen base whose engine reads `source`; its own soft prompt is
    another one, so that a call falling back to the concatenation would show."""
    other = wrap(model.base, model.prompt.num_tokens, "CAUSAL_LM", None)
    with torch.no_grad():
        other.prompt.weight.mul_(-3)
    other.engine = SharedPrefix(model.base, source)
    return other


def test_soft_prompt_is_the_input_vector_kind_and_other_objects_are_refused(tiny_llama):
    prompt = SoftPrompt(3, tiny_llama.config.hidden_size)
    assert isinstance(prompt, InputVectors) and not isinstance(prompt, KeyValues)
    assert SharedPrefix(tiny_llama, prompt).kind == "input_vectors"
    layers = random_key_values(tiny_llama, 3, torch.Generator().manual_seed(0))
    assert SharedPrefix(tiny_llama, layers).kind == "key_values"
    with pytest.raises(TypeError, match="keys/values"):
        SharedPrefix(tiny_llama, torch.zeros(3, 32))


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_prompts_own_keys_values_give_what_the_prompt_gives(tokenizer, name, side, request):
    """A key/value source made of an input-vector prompt's keys/values at every layer gives that prompt's tail
    logits, continuations' log-probs (every token after each state the continuations [5, 6, 7] and [8] run
    through), greedy generation, LM loss and prompt gradient (through the keys/values, where
    the prompt's own training step runs packed), as long as no row's first real token is labelled: the
    key/value kind has no state there to predict it, and refuses such a label."""
    from softprompt.engine import attention

    from .test_models import spy_attention

    model = wrap(request.getfixturevalue(name), 5, "CAUSAL_LM", tokenizer)
    kv = with_key_values(model, PromptKeyValues(model.base, model.prompt))
    assert kv.engine.kind == "key_values" and kv.engine.reason() is None and model.engine.reason() is None
    if name == "tiny_llama":  # grouped-query attention: 2 key/value heads for 4 query heads
        assert kv.engine.source.key_values()[0][0].shape == (1, 2, 5, 8)
    enc = batch(tokenizer, side)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(kv.tail_logits(ids, mask, 3), model.tail_logits(ids, mask, 3), atol=ATOL, rtol=0)
        continuations = every_next_token([[], [5], [5, 6]], model.base.config.vocab_size)
        torch.testing.assert_close(kv.continuation_logprobs(ids, mask, continuations),
                                   model.continuation_logprobs(ids, mask, continuations), atol=ATOL, rtol=0)
    assert torch.equal(kv.generate(ids, mask, max_new_tokens=4), model.generate(ids, mask, max_new_tokens=4))

    # training: the prompt's step packed, the keys/values' through the cache, with their graph to the prompt
    labels = ids.masked_fill(mask == 0, -100)
    first_real = (mask.cumsum(1) == 1) & (mask == 1)
    results = []
    with spy_attention(attention.PACKED, attention.packed_sdpa) as packed:
        for prompted in (model, kv):
            model.prompt.weight.grad = None
            loss = prompted.training_loss(input_ids=ids, attention_mask=mask,
                                          labels=labels.masked_fill(first_real, -100))
            loss.backward()
            results.append((loss.detach(), model.prompt.weight.grad.clone()))
            if prompted is model:
                assert packed, "the soft prompt's training step runs packed"
                packed.clear()
    assert not packed, "keys/values run after the cache, never packed"
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with torch.no_grad():
        tail = kv.tail_logits(ids, mask, 3)  # with gradients on, and off (kept), the same
    torch.testing.assert_close(kv.tail_logits(ids, mask, 3).detach(), tail, atol=ATOL, rtol=0)
    with pytest.raises(SoftpromptError, match="first real token is labelled"):
        kv.training_loss(input_ids=ids, attention_mask=mask, labels=labels)


def test_random_keys_values_equal_the_model_given_them_as_its_cache(tokenizer, tiny_llama):
    """With random keys/values as the prefix, the engine's tail logits, LM loss and the gradients to the
    keys/values are the plain model's, called on the tokens with those keys/values as its cache, a mask over
    prefix + tokens and positions counted from k; kept keys/values (no_grad) give the same logits."""
    k, keep = 4, 3
    source = random_key_values(tiny_llama, k, torch.Generator().manual_seed(0))
    engine = SharedPrefix(tiny_llama, source)
    assert engine.reason() is None  # the probe, against the same reference, passes
    enc = batch(tokenizer, "left")  # the engine takes left-aligned rows
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100).masked_fill((mask.cumsum(1) == 1) & (mask == 1), -100)
    projection = torch.randn(tiny_llama.config.vocab_size, generator=torch.Generator().manual_seed(1))
    leaves = [t for pair in source.layers for t in pair]

    def grads(loss):
        for t in leaves:
            t.grad = None
        loss.backward()
        return [t.grad.clone() for t in leaves]

    got = engine.tail_logits(ids, mask, keep)
    got_grads = grads((got @ projection).sum())
    got_loss = engine.lm_loss(ids, mask, labels)
    got_loss_grads = grads(got_loss)

    def reference():
        full_mask = torch.cat([mask.new_ones(ids.shape[0], k), mask], dim=1)
        positions = (k + mask.cumsum(1) - 1).clamp(min=0)
        return tiny_llama(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                          **{cache_kwarg(tiny_llama): filled_cache(tiny_llama, source.layers, ids.shape[0])}).logits

    want = reference()[:, -keep:]
    want_grads = grads((want @ projection).sum())
    logits = reference()
    want_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                  ignore_index=-100)
    want_loss_grads = grads(want_loss)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_loss, want_loss, atol=ATOL, rtol=0)
    for g, w in zip(got_grads + got_loss_grads, want_grads + want_loss_grads, strict=True):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(engine.tail_logits(ids, mask, keep), want.detach(), atol=ATOL, rtol=0)
        assert engine._kept is not None and engine._kept[0] == source.version()


@pytest.mark.parametrize("fault", ["wrong", "error"])
def test_the_probe_catches_a_key_value_path_that_differs_from_the_models_own(tiny_llama, fault, monkeypatch):
    engine = SharedPrefix(tiny_llama, random_key_values(tiny_llama, 4, torch.Generator().manual_seed(0)))
    monkeypatch.setattr(SharedPrefix, "states", faulty_states(fault))
    assert cannot_share(engine.base, engine.source) is None and not engine.shares(4)
    assert ("failed on a probe" if fault == "error" else "differed from the model given them as its cache") in \
        engine.reason()


def test_keys_values_in_fp32_serve_a_model_in_bf16(tokenizer, tiny_llama):
    """Keys/values kept in fp32 (what trains) run with bf16 frozen weights, as the rows' own keys/values are,
    in the probe's reference too; the results stay close to fp32's."""
    source = random_key_values(tiny_llama, 4, torch.Generator().manual_seed(0))
    enc = batch(tokenizer, "left")
    with torch.no_grad():
        want = SharedPrefix(tiny_llama, source).tail_logits(enc["input_ids"], enc["attention_mask"], 2)
        engine = SharedPrefix(tiny_llama.to(torch.bfloat16), source)
        assert engine.reason() is None
        got = engine.tail_logits(enc["input_ids"], enc["attention_mask"], 2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_the_engines_state_exists_from_construction_and_follows_the_prompt(tokenizer, tiny_llama):
    """Every attribute the engine uses is set by its constructor (none appear later); kept keys/values are
    keyed on the prompt's version and dropped when the prompt changes in place or is replaced."""
    model = wrap(tiny_llama, 5, "CAUSAL_LM", tokenizer)
    engine = model.engine
    assert engine.base is model.base and engine.source is model.prompt and engine.kind == "input_vectors"
    attributes = dict(vars(engine))
    assert attributes["_kept"] is None and attributes["forced_off"] is None and attributes["_checked"] is False
    enc = batch(tokenizer, "left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    model.training_loss(input_ids=ids, attention_mask=mask, labels=labels).backward()
    model.generate(ids, mask, max_new_tokens=2)
    with torch.no_grad():
        before = model.tail_logits(ids, mask, 2)
        model.continuation_logprobs(ids, mask, [[5, 6]])
    engine.force_off("for the test")
    engine.force_off(None)
    assert set(vars(engine)) == set(attributes)
    assert engine._checked and engine._kept[0] == model.prompt.version()

    with torch.no_grad():
        model.prompt.weight.add_(0.5)  # in place: a new version, the kept keys/values are not used again
        moved = model.tail_logits(ids, mask, 2)
        assert engine._kept[0] == model.prompt.version() and not torch.allclose(moved, before)
        model.prompt = SoftPrompt(5, tiny_llama.config.hidden_size)  # replaced: the engine reads the new one
        assert engine.source is model.prompt and engine._kept is None
        model.prompt.weight.copy_(torch.randn(5, 32, generator=torch.Generator().manual_seed(3)))
        swapped = model.tail_logits(ids, mask, 2)
        engine.force_off()
        torch.testing.assert_close(swapped, model.tail_logits(ids, mask, 2), atol=ATOL, rtol=0)  # the concat's
    clone = copy.deepcopy(model)
    assert clone.engine is not engine and clone.engine.base is clone.base and clone.engine.source is clone.prompt
