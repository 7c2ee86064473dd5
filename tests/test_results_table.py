"""The GLUE table's rules (benchmarks/glue.py): a winner only from several seeds whose means differ by more than
both standard deviations, older-format rows giving way to newer ones of the same group, and both budgets' tables."""

from __future__ import annotations

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def glue():
    return load_benchmark("glue")


def row(method: str, accuracy: float, seed: int = 0, match: str = "time", budget: float = 900.0,
        fmt: int | None = 2, model: str = "smollm2-135m") -> dict:
    out = {"task": "sst2", "model": model, "method": method, "metrics": {"accuracy": accuracy}, "steps": 100,
           "seconds": budget, "params": 10, "stored": 10, "budget": budget, "date": "2026-12-05",
           "precision": "bf16", "batch_size": 16}
    if fmt is not None:  # rows before issue 33 carry no seed, budget kind or format
        out.update(seed=seed, match=match, format=fmt)
    return out


def test_a_winner_needs_seeds_and_a_gap_beyond_both_deviations(glue):
    ours = [row("softprompt prefix", a, s) for s, a in enumerate((0.90, 0.91, 0.92))]
    clear = [row("peft LoRA r=8 q,v", a, s) for s, a in enumerate((0.86, 0.87, 0.88))]
    close = [row("peft LoRA r=8 q,v", a, s) for s, a in enumerate((0.88, 0.91, 0.94))]
    assert glue.verdict("ours", "lora", ours, clear, "accuracy").startswith("ours beats lora by 4.00 points")
    assert glue.verdict("lora", "ours", clear, ours, "accuracy").startswith("ours beats lora")
    assert "no winner" in glue.verdict("ours", "lora", ours, close, "accuracy")  # gap 0.00, deviation 3 points
    assert "no claim, single runs" in glue.verdict("ours", "lora", ours[:1], clear, "accuracy")


def test_mean_and_deviation_over_seeds(glue):
    mean, sd = glue.spread([row("x", 0.90, 0), row("x", 0.92, 1)], "accuracy")
    assert mean == pytest.approx(0.91) and sd == pytest.approx(0.0141421, rel=1e-4)
    assert glue.spread([row("x", 0.90)], "accuracy")[1] is None


def test_newer_rows_replace_older_ones_of_their_group(glue):
    old = row("peft LoRA r=8 q,v", 0.5, fmt=None)  # fp32 peft, before issue 33: seed 0, time-matched
    assert glue.row_key(old) == ("sst2", "smollm2-135m", "peft LoRA r=8 q,v", "time", 900.0, 0)
    new = [row("peft LoRA r=8 q,v", 0.87, 1)]
    grouped = glue.groups([old, *new])
    assert list(grouped.values()) == [new]
    assert glue.groups([old]) == {glue.row_key(old)[:5]: [old]}  # alone, an old row still stands


def test_the_table_has_both_budgets_and_means(glue, tmp_path):
    rows = [row("softprompt prefix", a, s) for s, a in enumerate((0.90, 0.92))]
    rows += [row("peft LoRA r=8 q,v", a, s) for s, a in enumerate((0.85, 0.86))]
    rows += [row("softprompt", 0.80, 0, match="steps", budget=300.0)]
    glue.write_table(rows, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "## sst2, time-matched" in text and "## sst2, step-matched" in text
    assert "| smollm2-135m | softprompt prefix | 900 s | bf16 | 16 | 91.00 ± 1.41 | 0, 1 |" in text
    assert "| smollm2-135m | softprompt | 300 steps | bf16 | 16 | 80.00 | 0 |" in text
    assert "softprompt prefix beats peft LoRA r=8 q,v by 5.50 points of accuracy" in text
    assert "RESULT task=sst2 model=smollm2-135m metric=accuracy prefix=0.9100 peft_lora=0.8550 budget_s=900" in text
