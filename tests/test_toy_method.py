"""A new prompt method is its own folder and one registration: this file alone adds one (input vectors, each
through a trained gain while training, folded at save) and trains, saves, loads, serves and exports it with no
other change to softprompt."""

from __future__ import annotations

import json

import httpx
import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from softprompt import MultiTaskModel, PromptedTask
from softprompt.cli import main
from softprompt.methods import INPUT_VECTORS, Method, method_names, register
from softprompt.methods.prompt.method import prompt_tuning_adapter
from softprompt.methods.prompt.model import PROMPT_KEY
from softprompt.serve import ServeOptions, create_app

from .test_serve import Server


class Gain(nn.Module):
    """Each virtual token times a gain of its own, trained with it: a reparameterisation as small as it gets."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((num_tokens, 1), 2.0))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gain


def _through_gain(model, config) -> None:
    model.prompt.set_reparam(Gain(config.num_virtual_tokens))


GAINED = register(Method(name="gained", summary="input vectors through a trained gain each (a test's toy)",
                         contributes=INPUT_VECTORS, tensor_key=PROMPT_KEY, peft_type="PROMPT_TUNING",
                         reparameterise=_through_gain, lr=lambda family: 5e-2, lr_reason="the toy's own rate",
                         peft_config=prompt_tuning_adapter))
TEXTS = ["the film was good", "the film was bad number 3", "an awful, boring mess"]


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    rows = ["text,label"] + [f"the film was {w} number {i},{w}" for i in range(40) for w in ("good", "bad")]
    (root / "films.csv").write_text("\n".join(rows))
    code = main(["train", "--model", tiny_dirs["llama"], "--data", str(root / "films.csv"), "--method", "gained",
                 "--task-type", "CAUSAL_LM", "--prompt-length", "3", "--max-steps", "4", "--eval-every", "2",
                 "--batch-size", "8", "--max-length", "24", "--no-progress", "--output", str(root / "run")])
    assert code == 0
    return root


def test_the_method_is_registered_and_chosen(trained):
    assert "gained" in method_names()
    spec = json.loads((trained / "run" / "best" / "softprompt.json").read_text())
    assert spec["prompt"]["method"] == "gained" and spec["spec"]["lr"] == 5e-2
    assert "toy" in spec["spec"]["decided"]["lr"]


def test_it_trains_through_its_gain_and_saves_the_folded_vectors(trained):
    run = PromptedTask.from_pretrained(trained / "run" / "best")
    assert run.model.prompt.reparam is None  # folded: a checkpoint holds the vectors the model sees
    state = load_file(str(trained / "run" / "last" / "trainer_state.safetensors"))
    gain = state["prompt_module.reparam.gain"]
    assert not torch.equal(gain, torch.full_like(gain, 2.0))  # the gain learned
    weight = state["prompt_module.weight"]
    saved = load_file(str(trained / "run" / "last" / "prompt.safetensors"))[PROMPT_KEY]
    torch.testing.assert_close(saved, weight * gain)


def test_it_loads_serves_and_exports(trained, tiny_dirs, tmp_path):
    best = trained / "run" / "best"
    alone = PromptedTask.from_pretrained(best).predict(TEXTS)
    served = MultiTaskModel.from_pretrained({"films": str(best)}).predict([("films", t) for t in TEXTS])
    for a, b in zip(alone, served):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5) and a["label"] == b["label"]

    server = Server(create_app(MultiTaskModel.from_pretrained({"films": str(best)}), ServeOptions()))
    try:
        answer = httpx.post(f"{server.url}/v1/predict", json={"task": "films", "inputs": TEXTS}, timeout=60).json()
    finally:
        server.stop()
    for a, b in zip(alone, answer["results"]):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)

    assert main(["export", str(best), str(tmp_path / "peft")]) == 0
    ours = PromptedTask.from_pretrained(tmp_path / "peft")  # the export reads back as the toy method
    assert ours.spec.method == "gained"
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval(),
                                            str(tmp_path / "peft")).eval()
    ids = ours.encoder.tokenizer(["the film was good"], return_tensors="pt")
    with torch.no_grad():
        want = ours.model(ids["input_ids"], ids["attention_mask"]).logits
        got = theirs(**ids).logits[:, ours.model.prompt.num_tokens:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
