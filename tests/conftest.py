"""Tiny random-weight models of each family, built from configs, sharing the MiniLM WordPiece tokenizer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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


NO_GPU = "no CUDA device here: the GPU half of the device tests runs where one is (scripts/gpu_check.sh)"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                 reason=NO_GPU)])]
# how far a result on the device may be from the reference on the same device, per dtype: fp32 differs by summation
# order only (on a GPU its kernels pick other orders); bf16 rounds every product
TOLERANCE = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 1e-4, ("cpu", torch.bfloat16): 2e-2,
             ("cuda", torch.bfloat16): 2e-2}


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each exactness test that takes it runs on the CPU always and on a GPU where there is one."""
    return torch.device(request.param)


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
def bpe_tokenizer():
    """A byte-level BPE tokenizer that, as SmolLM2's, adds no special tokens: an empty text has no tokens at all
    (the WordPiece one always has [CLS] and [SEP]). Trained here in milliseconds on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["the film was good", "the film was bad", "a gorgeous, moving film", "positive negative entailment",
              "very good, very bad indeed, fine", "Sentence 1: Sentence 2: Review: Sentiment:"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")


@pytest.fixture(scope="session")
def tiny_dirs(tokenizer, bpe_tokenizer, tmp_path_factory):
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
    llama_bpe = LlamaForCausalLM(_llama_config(bpe_tokenizer))
    return {"llama": _save(llama, tokenizer, root / "llama"), "llama48": _save(llama48, tokenizer, root / "llama48"),
            "llama_bpe": _save(llama_bpe, bpe_tokenizer, root / "llama_bpe"),
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


def random_checkpoint(path: Path, model_dir: str, task, k: int, task_type: str, seed: int, pooling: str | None = None,
                      **settings) -> str:
    """A prompt (and head) of random values, saved as a training run would save it (`settings`: more TrainConfig
    fields, e.g. method or bf16): tests that compare paths need no learning."""
    from softprompt import PromptedTask, TrainConfig, describe_model, resolve

    info = describe_model(model_dir)
    spec = resolve(TrainConfig(model=model_dir, prompt_length=k, task_type=task_type, init="random", max_length=32,
                               seed=seed, pooling=pooling, **settings), info, task)
    prompted = PromptedTask.build(spec, info)
    torch.manual_seed(seed)
    with torch.no_grad():
        prompted.model.prompt.weight.add_(torch.randn_like(prompted.model.prompt.weight) * 0.3)
        if prompted.model.head is not None:
            for p in prompted.model.head.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return str(prompted.save_pretrained(path))


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (benchmarks/ is not a package), registered so its dataclasses resolve."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
