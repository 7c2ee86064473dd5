"""peft prompt-tuning adapters in and out, checked against peft itself: the same logits where peft and softprompt
lay the prompt out the same way, the same tensors where they do not, and bit-identical round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from softprompt import PromptedTask, PromptModel, PromptTuningConfig, get_prompt_model, to_examples
from softprompt.checkpoint import read_checkpoint
from softprompt.cli import main
from softprompt.errors import SoftpromptError
from softprompt.peft_interop import export_peft, import_peft

peft = pytest.importorskip("peft")

TEXTS = ["the film was good", "a long and rather dull film about nothing", "bad"]
K = 4


def _batch(tokenizer, side: str):
    tokenizer.padding_side = side
    try:
        return tokenizer(TEXTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"


def _exported(path, auto_class, task_type, tmp_path, tokenizer):
    """A random-init softprompt prompt (and head) on the model at `path`, saved, exported, and loaded in peft."""
    torch.manual_seed(1)
    ours = get_prompt_model(auto_class.from_pretrained(path).eval(),
                            PromptTuningConfig(num_virtual_tokens=K, task_type=task_type), tokenizer)
    if ours.head is not None:
        torch.nn.init.normal_(ours.readout.weight)  # not the base model's own head: it must travel with the prompt
    ours.save_pretrained(tmp_path / "ours")
    out, note = export_peft(tmp_path / "ours", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(auto_class.from_pretrained(path).eval(), out).eval()
    return ours.eval(), theirs, note


def test_decoder_causal_lm_same_logits_as_peft(tiny_dirs, tokenizer, tmp_path):
    ours, theirs, note = _exported(tiny_dirs["llama"], AutoModelForCausalLM, "CAUSAL_LM", tmp_path, tokenizer)
    assert "right-padded" in note
    right, left = _batch(tokenizer, "right"), _batch(tokenizer, "left")
    with torch.no_grad():
        mine = ours(**right).logits
        assert torch.equal(ours(**left).logits[left.attention_mask.bool()], mine[right.attention_mask.bool()])
        # right padding: peft puts the prompt at positions 0..k-1 and the text after it, as softprompt does
        peft_right = theirs(**right).logits[:, K:]
        torch.testing.assert_close(peft_right[right.attention_mask.bool()], mine[right.attention_mask.bool()],
                                   rtol=1e-5, atol=1e-5)  # fp32 rounding: pads sit on the other side of the row
        # left padding: peft is right on the unpadded row only; a padded row's text is shifted by its padding
        peft_left = theirs(**left).logits[:, K:]
    full = left.attention_mask.all(1)
    assert full.sum() == 1
    torch.testing.assert_close(peft_left[full], mine[full], rtol=1e-5, atol=1e-5)
    padded = ~full
    assert not torch.allclose(peft_left[padded][left.attention_mask[padded].bool()],
                              mine[padded][right.attention_mask[padded].bool()], atol=1e-3)


def test_unpadded_decoder_rows_are_bit_identical(tiny_dirs, tokenizer, tmp_path):
    ours, theirs, _ = _exported(tiny_dirs["llama"], AutoModelForCausalLM, "CAUSAL_LM", tmp_path, tokenizer)
    ids = tokenizer(TEXTS[:1] * 2, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(theirs(**ids).logits[:, K:], ours(**ids).logits)


def test_decoder_head_comes_along(tiny_dirs, tokenizer, tmp_path):
    """SEQ_CLS on a decoder: peft's last-column pooling reads softprompt's last real token on unpadded rows."""
    ours, theirs, _ = _exported(tiny_dirs["llama"], AutoModelForSequenceClassification, "SEQ_CLS", tmp_path, tokenizer)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    ids = tokenizer(TEXTS[:1] * 2, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**ids).logits, ours(**ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours(**ids).logits, get_prompt_model(
            AutoModelForSequenceClassification.from_pretrained(tiny_dirs["llama"]).eval(),
            ours.config)(**ids).logits)  # the head is not the base model's


def test_seq2seq_same_logits_as_peft_with_padding(tiny_dirs, tokenizer, tmp_path):
    ours, theirs, _ = _exported(tiny_dirs["t5"], AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM", tmp_path, tokenizer)
    batch = _batch(tokenizer, "right")
    labels = tokenizer(["positive", "negative", "positive"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch, labels=labels).logits, ours(**batch, labels=labels).logits,
                                   rtol=1e-5, atol=1e-5)


def test_encoder_tensors_and_head_reach_peft_though_its_layout_differs(tiny_dirs, tokenizer, tmp_path):
    ours, theirs, note = _exported(tiny_dirs["bert"], AutoModelForSequenceClassification, "SEQ_CLS", tmp_path,
                                   tokenizer)
    assert "before [CLS]" in note
    assert torch.equal(theirs.get_prompt(1)[0], ours.prompt.weight)
    assert torch.equal(theirs.base_model.classifier.modules_to_save["default"].weight, ours.head.weight)
    batch = _batch(tokenizer, "right")
    with torch.no_grad():
        # what peft computes: the prompt before [CLS], softprompt's head on the first virtual token's pooled state
        embeds = ours.base.get_input_embeddings()(batch.input_ids)
        by_hand = ours.base(inputs_embeds=torch.cat([ours.prompt(3), embeds], 1),
                            attention_mask=torch.cat([torch.ones(3, K, dtype=torch.long), batch.attention_mask], 1))
        torch.testing.assert_close(theirs(**batch).logits, by_hand.logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(theirs(**batch).logits, ours(**batch).logits, atol=1e-3)


def test_trained_checkpoint_round_trip_is_bit_identical(tiny_dirs, tiny_csv, tmp_path, capsys):
    """A decoder head on a user's file, pooled by its last token as peft's model pools (the default there,
    last_mean, has no peft equivalent and is refused: test_refusals_are_one_line)."""
    args = ["train", "--max-steps", "2", "--batch-size", "8", "--prompt-length", "3", "--no-progress",
            "--max-length", "24", "--no-baselines", "--model", tiny_dirs["llama"], "--data", tiny_csv,
            "--pooling", "cls", "--output", tmp_path / "run"]
    assert main([str(a) for a in args]) == 0
    best = tmp_path / "run" / "best"
    assert main(["export", str(best), str(tmp_path / "peft"), "--format", "peft"]) == 0
    assert main(["import", str(tmp_path / "peft"), str(tmp_path / "back")]) == 0
    assert "peft adapter: " in capsys.readouterr().out
    before = load_file(str(best / "prompt.safetensors"))
    after = load_file(str(tmp_path / "back" / "prompt.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert read_checkpoint(best).spec == read_checkpoint(tmp_path / "back").spec
    examples = to_examples([{"text": t} for t in TEXTS], ("text",))
    scores = [PromptedTask.from_pretrained(p).scores(examples) for p in (best, tmp_path / "peft", tmp_path / "back")]
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])


def test_adapter_trained_in_peft_loads_imports_and_starts_a_prompt(tiny_dirs, tokenizer, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    torch.manual_seed(2)
    made = peft.get_peft_model(base, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=K, prompt_tuning_init="TEXT", prompt_tuning_init_text="a film",
        tokenizer_name_or_path=tiny_dirs["llama"]))
    with torch.no_grad():
        made.prompt_encoder["default"].embedding.weight.normal_()
    made.save_pretrained(tmp_path / "adapter")
    prompt = made.get_prompt(1)[0]
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval(),
                                            tmp_path / "adapter").eval()
    ours = PromptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval(),
                                       tmp_path / "adapter").eval()
    ids = tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(theirs(**ids).logits[:, K:], ours(**ids).logits)
    assert torch.equal(ours.prompt.weight, prompt)

    assert main(["import", str(tmp_path / "adapter"), str(tmp_path / "bare"), "--model", tiny_dirs["llama"]]) == 0
    assert torch.equal(load_file(str(tmp_path / "bare" / "prompt.safetensors"))["prompt"], prompt)
    assert read_checkpoint(tmp_path / "bare").family == "decoder"

    started = get_prompt_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), PromptTuningConfig(
        num_virtual_tokens=K, init="file", init_file=str(tmp_path / "adapter")))
    assert torch.equal(started.prompt.weight, prompt)


def test_refusals_are_one_line(tiny_dirs, tokenizer, tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert main(["import", str(tmp_path / "lora"), str(tmp_path / "x"), "--model", tiny_dirs["llama"]]) == 2
    assert "PROMPT_TUNING" in capsys.readouterr().err
    mean = get_prompt_model(AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert"]),
                            PromptTuningConfig(num_virtual_tokens=K, task_type="SEQ_CLS", pooling="mean"), tokenizer)
    mean.save_pretrained(tmp_path / "mean")
    assert main(["export", str(tmp_path / "mean"), str(tmp_path / "y")]) == 2
    assert "no peft equivalent" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["export", str(tmp_path / "mean"), str(tmp_path / "y"), "--format", "gguf"]) == 2
    capsys.readouterr()
    both = get_prompt_model(AutoModelForSequenceClassification.from_pretrained(tiny_dirs["llama"]),
                            PromptTuningConfig(num_virtual_tokens=K, task_type="SEQ_CLS", pooling="last_mean"),
                            tokenizer)
    both.save_pretrained(tmp_path / "both")
    assert main(["export", str(tmp_path / "both"), str(tmp_path / "y")]) == 2
    assert "'last_mean'" in capsys.readouterr().err and not (tmp_path / "y").exists()
    with pytest.raises(SoftpromptError, match="peft adapter with no task"):
        PromptedTask.from_pretrained(tmp_path / "lora")
    with pytest.raises(SoftpromptError, match="which base model"):
        import_peft(_no_base(tmp_path), tmp_path / "z")


def _no_base(tmp_path):
    folder = tmp_path / "nobase"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                                                            "num_virtual_tokens": K}))
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(K, 32)}, str(folder / "adapter_model.safetensors"))
    return folder


def test_an_export_trained_further_in_peft_loads_its_new_prompt(tiny_dirs, tokenizer, tmp_path):
    """peft rewrites the adapter files, not softprompt.json: the stale record is set aside, the new prompt loads."""
    ours, theirs, _ = _exported(tiny_dirs["llama"], AutoModelForCausalLM, "CAUSAL_LM", tmp_path, tokenizer)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.add_(1.0)
    theirs.save_pretrained(tmp_path / "peft")
    back = PromptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), tmp_path / "peft")
    assert torch.equal(back.prompt.weight, ours.prompt.weight + 1.0)
