"""Tiny random-weight models of each family, built from configs, sharing the MiniLM WordPiece tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from softprompt.assets import minilm_path

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


@pytest.fixture(autouse=True)
def fp32_by_default(monkeypatch):
    """Timed decoder runs with label words default to bf16 where the probe finds it fast; tests pin fp32 so their
    numbers do not depend on the CPU running them (test_bf16.py covers the choice itself)."""
    monkeypatch.setattr("softprompt.spec.fast_bf16", lambda: False)


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture
def tiny_bert(tokenizer):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def _llama_config(tokenizer, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, **extra)


@pytest.fixture
def tiny_llama(tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config(tokenizer)).eval()


@pytest.fixture
def tiny_llama_cls(tokenizer):
    torch.manual_seed(0)
    return LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=3)).eval()


@pytest.fixture
def tiny_gpt2(tokenizer):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_t5(tokenizer):
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.sep_token_id)
    return T5ForConditionalGeneration(cfg).eval()


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dirs(tokenizer, tmp_path_factory):
    """Tiny random models saved as local folders, so they load by path like any hub model."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(_llama_config(tokenizer))
    llama48_config = _llama_config(tokenizer)
    llama48_config.hidden_size = 48
    llama48 = LlamaForCausalLM(llama48_config)
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=128))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                             decoder_start_token_id=tokenizer.pad_token_id,
                                             eos_token_id=tokenizer.sep_token_id))
    return {"llama": _save(llama, tokenizer, root / "llama"), "llama48": _save(llama48, tokenizer, root / "llama48"),
            "bert": _save(bert, tokenizer, root / "bert"), "t5": _save(t5, tokenizer, root / "t5")}


def labelled_csv(path: Path, groups: list[tuple[str, str, int]]) -> str:
    """A user's CSV: for each (text, label, n), n rows of that text numbered apart."""
    rows = ["text,label"] + [f"{text} number {i},{label}" for text, label, n in groups for i in range(n)]
    path.write_text("\n".join(rows))
    return str(path)


@pytest.fixture
def tiny_csv(tmp_path) -> str:
    """80 labelled rows whose label is readable off one word, so even tiny models can move."""
    words = {"good": "positive", "bad": "negative"}
    rows = ["text,label"] + [f"the film was {w} number {i},{words[w]}" for i in range(40) for w in words]
    path = tmp_path / "tiny.csv"
    path.write_text("\n".join(rows))
    return str(path)
