"""Training on real data learns: the embedded Rotten Tomatoes data and the embedded MiniLM encoder."""

from __future__ import annotations

import pytest

from softprompt import TrainConfig, train

pytestmark = pytest.mark.slow  # real-model learning: the slow tier


def test_training_on_real_data_beats_the_untrained_prompt(tmp_path):
    cfg = TrainConfig(model="minilm-l6", data="rotten_tomatoes", max_steps=150, eval_every=75, batch_size=16,
                      lr=3e-2, max_length=64, max_eval_examples=400, baselines=True, output=str(tmp_path),
                      progress=False)
    result = train(cfg, log=lambda _: None)
    untrained = result.baselines["untrained_prompt"]["accuracy"]
    assert result.test["accuracy"] >= untrained + 0.05
    assert result.test["accuracy"] >= result.baselines["majority"]["accuracy"] + 0.03
    # a head trains through the residual MLP by default; the checkpoint keeps only the folded prompt and head
    from safetensors.torch import load_file

    stored = sum(t.numel() for t in load_file(str(result.best_checkpoint / "prompt.safetensors")).values())
    assert stored == 8 * 384 + (384 * 2 + 2)
    assert result.trained_parameters == stored + (384 * 64 + 64) + (64 * 384 + 384) + 2 * 384
