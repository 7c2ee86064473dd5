"""Exact equivalences of the prompted forward for each family."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from softprompt import PromptTuningConfig, TrainConfig, get_prompt_model
from softprompt.engine import cannot_share
from softprompt.training import prepare

TEXTS = ["a gripping and funny film", "dull", "the plot never quite comes together , but the cast is fine"]
ATOL = 1e-5


def batch(tokenizer, side: str, texts=TEXTS):
    tokenizer.padding_side = side
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    return enc


def every_next_token(prefixes: list[list[int]], vocab: int) -> list[list[int]]:
    """Each of `prefixes` ([] for the row's end) followed by every token: `continuation_logprobs` over these reads
    the whole log-softmax of the state after each prefix, not only a label's token."""
    return [prefix + [token] for prefix in prefixes for token in range(vocab)]


def wrap(model, k, task_type, tokenizer, init="random", **config):
    torch.manual_seed(1)
    return get_prompt_model(model, PromptTuningConfig(num_virtual_tokens=k, task_type=task_type, init=init, **config),
                            tokenizer)


def real(logits, mask):
    """Logits of the real tokens of each row, as a list (padding dropped)."""
    return [row[m.bool()] for row, m in zip(logits, mask)]


# -- zero-length prompt ------------------------------------------------------------------------------------
def test_zero_length_prompt_is_the_base_model(tokenizer, tiny_bert, tiny_llama, tiny_t5):
    enc = batch(tokenizer, "right")
    with torch.no_grad():
        base_cls = tiny_bert(**enc).logits
        got_cls = wrap(tiny_bert, 0, "SEQ_CLS", tokenizer)(**enc).logits
        base_lm = tiny_llama(**{k: v for k, v in enc.items() if k != "token_type_ids"}).logits
        got_lm = wrap(tiny_llama, 0, "CAUSAL_LM", tokenizer)(enc["input_ids"], enc["attention_mask"]).logits
        labels = enc["input_ids"][:, :4].contiguous()
        base_s2s = tiny_t5(enc["input_ids"], enc["attention_mask"], labels=labels).logits
        got_s2s = wrap(tiny_t5, 0, "SEQ_2_SEQ_LM", tokenizer)(enc["input_ids"], enc["attention_mask"],
                                                               labels=labels).logits
    torch.testing.assert_close(got_cls, base_cls, atol=ATOL, rtol=0)
    for g, b in zip(real(got_lm, enc["attention_mask"]), real(base_lm, enc["attention_mask"])):
        torch.testing.assert_close(g, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_s2s, base_s2s, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_mean_pooling_matches_hand_built_mean(tokenizer, tiny_bert, side):
    """pooling='mean': the head sees the mean of the text's final states (no virtual tokens, no pads), with
    either padding side; the loss is the cross-entropy of those logits."""
    model = wrap(tiny_bert, 4, "SEQ_CLS", tokenizer, pooling="mean")
    enc = batch(tokenizer, side)
    labels = torch.tensor([0, 1, 1])
    out = model(**enc, labels=labels)
    emb = tiny_bert.get_input_embeddings()
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        e = emb(ids)
        concat = torch.cat([e[:, :1], model.prompt.weight[None], e[:, 1:]], dim=1)
        states = tiny_bert.bert(inputs_embeds=concat, token_type_ids=torch.zeros(concat.shape[:2], dtype=torch.long))
        text_states = torch.cat([states.last_hidden_state[0, :1], states.last_hidden_state[0, 5:]])
        want = tiny_bert.classifier(text_states.mean(0))
        torch.testing.assert_close(out.logits[i], want, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels), atol=ATOL, rtol=0)
    assert not torch.allclose(out.logits, wrap(tiny_bert, 4, "SEQ_CLS", tokenizer)(**enc).logits)


def test_roberta_style_head_reads_the_mean_and_siamese_gets_a_linear_head(tokenizer):
    """A dense-tanh-projection head (RoBERTa, MPNet: sentence-embedding models too) takes the mean-pooled
    vector where it would take <s>; siamese pooling swaps it for a linear head over [u, v, |u - v|, u * v]."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=130, num_labels=3,
                        pad_token_id=tokenizer.pad_token_id)
    roberta = RobertaForSequenceClassification(cfg).eval()
    model = wrap(roberta, 4, "SEQ_CLS", tokenizer, pooling="mean")
    enc = batch(tokenizer, "right")
    got = model(**enc).logits
    emb = roberta.get_input_embeddings()
    for i, text in enumerate(TEXTS):
        e = emb(tokenizer(text, return_tensors="pt")["input_ids"])
        states = roberta.roberta(inputs_embeds=torch.cat([e[:, :1], model.prompt.weight[None], e[:, 1:]], dim=1))
        text_states = torch.cat([states.last_hidden_state[0, :1], states.last_hidden_state[0, 5:]])
        want = roberta.classifier(text_states.mean(0)[None, None])[0]
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=0)
    siamese = wrap(RobertaForSequenceClassification(cfg), 4, "SEQ_CLS", tokenizer, pooling="siamese")
    assert isinstance(siamese.head, torch.nn.Linear) and tuple(siamese.head.weight.shape) == (3, 4 * 32)
    logits = siamese(enc["input_ids"], enc["attention_mask"], pair_ids=enc["input_ids"],
                     pair_mask=enc["attention_mask"]).logits
    assert logits.shape == (3, 3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_siamese_pooling_matches_hand_built_pair_features(tokenizer, tiny_bert, side):
    """pooling='siamese': each text of a pair runs alone with the prompt, is mean-pooled and scaled to unit
    length, and the head reads [u, v, |u - v|, u * v]; texts of different lengths in either order."""
    model = wrap(tiny_bert, 4, "SEQ_CLS", tokenizer, pooling="siamese")
    model.eval()
    assert model.head.in_features == 4 * 32 and model.head.weight.requires_grad
    firsts, seconds = TEXTS, [TEXTS[2], "a film", TEXTS[0]]
    first, second = batch(tokenizer, side, firsts), batch(tokenizer, side, seconds)
    labels = torch.tensor([1, 0, 1])
    out = model(first["input_ids"], first["attention_mask"], labels=labels, pair_ids=second["input_ids"],
                pair_mask=second["attention_mask"])
    emb = tiny_bert.get_input_embeddings()

    def embed(text):
        e = emb(tokenizer(text, return_tensors="pt")["input_ids"])
        concat = torch.cat([e[:, :1], model.prompt.weight[None], e[:, 1:]], dim=1)
        states = tiny_bert.bert(inputs_embeds=concat).last_hidden_state[0]
        return torch.nn.functional.normalize(torch.cat([states[:1], states[5:]]).mean(0), dim=0)

    for i in range(3):
        u, v = embed(firsts[i]), embed(seconds[i])
        want = tiny_bert.classifier(torch.cat([u, v, (u - v).abs(), u * v]))
        torch.testing.assert_close(out.logits[i], want, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels), atol=ATOL, rtol=0)


# -- prompted forward == hand-built concat, one unpadded example at a time --------------------------------------
def test_encoder_matches_hand_built_concat(tokenizer, tiny_bert):
    model = wrap(tiny_bert, 5, "SEQ_CLS", tokenizer)
    enc = batch(tokenizer, "right")
    got = model(**enc).logits
    emb = tiny_bert.get_input_embeddings()
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        e = emb(ids)
        concat = torch.cat([e[:, :1], model.prompt.weight[None], e[:, 1:]], dim=1)  # [CLS] prompt text [SEP]
        want = tiny_bert(inputs_embeds=concat, token_type_ids=torch.zeros(concat.shape[:2], dtype=torch.long)).logits
        torch.testing.assert_close(got[i], want[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_decoder_matches_hand_built_concat(tokenizer, name, request):
    base = request.getfixturevalue(name)
    model = wrap(base, 6, "CAUSAL_LM", tokenizer)
    for side in ("left", "right"):
        enc = batch(tokenizer, side)
        got = model(enc["input_ids"], enc["attention_mask"]).logits
        assert got.shape[:2] == enc["input_ids"].shape  # logits line up with the caller's tokens
        for i, text in enumerate(TEXTS):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            concat = torch.cat([model.prompt.weight[None], base.get_input_embeddings()(ids)], dim=1)
            want = base(inputs_embeds=concat).logits[0, 6:]
            torch.testing.assert_close(got[i][enc["attention_mask"][i].bool()], want, atol=ATOL, rtol=0)


def test_seq2seq_matches_hand_built_concat(tokenizer, tiny_t5):
    model = wrap(tiny_t5, 4, "SEQ_2_SEQ_LM", tokenizer)
    enc = batch(tokenizer, "right")
    labels = torch.tensor([[2000, 2001, tokenizer.sep_token_id]] * len(TEXTS))
    got = model(enc["input_ids"], enc["attention_mask"], labels=labels).logits
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        concat = torch.cat([model.prompt.weight[None], tiny_t5.get_input_embeddings()(ids)], dim=1)
        want = tiny_t5(inputs_embeds=concat, labels=labels[:1]).logits
        torch.testing.assert_close(got[i], want[0], atol=ATOL, rtol=0)


# -- padding side never changes a result --------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,task_type",
    [("tiny_bert", "SEQ_CLS"), ("tiny_llama", "CAUSAL_LM"), ("tiny_llama_cls", "SEQ_CLS"), ("tiny_t5", "SEQ_2_SEQ_LM")],
)
def test_left_and_right_padding_agree(tokenizer, name, task_type, request):
    model = wrap(request.getfixturevalue(name), 5, task_type, tokenizer)
    outs = {}
    for side in ("left", "right"):
        enc = batch(tokenizer, side)
        kwargs = dict(attention_mask=enc["attention_mask"])
        if task_type == "SEQ_CLS":
            kwargs["labels"] = torch.tensor([0, 1, 1])
        elif task_type == "CAUSAL_LM":
            kwargs["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        else:
            kwargs["labels"] = torch.tensor([[2000, tokenizer.sep_token_id]] * 3)
        out = model(enc["input_ids"], **kwargs)
        logits = real(out.logits, enc["attention_mask"]) if task_type == "CAUSAL_LM" else [out.logits]
        outs[side] = (out.loss, logits)
    torch.testing.assert_close(outs["left"][0], outs["right"][0], atol=ATOL, rtol=0)
    for a, b in zip(outs["left"][1], outs["right"][1]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_decoder_classifier_pools_last_real_token(tokenizer, tiny_llama_cls):
    model = wrap(tiny_llama_cls, 3, "SEQ_CLS", tokenizer)
    enc = batch(tokenizer, "right")
    got = model(enc["input_ids"], enc["attention_mask"]).logits
    for i, text in enumerate(TEXTS):
        single = tokenizer(text, return_tensors="pt")
        torch.testing.assert_close(got[i], model(single["input_ids"]).logits[0], atol=ATOL, rtol=0)


def test_virtual_token_labels_are_ignored(tokenizer, tiny_llama):
    model = wrap(tiny_llama, 4, "CAUSAL_LM", tokenizer)
    enc = batch(tokenizer, "right")
    inputs, _, offsets = model.prompted_inputs(enc["input_ids"], enc["attention_mask"], labels=enc["input_ids"])
    for row, off in zip(inputs["labels"], offsets):
        assert (row[off: off + 4] == -100).all()
    assert inputs["labels"].shape[1] == enc["input_ids"].shape[1] + 4


# -- what trains ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,task_type", [("tiny_bert", "SEQ_CLS"), ("tiny_llama", "CAUSAL_LM"),
                                            ("tiny_t5", "SEQ_2_SEQ_LM")])
def test_only_prompt_and_head_train(tokenizer, name, task_type, request):
    base = request.getfixturevalue(name)
    model = wrap(base, 4, task_type, tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"prompt.weight"} | ({"base.classifier.weight", "base.classifier.bias"} if task_type == "SEQ_CLS"
                                    else set())
    assert trainable == expected
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if "classifier" not in n}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.1)
    enc = batch(tokenizer, "right")
    labels = {"SEQ_CLS": torch.tensor([0, 1, 1]),
              "CAUSAL_LM": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100),
              "SEQ_2_SEQ_LM": torch.tensor([[2000, 102]] * 3)}[task_type]
    before = model.prompt.weight.detach().clone()
    model.train()
    for _ in range(3):
        loss = model(enc["input_ids"], enc["attention_mask"], labels=labels).loss
        loss.backward()
        assert all(p.grad is None for n, p in base.named_parameters() if n in frozen)
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, model.prompt.weight)
    for n, p in base.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # bit-identical backbone


@contextmanager
def spy_attention(name: str, fn):
    """Register `fn` under `name` with a call counter for the duration; yields the list of calls."""
    from softprompt.engine import attention

    used = []
    attention.AttentionInterface.register(name, lambda *a, **k: used.append(1) or fn(*a, **k))
    try:
        yield used
    finally:
        attention.AttentionInterface.register(name, fn)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("path", ["packed", "cached", "concat"])
@pytest.mark.parametrize("first_labelled", [False, True])
def test_tail_only_training_loss_equals_full_forward_loss(tokenizer, name, side, path, first_labelled, request,
                                                          monkeypatch):
    """The tail loss, through the shared prompt prefix (prompt and rows packed into one sequence, or rows after
    the prompt's cached keys/values) or the concatenated sequence, is forward's loss, gradient included."""
    from softprompt.engine import attention

    model = wrap(request.getfixturevalue(name), 5, "CAUSAL_LM", tokenizer)
    assert model.engine.reason() is None
    if path == "cached":
        monkeypatch.setattr("softprompt.engine.engine.can_pack", lambda model: False)
    if path == "concat":
        model.engine.force_off("forced off for the test")
    enc = batch(tokenizer, side)
    labels = enc["input_ids"].clone()
    if not first_labelled:
        labels[:, :3] = -100  # a label span that starts at different columns in different rows
    labels[enc["attention_mask"] == 0] = -100
    full = model(enc["input_ids"], enc["attention_mask"], labels=labels).loss
    tail = model.training_loss(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    torch.testing.assert_close(tail, full, atol=ATOL, rtol=0)
    grads = []
    with spy_attention(attention.PACKED, attention.packed_sdpa) as used:
        for loss_fn in (lambda: model(enc["input_ids"], enc["attention_mask"], labels=labels).loss,
                        lambda: model.training_loss(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                                    labels=labels)):
            model.prompt.weight.grad = None
            loss_fn().backward()
            grads.append(model.prompt.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=ATOL, rtol=0)
    assert bool(used) == (path == "packed")
    assert model.base.config._attn_implementation == "sdpa"


def test_decoder_generate_continues_after_prompt_and_input(tokenizer, tiny_llama):
    """Greedy generation from a left-padded batch equals a hand-run greedy loop over each unpadded row."""
    model = wrap(tiny_llama, 4, "CAUSAL_LM", tokenizer)
    enc = batch(tokenizer, "left")
    got = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=4)  # from the kept prompt KV
    model.engine.force_off()  # transformers' generate on the concatenated sequence
    via_hf = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=4, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(got, via_hf[:, -4:])
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        new = []
        for _ in range(4):
            full = torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1) if new else ids
            concat = torch.cat([model.prompt.weight[None], tiny_llama.get_input_embeddings()(full)], dim=1)
            new.append(int(tiny_llama(inputs_embeds=concat).logits[0, -1].argmax()))
        assert got[i, -4:].tolist() == new


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_shared_prefix_tail_logits_equal_concat_and_cache_follows_the_prompt(tokenizer, name, request):
    model = wrap(request.getfixturevalue(name), 6, "CAUSAL_LM", tokenizer)
    enc = batch(tokenizer, "right")
    with torch.no_grad():
        shared = model.tail_logits(enc["input_ids"], enc["attention_mask"], 2)
        model.engine.force_off()
        concat = model.tail_logits(enc["input_ids"], enc["attention_mask"], 2)
        model.engine.force_off(None)
        torch.testing.assert_close(shared, concat, atol=ATOL, rtol=0)
        model.prompt.weight.add_(0.5)  # the kept keys/values must not outlive the prompt they came from
        moved = model.tail_logits(enc["input_ids"], enc["attention_mask"], 2)
        model.engine.force_off()
        torch.testing.assert_close(moved, model.tail_logits(enc["input_ids"], enc["attention_mask"], 2),
                                   atol=ATOL, rtol=0)
    assert not torch.allclose(moved, shared)


def test_grouped_attention_equals_transformers_sdpa_and_is_restored(tokenizer, tiny_llama):
    """The CPU grouped-query path (no repeated key/value heads) gives the same logits and gradients as
    transformers' SDPA with a padding mask, is really used, and leaves the model as it found it."""
    from softprompt.engine import attention

    enc = batch(tokenizer, "left")
    with spy_attention(attention.NAME, attention.gqa_sdpa) as used:
        outs = []
        for grouped in (False, True):
            embeds = tiny_llama.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
            if grouped:
                with attention.grouped_attention(tiny_llama):
                    logits = tiny_llama(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
            else:
                logits = tiny_llama(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
            logits[enc["attention_mask"].bool()].logsumexp(-1).sum().backward()
            outs.append((logits, embeds.grad))
    assert len(used) == tiny_llama.config.num_hidden_layers
    assert tiny_llama.config._attn_implementation == "sdpa"
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(outs[1][0][mask], outs[0][0][mask], atol=ATOL, rtol=0)
    torch.testing.assert_close(outs[1][1][mask], outs[0][1][mask], atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_labels", [3, 1])  # classes (cross-entropy) and a score (squared error)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("path", ["packed", "cached"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "last_mean"])
def test_decoder_head_through_the_shared_prefix_equals_the_concat(tokenizer, num_labels, side, path, pooling,
                                                                  monkeypatch):
    """A head over the last real token (or the text's mean) gives the same logits, loss, and prompt and head
    gradients through the shared prompt prefix as over the concatenated sequence (with the last token, the model's
    own pooling and loss)."""
    from transformers import LlamaForSequenceClassification

    from softprompt.engine import attention

    from .conftest import _llama_config

    torch.manual_seed(0)
    model = wrap(LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=num_labels)).eval(), 5,
                 "SEQ_CLS", tokenizer, pooling=pooling)
    assert model.engine.reason() is None
    if path == "cached":
        monkeypatch.setattr("softprompt.engine.engine.can_pack", lambda model: False)
    enc = batch(tokenizer, side)
    labels = torch.tensor([0, 2, 1]) if num_labels == 3 else torch.tensor([0.5, 4.0, 2.5])
    results = []
    with spy_attention(attention.PACKED, attention.packed_sdpa) as packed:
        for reason in (None, "forced off for the test"):
            if reason:
                model.engine.force_off(reason)
            model.zero_grad(set_to_none=True)
            out = model(enc["input_ids"], enc["attention_mask"], labels=labels)
            out.loss.backward()
            results.append((out.logits, out.loss, model.prompt.weight.grad, model.head.weight.grad))
    assert bool(packed) == (path == "packed")
    for shared, concat in zip(*results):
        torch.testing.assert_close(shared, concat, atol=ATOL, rtol=0)
    with torch.no_grad():  # inference: rows after the prompt's kept keys/values
        model.engine.force_off(None)
        torch.testing.assert_close(model(enc["input_ids"], enc["attention_mask"]).logits, results[1][0],
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "last_mean"])
def test_decoder_mean_pooling_matches_hand_built_mean(tokenizer, tiny_llama_cls, side, shared, pooling):
    """pooling='mean' on a decoder: the head reads the mean of the text's final states after the prompt (no
    virtual tokens, no pads); 'last_mean': a new linear head reads the last token's state beside that mean;
    through the shared prefix and through the concat alike."""
    model = wrap(tiny_llama_cls, 4, "SEQ_CLS", tokenizer, pooling=pooling).eval()
    head = model.head
    assert head.in_features == (2 if pooling == "last_mean" else 1) * tiny_llama_cls.config.hidden_size
    if not shared:
        model.engine.force_off("forced off for the test")
    enc = batch(tokenizer, side)
    with torch.no_grad():
        got = model(**enc).logits
        # Trainer passes its token count to a model that takes **kwargs; a head's pooling must not change for it
        torch.testing.assert_close(model(**enc, num_items_in_batch=torch.tensor(9)).logits, got)
        for i, text in enumerate(TEXTS):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            concat = torch.cat([model.prompt.weight[None], tiny_llama_cls.get_input_embeddings()(ids)], dim=1)
            states = tiny_llama_cls.model(inputs_embeds=concat).last_hidden_state[0, 4:]
            features = states.mean(0) if pooling == "mean" else torch.cat([states[-1], states.mean(0)])
            torch.testing.assert_close(got[i], head(features), atol=ATOL, rtol=0)
        if pooling == "mean":
            last = wrap(tiny_llama_cls, 4, "SEQ_CLS", tokenizer)
            last.prompt.weight.copy_(model.prompt.weight)
            assert not torch.allclose(got, last(**enc).logits)


@pytest.mark.parametrize("loss", ["rank", "lm", "head"])
def test_accumulated_training_through_the_shared_prefix_equals_the_concat(tiny_dirs, tiny_csv, tmp_path, loss):
    """Two optimizer steps of two accumulated micro-batches each move the prompt the same through the shared
    prefix (packed step, rank scores or the logit-free LM loss; a head from its ridge-fitted start) as through
    the plain concatenation."""
    prompts = []
    kind = {"task_type": "SEQ_CLS"} if loss == "head" else {"task_type": "CAUSAL_LM", "loss": loss}
    for shared in (True, False):
        trainer = prepare(TrainConfig(model=tiny_dirs["llama"], data=tiny_csv, prompt_length=4, max_steps=2,
                                               batch_size=8, grad_accum=2, eval_every=100, **kind,
                                               output=str(tmp_path / f"{loss}{shared}"), progress=False),
                                   log=lambda _: None)
        if not shared:
            trainer.model.engine.force_off("forced off for the test")
        start = trainer.model.prompt.weight.detach().clone()
        trainer.train()
        prompts.append(trainer.model.prompt.weight.detach())
    assert not torch.equal(prompts[0], start)
    torch.testing.assert_close(prompts[0], prompts[1], atol=1e-5, rtol=0)


FAMILIES = {"qwen2": {}, "qwen3": {}, "mistral": {"sliding_window": None}, "gemma": {}, "phi3": {}, "olmo2": {},
            "granite": {"logits_scaling": 4.0}, "cohere": {"logit_scale": 3.0}}  # these two rescale their logits


def tiny_decoder(tokenizer, family: str, **extra):
    """A tiny random causal LM of a transformers family (grouped-query heads), its LM head scaled up so that
    logits are far from uniform and a missed rescaling shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=None, **extra)  # no end token: generation runs its full length
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(20)
    return base


def shared_and_concat(model, tokenizer):
    """(loss, prompt gradient, tail logits packed, tail logits from kept keys/values, greedy continuation) with
    the shared prefix allowed, then forced off; and how many packed attention calls the first made."""
    from softprompt.engine import attention

    enc = batch(tokenizer, "left")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    assert model.engine.reason() is None  # the one-time probe passes, and runs before packed calls are counted
    results = []
    with spy_attention(attention.PACKED, attention.packed_sdpa) as packed:
        for shared in (True, False):
            model.engine.force_off(None if shared else "forced off for the test")
            model.prompt.weight.grad = None
            loss = model.training_loss(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                       labels=labels)
            loss.backward()
            tail = model.tail_logits(enc["input_ids"], enc["attention_mask"], 2)
            with torch.no_grad():
                kept = model.tail_logits(enc["input_ids"], enc["attention_mask"], 2)
            new = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=2, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[:, -2:]
            results.append((loss.detach(), model.prompt.weight.grad.clone(), tail.detach(), kept, new))
            if shared:
                calls = len(packed)
    return results, calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_prefix_equals_the_concat_across_decoder_families(tokenizer, family):
    """Loss, prompt gradient, tail logits (packed, and from the kept prompt keys/values) and greedy generation
    through the shared prefix match the model's own forward on the concatenation, for the decoder families
    transformers ships."""
    model = wrap(tiny_decoder(tokenizer, family, **FAMILIES[family]), 5, "CAUSAL_LM", tokenizer)
    assert model.engine.reason() is None
    (shared, concat), packed_calls = shared_and_concat(model, tokenizer)
    assert packed_calls > 0
    torch.testing.assert_close(shared, concat, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
@pytest.mark.parametrize("k", [5, 12])
def test_sliding_window_models_share_the_prefix_only_when_prompt_and_row_fit_the_window(tokenizer, family, k):
    """Window 24, rows of 14 tokens (+2 generated): with 5 virtual tokens everything fits and the shared prefix
    runs; with 12 it does not, and the concat serves. Either way the results are the concat's."""
    extra = {"layer_types": ["sliding_attention", "full_attention"]} if family == "gemma3_text" else {}
    model = wrap(tiny_decoder(tokenizer, family, sliding_window=24, **extra), k, "CAUSAL_LM", tokenizer)
    assert batch(tokenizer, "left")["input_ids"].shape[1] == 14
    assert model.engine.reason() is None
    (shared, concat), packed_calls = shared_and_concat(model, tokenizer)
    assert (packed_calls > 0) == (k == 5)
    torch.testing.assert_close(shared, concat, atol=1e-4, rtol=1e-5)


def test_soft_capping_sinks_and_state_space_layers_fall_back_and_unknown_attention_arguments_are_refused(tokenizer):
    """Gemma 2 (logit soft-capping), gpt-oss (attention sinks) and Falcon-H1 (Mamba layers, whose state would
    run from one packed row into the next) take the concat; an attention argument the shared prefix does not
    implement raises instead of being ignored."""
    from softprompt.engine import attention

    gemma2 = wrap(tiny_decoder(tokenizer, "gemma2"), 5, "CAUSAL_LM", tokenizer)
    assert gemma2.engine.reason() == "logit soft-capping" and not gemma2.engine.shares(4)
    gpt_oss = tiny_decoder(tokenizer, "gpt_oss", num_local_experts=2, num_experts_per_tok=1, sliding_window=None,
                           layer_types=["full_attention"] * 2)
    assert wrap(gpt_oss, 5, "CAUSAL_LM", tokenizer).engine.reason() == "attention sinks"
    hybrid = wrap(tiny_decoder(tokenizer, "falcon_h1"), 5, "CAUSAL_LM", tokenizer)  # Mamba + attention layers
    assert hybrid.engine.reason() == "state-space or linear-attention layers"
    q, kv = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 8)
    token = attention._layout.set((1, torch.ones(1, 1, 2, 3, dtype=torch.bool)))  # k = 1, one row of 2
    try:
        for sdpa in (attention.gqa_sdpa, attention.packed_sdpa):
            with pytest.raises(NotImplementedError, match="softcap"):
                sdpa(torch.nn.Module(), q, kv, kv, None, softcap=30.0)
            with pytest.raises(NotImplementedError, match="sliding_window"):
                sdpa(torch.nn.Module(), q, kv, kv, None, sliding_window=2)  # 3 keys seen, window 2
            assert sdpa(torch.nn.Module(), q, kv, kv, None, sliding_window=3)[0].shape == (1, 3, 4, 8)
    finally:
        attention._layout.reset(token)


def faulty_states(fault: str):
    """SharedPrefix.states that fails ("error") or shifts every state ("wrong"): what the probe must catch."""
    from softprompt.engine import SharedPrefix

    honest = SharedPrefix.states

    def faulty(self, *args, **kwargs):
        if fault == "error":
            raise RuntimeError("unsupported attention")
        rows = honest(self, *args, **kwargs)
        return rows._replace(hidden=rows.hidden + 0.1 * rows.hidden.abs().max())

    return faulty


@pytest.mark.parametrize("fault", ["wrong", "error"])
def test_a_shared_prefix_that_disagrees_with_the_concat_on_the_probe_is_not_used(tokenizer, tiny_llama, fault,
                                                                                monkeypatch):
    """Before its first use the shared prefix is checked on a probe batch; a model where it gives other states
    than the concatenation (or fails) takes the concat, so results stay the concat's."""
    from softprompt.engine import SharedPrefix

    monkeypatch.setattr(SharedPrefix, "states", faulty_states(fault))
    model = wrap(tiny_llama, 5, "CAUSAL_LM", tokenizer)
    assert cannot_share(model.base, model.prompt) is None and not model.engine.shares(4)
    assert ("failed on a probe" if fault == "error" else "differed from the concatenation") in model.engine.reason()
    enc = batch(tokenizer, "left")
    model.engine.force_off("forced off for the test")
    want = model.tail_logits(enc["input_ids"], enc["attention_mask"], 2)
    model.engine.force_off(None)
    torch.testing.assert_close(model.tail_logits(enc["input_ids"], enc["attention_mask"], 2), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_passes_for_a_model_the_shared_prefix_serves(tokenizer, tiny_llama, tiny_gpt2, dtype):
    for base in (tiny_llama, tiny_gpt2):
        model = wrap(base, 5, "CAUSAL_LM", tokenizer)
        model.freeze_in(dtype)
        base.train()  # dropout on (GPT-2's 0.1): the probe turns it off, and back on
        assert model.engine.shares(4), model.engine.reason()
        assert base.training


@pytest.mark.parametrize("dtype, precision, gap, shares", [
    (torch.float32, "highest", 1.6e-4, True),  # an AMD EPYC's fp32 rounding on a prefix, once refused (bound 1e-4)
    (torch.float32, "highest", 1.2e-3, False),  # BertGeneration attending both ways (tiny, fp32)
    (torch.float32, "high", 5e-2, True),  # fp32 matmuls allowed to run in TF32 round like bf16
    (torch.bfloat16, "highest", 9e-2, True),  # bf16 rounding on SmolLM2 with a moved prefix
    (torch.bfloat16, "highest", 2e-1, False),
])
def test_the_probes_bound_follows_the_precision_the_model_computes_in(tokenizer, tiny_llama, dtype, precision, gap,
                                                                      shares, monkeypatch):
    """The probe accepts what rounding gives where the model runs (probe.TOLERANCES) and refuses more."""
    from softprompt.engine import probe

    monkeypatch.setattr(probe, "probe_gap", lambda engine, n: gap)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    model = wrap(tiny_llama, 5, "CAUSAL_LM", tokenizer)
    model.freeze_in(dtype)
    assert model.engine.shares(4) == shares, model.engine.reason()
    assert shares or f"by {gap:.1e} (relative)" in model.engine.reason()


@pytest.mark.parametrize("family", ["bert-generation", "modernbert-decoder"])
def test_the_probe_catches_decoder_classes_the_engine_does_not_model(tokenizer, family):
    """BertGeneration without `is_decoder` attends both ways; ModernBERT's decoder runs a prediction head before
    its output embeddings. Nothing in their configs says so to the checks above; the probe sees the results
    differ from the concatenation's."""
    model = wrap(tiny_decoder(tokenizer, family), 5, "CAUSAL_LM", tokenizer)
    assert cannot_share(model.base, model.prompt) is None
    assert not model.engine.shares(4) and "differed from the concatenation" in model.engine.reason()
