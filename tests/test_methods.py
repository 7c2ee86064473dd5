"""Prompt tuning's relatives: P-tuning's prompt encoder and prefix tuning's keys/values, each held to peft's own
implementation for the same parameters and to a hand-built reference (the plain model given the prefix as its
cache), through padding, grouped-query attention (tiny llama: 2 key/value heads for 4 heads), save/load and the
CLI."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoder, PromptEncoderConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BartConfig, BartForConditionalGeneration, DynamicCache, TrainingArguments

from softprompt import MultiTaskModel, PromptedTask, PromptModel, PromptTuningConfig, SoftpromptError, TrainConfig, \
    get_prompt_model
from softprompt.assets import describe_model
from softprompt.checkpoint import load_tensors
from softprompt.cli import main
from softprompt.engine import cache_kwarg
from softprompt.hf_trainer import PromptTrainer
from softprompt.methods.prefix.model import PREFIX_KEY, kv_layout
from softprompt.methods.prefix.adapters import PrefixDecoderModel
from softprompt.peft_interop import export_peft
from softprompt.methods.prefix.method import LR as PREFIX_LR
from softprompt.methods.ptuning.method import LR as PTUNING_LR
from softprompt.spec import resolve
from softprompt.tasks import get_task

from .test_models import every_next_token

ROWS = [[101, 2023, 3185, 2001, 2204], [101, 2023, 3185], [101, 2919, 2143, 2001]]


def _batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ROWS padded on `side` with pad id 0."""
    width = max(map(len, ROWS))
    ids, mask = torch.zeros(len(ROWS), width, dtype=torch.long), torch.zeros(len(ROWS), width, dtype=torch.long)
    for i, row in enumerate(ROWS):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row), 1
    return ids, mask


def _real(values: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's values at its real tokens."""
    return [row[m.bool()] for row, m in zip(values, mask)]


def _randomise(module: torch.nn.Module) -> None:
    """Trained-looking parameters, so that a test does not pass on a zero or init prefix."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _prefix_model(base, tokenizer, k=3, task_type="CAUSAL_LM", **options) -> PrefixDecoderModel:
    config = PromptTuningConfig(num_virtual_tokens=k, task_type=task_type, method="prefix", init="vocab", **options)
    model = get_prompt_model(base, config, tokenizer, generator=torch.Generator().manual_seed(0))
    _randomise(model.prompt)
    return model.eval()


def _by_hand(base, model: PrefixDecoderModel, row: list[int]):
    """The plain model over one unpadded row, with the prefix's keys/values as its cache."""
    cache = DynamicCache(config=model.base.config)
    for i, (keys, values) in enumerate(model.prompt.key_values()):
        cache.update(keys.detach().clone(), values.detach().clone(), i)
    k = model.prompt.num_tokens
    return base(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, k + len(row), dtype=torch.long),
                **{cache_kwarg(model.base.base_model): cache})


# -- P-tuning ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_ptuning_vectors_equal_peft_prompt_encoder(tiny_llama, tokenizer, kind):
    config = PromptTuningConfig(num_virtual_tokens=5, method="ptuning", init="vocab", encoder_hidden_size=24,
                                encoder_reparameterization_type=kind, encoder_num_layers=2)
    model = get_prompt_model(tiny_llama, config, tokenizer)
    _randomise(model.prompt)
    peft = PromptEncoder(PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=32,
                                             encoder_hidden_size=24, encoder_reparameterization_type=kind,
                                             encoder_num_layers=2, num_transformer_submodules=1,
                                             num_attention_heads=4, num_layers=2))
    peft.embedding.weight.data.copy_(model.prompt.weight)
    missing = peft.load_state_dict(model.prompt.reparam.state_dict(), strict=False)
    assert missing.missing_keys == ["embedding.weight"] and not missing.unexpected_keys
    torch.testing.assert_close(model.prompt.embeddings(), peft(torch.arange(5)[None])[0], rtol=0, atol=1e-6)


def test_ptuning_saves_the_vectors_it_produces_and_loads_as_a_prompt(tiny_llama, tokenizer, tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=4, method="ptuning", init="vocab",
                                encoder_reparameterization_type="LSTM", encoder_dropout=0.3)
    model = get_prompt_model(tiny_llama, config, tokenizer)
    model.train()  # dropout on: a save still stores the vectors without it
    model.save_pretrained(tmp_path)
    model.eval()
    ids, mask = _batch("left")
    loaded = PromptModel.from_pretrained(tiny_llama, tmp_path)
    assert loaded.prompt.reparam is None and loaded.config.method == "ptuning"
    assert torch.equal(loaded.prompt.weight, model.prompt.served())
    with torch.no_grad():
        assert torch.equal(loaded.tail_logits(ids, mask, 2), model.tail_logits(ids, mask, 2))


# -- prefix tuning: against the plain model given the same cache ------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_prefix_logits_and_loss_equal_the_model_given_the_prefix_as_cache(tiny_llama, tokenizer, side):
    assert tiny_llama.config.num_key_value_heads < tiny_llama.config.num_attention_heads  # grouped-query attention
    model = _prefix_model(tiny_llama, tokenizer)
    ids, mask = _batch(side)
    with torch.no_grad():
        want = [_by_hand(tiny_llama, model, row).logits[0] for row in ROWS]
        forward = _real(model(ids, mask).logits, mask)  # the model's own forward with the cache, per row
        width = ids.shape[1]
        shared = model.tail_logits(ids, mask, width)  # the engine, left-aligned: each row's real tokens at the end
    for i, row in enumerate(ROWS):
        torch.testing.assert_close(forward[i], want[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared[i, width - len(row):], want[i], rtol=1e-5, atol=1e-5)

    labels = ids.masked_fill(mask == 0, -100)
    labels = torch.where(mask.cumsum(1) <= 1, -100, labels)  # never a row's first token: nothing predicts it
    picked = [(want[i][:-1], lab[m.bool()][1:]) for i, (lab, m) in enumerate(zip(labels, mask))]
    by_hand = torch.nn.functional.cross_entropy(torch.cat([p[0] for p in picked]), torch.cat([p[1] for p in picked]),
                                                ignore_index=-100)
    torch.testing.assert_close(model.training_loss(ids, mask, labels), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(ids, mask, labels=labels).loss, by_hand, rtol=1e-5, atol=1e-6)


def test_prefix_without_the_engine_takes_the_models_own_forward_with_the_cache(tiny_llama, tokenizer):
    model = _prefix_model(tiny_llama, tokenizer)
    ids, mask = _batch("left")
    labels = torch.where(mask.cumsum(1) > 1, ids, -100)
    with torch.no_grad():
        want = model.tail_logits(ids, mask, 3), model.training_loss(ids, mask, labels)
        model.engine.force_off("test")
        assert model.continuation_logprobs(ids, mask, [[2204, 2919]]) is None  # scoring then runs each label's tail
        torch.testing.assert_close(model.tail_logits(ids, mask, 3), want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.training_loss(ids, mask, labels), want[1], rtol=1e-5, atol=1e-6)
        with pytest.raises(SoftpromptError, match="greedily"):
            model.generate(ids, mask, max_new_tokens=2)


@pytest.mark.parametrize("pooling", ["cls", "mean", "last_mean"])
@pytest.mark.parametrize("shared", [True, False])
def test_prefix_head_equals_the_model_given_the_prefix_as_cache(tiny_llama_cls, tokenizer, pooling, shared):
    """A head after the prefix reads what the plain model given the prefix as its cache gives: its own last-token
    pooling, the mean of the row's final states, or both side by side."""
    model = _prefix_model(tiny_llama_cls, tokenizer, task_type="SEQ_CLS", pooling=pooling)
    if not shared:
        model.engine.force_off("forced off for the test")
    for side in ("left", "right"):
        ids, mask = _batch(side)
        with torch.no_grad():
            got = model(ids, mask).logits
            torch.testing.assert_close(model(ids, mask, num_items_in_batch=torch.tensor(9)).logits, got)
            if pooling == "cls":
                want = torch.cat([_by_hand(tiny_llama_cls, model, row).logits for row in ROWS])
            else:
                states = [_by_hand(tiny_llama_cls.model, model, row).last_hidden_state[0] for row in ROWS]
                pooled = [h.mean(0) if pooling == "mean" else torch.cat([h[-1], h.mean(0)]) for h in states]
                want = torch.stack([model.head(p) for p in pooled])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefix_rank_classification_and_generation_follow_the_cache(tiny_llama, tokenizer):
    model = _prefix_model(tiny_llama, tokenizer)
    ids, mask = _batch("right")
    vocab = tiny_llama.config.vocab_size
    with torch.no_grad():  # every token after each state the labels [2204] and [2919, 2143] run through
        got = model.continuation_logprobs(ids, mask, every_next_token([[], [2919]], vocab)).view(len(ROWS), 2, vocab)
        for i, row in enumerate(ROWS):
            want = _by_hand(tiny_llama, model, row + [2919]).logits[0, len(row) - 1:len(row) + 1].log_softmax(-1)
            want[1] += want[0, 2919]
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
        new = model.generate(ids, mask, max_new_tokens=3)
        for i, row in enumerate(ROWS):
            tokens = list(row)
            for _ in range(3):
                tokens.append(int(_by_hand(tiny_llama, model, tokens).logits[0, -1].argmax()))
            assert new[i].tolist() == tokens[len(row):]
    with pytest.raises(SoftpromptError, match="greedily"):
        model.generate(ids, mask, max_new_tokens=2, do_sample=True)


def _bert_by_hand(bert, prefix: list[tuple[torch.Tensor, torch.Tensor]], ids, mask, pooling: str) -> torch.Tensor:
    """BERT written out layer by layer, each layer's keys/values preceded by the prefix's and the text's positions
    counted from k (peft's layout), then pooled: [CLS] through the pooler, or the mean of the text's states."""
    k, (rows, n) = prefix[0][0].shape[2], ids.shape
    h = bert.embeddings(input_ids=ids, position_ids=torch.arange(k, k + n)[None].expand(rows, -1))
    keep = torch.cat([torch.ones(rows, k), mask.float()], 1)[:, None, None, :]
    for layer, (keys, values) in zip(bert.encoder.layer, prefix):
        attention = layer.attention.self
        heads = lambda x: x.view(rows, n, -1, attention.attention_head_size).transpose(1, 2)  # noqa: E731
        q = heads(attention.query(h))
        kk = torch.cat([keys.expand(rows, -1, -1, -1), heads(attention.key(h))], 2)
        vv = torch.cat([values.expand(rows, -1, -1, -1), heads(attention.value(h))], 2)
        scores = q @ kk.transpose(-1, -2) / attention.attention_head_size ** 0.5 + (1 - keep) * -1e9
        context = (scores.softmax(-1) @ vv).transpose(1, 2).reshape(rows, n, -1)
        a = layer.attention.output(context, h)
        h = layer.output(layer.intermediate(a), a)
    if pooling == "cls":
        return bert.pooler(h)
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_prefix_equals_bert_written_out_with_the_prefix(tiny_bert, tokenizer, pooling):
    model = _prefix_model(tiny_bert, tokenizer, task_type="SEQ_CLS", pooling=pooling)
    for side in ("left", "right"):
        ids, mask = _batch(side)
        with torch.no_grad():
            got = model(ids, mask).logits
            aligned = [torch.tensor([row + [0] * (ids.shape[1] - len(row))]) for row in ROWS]
            want = torch.cat([model.head_logits(_bert_by_hand(tiny_bert.bert, model.prompt.key_values(), row,
                                                              (row != 0).long(), pooling))
                              if pooling == "mean" else
                              tiny_bert.classifier(_bert_by_hand(tiny_bert.bert, model.prompt.key_values(), row,
                                                                 (row != 0).long(), pooling))
                              for row in aligned])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        before = model(ids, mask).logits
        model.prompt.weight.mul_(2)
        assert not torch.allclose(model(ids, mask).logits, before)  # the prefix is read


def _t5_encoder_by_hand(encoder, prefix: list[tuple[torch.Tensor, torch.Tensor]], ids, mask) -> torch.Tensor:
    """T5's encoder written out block by block, each self-attention's keys/values preceded by the prefix's and its
    relative position bias counting the text's tokens from k."""
    k, (rows, n) = prefix[0][0].shape[2], ids.shape
    h = encoder.embed_tokens(ids)
    keep = torch.cat([torch.ones(rows, k), mask.float()], 1)[:, None, None, :]
    bias = encoder.block[0].layer[0].SelfAttention.compute_bias(n, k + n, past_seen_tokens=k) + (1 - keep) * -1e9
    for block, (keys, values) in zip(encoder.block, prefix):
        attention = block.layer[0].SelfAttention
        heads = lambda x: x.view(rows, n, -1, attention.key_value_proj_dim).transpose(1, 2)  # noqa: E731
        x = block.layer[0].layer_norm(h)
        kk = torch.cat([keys.expand(rows, -1, -1, -1), heads(attention.k(x))], 2)
        vv = torch.cat([values.expand(rows, -1, -1, -1), heads(attention.v(x))], 2)
        scores = heads(attention.q(x)) @ kk.transpose(-1, -2) + bias  # T5 does not scale its scores
        h = h + attention.o((scores.softmax(-1) @ vv).transpose(1, 2).reshape(rows, n, -1))
        h = h + block.layer[1].DenseReluDense(block.layer[1].layer_norm(h))
    return encoder.final_layer_norm(h)


def test_t5_prefix_equals_its_encoder_written_out_with_the_prefix(tiny_t5, tokenizer):
    model = _prefix_model(tiny_t5, tokenizer, task_type="SEQ_2_SEQ_LM")
    labels = torch.tensor([[2204, 102]] * len(ROWS))
    for side in ("left", "right"):
        ids, mask = _batch(side)
        with torch.no_grad():
            got = model.encode(ids, mask)[0].last_hidden_state
            loss = model(ids, mask, labels=labels).loss
            states, want_loss = [], []
            for i, row in enumerate(ROWS):
                alone = _t5_encoder_by_hand(tiny_t5.get_encoder(), model.prompt.key_values(), torch.tensor([row]),
                                            torch.ones(1, len(row)))
                torch.testing.assert_close(got[i, :len(row)], alone[0], rtol=1e-5, atol=1e-5)  # pads moved right
                states.append(alone)
            padded = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, ids.shape[1] - s.shape[1])) for s in states])
            aligned_mask = torch.tensor([[1] * len(r) + [0] * (ids.shape[1] - len(r)) for r in ROWS])
            want = tiny_t5(encoder_outputs=(padded,), attention_mask=aligned_mask, labels=labels).loss
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


# -- prefix tuning: against peft ---------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_logits_equal_peft_prefix_tuning(tiny_llama, tokenizer, projection):
    model = _prefix_model(tiny_llama, tokenizer, k=4, prefix_projection=projection, encoder_hidden_size=16)
    peft = get_peft_model(tiny_llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                         prefix_projection=projection, encoder_hidden_size=16))
    encoder = peft.prompt_encoder["default"]
    weights = model.prompt.reparam.state_dict() if projection else {"embedding.weight": model.prompt.weight}
    encoder.load_state_dict(weights)
    ids = torch.tensor([ROWS[0], ROWS[0][::-1]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = peft(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model(ids, mask).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.tail_logits(ids, mask, ids.shape[1]), want, rtol=1e-5, atol=1e-5)


# -- save, load, train -------------------------------------------------------------------------------------------
def test_prefix_save_load_is_bit_identical_and_folds_the_projection(tiny_llama, tokenizer, tmp_path):
    model = _prefix_model(tiny_llama, tokenizer, prefix_projection=True)
    ids, mask = _batch("left")
    with torch.no_grad():
        want = model.tail_logits(ids, mask, 2)
    model.save_pretrained(tmp_path)
    layout = kv_layout(tiny_llama.config)
    stored = load_file(str(tmp_path / "prompt.safetensors"))
    assert set(stored) == {PREFIX_KEY} and stored[PREFIX_KEY].shape == (3, layout.width)
    loaded = PromptModel.from_pretrained(tiny_llama, tmp_path)
    assert isinstance(loaded, PrefixDecoderModel) and loaded.prompt.reparam is None
    with torch.no_grad():
        assert torch.equal(loaded.tail_logits(ids, mask, 2), want)
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert torch.equal(load_file(str(again / "prompt.safetensors"))[PREFIX_KEY], stored[PREFIX_KEY])


def test_a_checkpoint_of_one_method_is_refused_by_another(tiny_llama, tokenizer, tmp_path):
    prefix = _prefix_model(tiny_llama, tokenizer)
    prompt = get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=3, init="vocab"), tokenizer)
    with pytest.raises(SoftpromptError, match="keys/values at every layer .method prefix."):
        prompt.load_tensors(prefix.state_tensors())
    with pytest.raises(SoftpromptError, match="input vectors .method prompt or ptuning."):
        prefix.load_tensors(prompt.state_tensors())


@pytest.mark.parametrize("options", [{"method": "prefix"}, {"method": "prefix", "prefix_projection": True},
                                     {"method": "ptuning"}, {"method": "ptuning",
                                                             "encoder_reparameterization_type": "LSTM"}])
def test_training_moves_only_the_methods_parameters(tiny_llama, tokenizer, options):
    model = get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=3, init="vocab", **options), tokenizer)
    frozen = {name: p.detach().clone() for name, p in tiny_llama.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.prompt.named_parameters()}
    trained = model.trainable_parameters()
    assert {id(p) for p in trained} == {id(p) for p in model.prompt.parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    ids, mask = _batch("right")
    labels = torch.where((mask.cumsum(1) > 1) & (mask == 1), ids, -100)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model.training_loss(ids, mask, labels).backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[name]) for name, p in tiny_llama.named_parameters())
    moved = {name for name, p in model.prompt.named_parameters() if not torch.equal(p, before[name])}
    reparameterised = model.prompt.reparam is not None
    assert moved and ("weight" in moved) != (reparameterised and options["method"] == "prefix")


# -- config, CLI and refusals ------------------------------------------------------------------------------------
def test_method_is_decided_recorded_and_refused_where_it_cannot_run(tiny_dirs, tiny_bert, tokenizer):
    llama = describe_model(tiny_dirs["llama"])
    spec = resolve(TrainConfig(model=tiny_dirs["llama"]), llama, get_task("sst2"))
    assert spec.method == "prompt" and "docs/recipe.md#defaults" in spec.decided["method"]
    spec = resolve(TrainConfig(model=tiny_dirs["llama"], method="prefix", prefix_projection=True), llama,
                   get_task("sst2"))
    assert spec.method == "prefix" and spec.prompt.prefix_projection and spec.residual_reparam == 0
    assert spec.lr == PREFIX_LR and "prefix" in spec.decided["lr"]  # a decoder's prefix: 1e-2 beat 3e-2
    ptuning = resolve(TrainConfig(model=tiny_dirs["llama"], method="ptuning"), llama, get_task("sst2"))
    assert ptuning.lr == PTUNING_LR and "P-tuning" in ptuning.decided["lr"]  # its encoder collapsed at 3e-2
    assert resolve(TrainConfig(method="ptuning", lr=0.1), llama, get_task("sst2")).lr == pytest.approx(0.1)
    bert = describe_model(tiny_dirs["bert"])
    heads = [resolve(TrainConfig(model=tiny_dirs["bert"], method=m), bert, get_task("sst2"))
             for m in ("prompt", "ptuning")]
    assert heads[1].lr == PTUNING_LR and heads[1].head_lr == heads[0].head_lr == heads[0].lr  # the head keeps its rate
    assert resolve(TrainConfig(model=tiny_dirs["bert"], method="prefix"), bert, get_task("sst2")).lr == \
        pytest.approx(3e-2)  # an encoder's prefix met its targets at the prompt's rate
    assert PromptTuningConfig.from_dict(spec.prompt.to_dict()) == spec.prompt
    old = {k: v for k, v in spec.prompt.to_dict().items() if k not in ("method", "prefix_projection")}
    assert PromptTuningConfig.from_dict(old).method == "prompt"  # a checkpoint from before methods
    bart = BartForConditionalGeneration(BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1,
                                                   decoder_layers=1, encoder_attention_heads=2,
                                                   decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16))
    with pytest.raises(SoftpromptError, match="implemented for T5-style encoders so far, not BartFor"):
        get_prompt_model(bart, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", method="prefix"), tokenizer)
    with pytest.raises(SoftpromptError, match="leaves no room for input"):
        resolve(TrainConfig(model=tiny_dirs["llama"], method="prefix", prompt_length=256), llama, get_task("sst2"))
    with pytest.raises(SoftpromptError, match="leaves no room for input"):
        get_prompt_model(tiny_bert, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=128), tokenizer)
    with pytest.raises(SoftpromptError, match="--residual-reparam"):
        resolve(TrainConfig(model=tiny_dirs["llama"], method="ptuning", residual_reparam=8), llama, get_task("sst2"))
    with pytest.raises(SoftpromptError, match="--method must be one of"):
        TrainConfig(method="lora")
    with pytest.raises(SoftpromptError, match="add --method prefix"):
        resolve(TrainConfig(model=tiny_dirs["llama"], prefix_projection=True), llama, get_task("sst2"))
    with pytest.raises(SoftpromptError, match="add --method ptuning"):
        resolve(TrainConfig(model=tiny_dirs["llama"], encoder_reparameterization_type="LSTM"), llama,
                get_task("sst2"))


def test_a_prefix_starts_from_another_prefix_and_a_prompt_run_refuses_one(tiny_llama, tokenizer, tmp_path):
    source = _prefix_model(tiny_llama, tokenizer)
    source.save_pretrained(tmp_path / "prefix")
    config = PromptTuningConfig(num_virtual_tokens=3, method="prefix", init="file", init_file=str(tmp_path / "prefix"))
    assert torch.equal(get_prompt_model(tiny_llama, config, tokenizer).prompt.weight, source.prompt.weight)
    with pytest.raises(SoftpromptError,
                       match="holds keys/values at every layer .method prefix.; start a run of the same method"):
        get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=3, init="file",
                                                        init_file=str(tmp_path / "prefix")), tokenizer)
    longer = PromptTuningConfig(num_virtual_tokens=5, method="prefix", init="file", init_file=str(tmp_path / "prefix"))
    with pytest.raises(SoftpromptError, match="the same prefix length"):
        get_prompt_model(tiny_llama, longer, tokenizer)


@pytest.mark.parametrize("method,family,extra", [("prefix", "llama", []), ("ptuning", "llama", []),
                                                 ("prefix", "llama", ["--task-type", "SEQ_CLS"]),
                                                 ("prefix", "bert", []), ("prefix", "t5", [])])
def test_cli_trains_evaluates_and_predicts_with_a_method(method, family, extra, tiny_dirs, tiny_csv, tmp_path,
                                                         capsys):
    out_dir = tmp_path / "run"
    code = main(["train", *extra, "--method", method, "--max-steps", "2", "--eval-every", "2", "--batch-size", "8",
                 "--prompt-length", "3", "--no-progress", "--max-length", "24", "--model", tiny_dirs[family],
                 "--data", tiny_csv, "--output", str(out_dir),
                 *(["--prefix-projection"] if method == "prefix" else ["--encoder-reparameterization-type", "LSTM"])])
    out, err = capsys.readouterr()
    assert code == 0, err
    meta = json.loads((out_dir / "best" / "softprompt.json").read_text())
    assert meta["prompt"]["method"] == method
    assert main(["eval", str(out_dir / "best"), "--split", "dev"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1
    assert main(["predict", str(out_dir / "best"), "the film was good"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] in ("negative", "positive")
    assert main(["train", "--resume", str(out_dir), "--max-steps", "3", "--no-progress"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", str(out_dir / "best")]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert ("keys" in shown[1]) == (method == "prefix") and len(shown) == (3 if method == "prefix" else 4)

    assert main(["report", str(out_dir), "--output", str(tmp_path / "report.html")]) == 0
    assert ("a prefix</h3>" in (tmp_path / "report.html").read_text()) == (method == "prefix")
    capsys.readouterr()

    if method == "prefix" and family != "llama":  # peft's prefix tuning differs there, or does not run
        assert main(["export", str(out_dir / "best"), str(tmp_path / "peft")]) == 2
        assert "only decoder prefixes export" in capsys.readouterr().err

    texts = ["the film was good", "the film was bad number 3"]
    alone = PromptedTask.from_pretrained(out_dir / "best").predict(texts)
    served = MultiTaskModel.from_pretrained({"films": str(out_dir / "best")}).predict([("films", t) for t in texts])
    for one, many in zip(alone, served):
        assert one["label"] == many["label"]
        assert one["scores"] == pytest.approx(many["scores"], abs=1e-5)


def test_prefix_exports_as_a_peft_adapter_with_peft_logits(tiny_dirs, tokenizer, tmp_path):
    ours = _prefix_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval(), tokenizer)
    ours.save_pretrained(tmp_path / "ours")
    out, note = export_peft(tmp_path / "ours", tmp_path / "peft")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval(), out).eval()
    ids = torch.tensor([ROWS[0], ROWS[0][::-1]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, torch.ones_like(ids)).logits, theirs(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    back = PromptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), out)
    assert torch.equal(back.prompt.weight, ours.prompt.weight)


@pytest.mark.parametrize("config", [
    PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type="LSTM"),
    PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16),
], ids=["ptuning-mlp", "ptuning-lstm", "prefix-projection"])
def test_adapters_trained_in_peft_load_with_peft_logits(config, tiny_dirs, tmp_path):
    """peft saves what its prompt encoder produces: the plain vectors or keys/values of our checkpoints."""
    torch.manual_seed(3)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config)
    _randomise(theirs.prompt_encoder)
    theirs.save_pretrained(tmp_path)
    theirs.eval()
    ours = PromptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), tmp_path).eval()
    assert ours.config.method == ("prefix" if isinstance(config, PrefixTuningConfig) else "ptuning")
    ids = torch.tensor([ROWS[0], ROWS[0][::-1]])
    with torch.no_grad():
        want = theirs(input_ids=ids).logits[:, -ids.shape[1]:]  # P-tuning's also cover the virtual tokens
        torch.testing.assert_close(ours(ids, torch.ones_like(ids)).logits, want, rtol=1e-5, atol=1e-5)


def test_prefix_on_bf16_frozen_weights_stays_near_fp32(tiny_llama, tokenizer):
    model = _prefix_model(tiny_llama, tokenizer)
    ids, mask = _batch("left")
    with torch.no_grad():
        want = model.tail_logits(ids, mask, 2)
        model.freeze_in(torch.bfloat16)
        got = model.tail_logits(ids, mask, 2)
    assert model.prompt.weight.dtype == torch.float32 and got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("options", [{"method": "ptuning"}, {"method": "prefix", "prefix_projection": True}])
def test_transformers_trainer_folds_the_method_for_the_best_checkpoint(tiny_llama, tokenizer, tmp_path, options):
    model = get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=3, init="vocab", **options), tokenizer)
    rows = [tokenizer("the film was good positive")["input_ids"]] * 8
    data = [{"input_ids": r, "labels": [-100] + r[1:]} for r in rows]

    def collate(batch):
        return {key: torch.tensor([b[key] for b in batch]) for key in ("input_ids", "labels")}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=0.1,
                             eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
                             save_only_model=True, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = PromptTrainer(model=model, args=args, data_collator=collate, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert model.prompt.reparam is None
    best = load_tensors(trainer.state.best_model_checkpoint)
    assert all(torch.equal(value, model.state_tensors()[name]) for name, value in best.items())
    again = get_prompt_model(tiny_llama, PromptTuningConfig(num_virtual_tokens=3, init="vocab", **options), tokenizer)
    with pytest.raises(SoftpromptError, match="softprompt train --resume"):
        PromptTrainer(model=again, args=args, data_collator=collate, train_dataset=data, eval_dataset=data).train(
            resume_from_checkpoint=trainer.state.best_model_checkpoint)
