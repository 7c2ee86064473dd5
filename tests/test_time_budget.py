"""--max-time is the time a user waits: training and dev evaluation together end within it, evaluations are paced
to about a tenth of it, and the test scoring after it is announced with its time before training starts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from softprompt import PromptedTask, TrainConfig
from softprompt.spec import EVAL_SHARE
from softprompt.training import prepare

PER_ROW = 0.01  # seconds each scored row is made to take, so that one evaluation of 8 dev rows costs 0.08 s


def test_a_time_budget_bounds_training_and_paced_evaluation(tiny_dirs, tiny_csv, tmp_path, monkeypatch):
    scores = PromptedTask.scores

    def slow_scores(self, examples, batch_size=32):
        time.sleep(PER_ROW * len(examples))
        return scores(self, examples, batch_size)

    monkeypatch.setattr(PromptedTask, "scores", slow_scores)
    budget, lines = 4.0, []
    cfg = TrainConfig(model=tiny_dirs["llama"], data=tiny_csv, max_time=budget, eval_every=1, batch_size=8,
                      progress=False, output=str(tmp_path / "run"))
    trainer = prepare(cfg, log=lines.append)
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    test_seconds = PER_ROW * len(trainer.splits.test)
    one_eval = PER_ROW * len(trainer.splits.dev)

    announced = [line for line in lines if line.startswith("time budget:")]
    assert len(announced) == 1 and f"the test split ({len(trainer.splits.test)} rows) is scored" in announced[0]
    assert wall <= budget + test_seconds + 0.5, (wall, lines)
    assert result.seconds <= budget + 0.2
    # every step would evaluate without pacing (--eval-every 1); paced, evaluation keeps to its share of the budget,
    # plus the last one, which the budget holds back for
    assert result.eval_seconds <= EVAL_SHARE * budget + one_eval + 0.1, result
    evaluations = [r for r in map(json.loads, Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                   if "dev_accuracy" in r]
    assert 2 <= len(evaluations) < result.step / 2, (lines, evaluations, result)
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["eval_seconds"] == round(result.eval_seconds, 1) and summary["train_seconds"] <= budget + 0.2


def test_a_step_budget_evaluates_every_eval_every_steps(tiny_dirs, tiny_csv, tmp_path):
    cfg = TrainConfig(model=tiny_dirs["llama"], data=tiny_csv, max_steps=6, eval_every=2, batch_size=8,
                      progress=False, output=str(tmp_path / "run"))
    lines: list[str] = []
    prepare(cfg, log=lines.append).train()
    steps = [r["step"] for r in map(json.loads, Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "dev_accuracy" in r]
    assert steps == [2, 4, 6] and not any(line.startswith("time budget:") for line in lines)
