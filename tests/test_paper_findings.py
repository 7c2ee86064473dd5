"""docs/paper.md's verdicts (benchmarks/paper.py): a finding holds only where the gap it rests on exceeds the
five-seed spread, and the transfer table scores only texts no model trained on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from softprompt.data import Example

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def paper():
    return load_benchmark("paper")


def test_length_holds_only_when_one_token_is_clearly_worse_and_longer_adds_within_noise(paper):
    row = {1: 0.70, 5: 0.78, 20: 0.80, 100: 0.805, 150: 0.802}
    assert "Holds" in paper._length_finding("m", row, sd=0.01)
    assert "Does not hold" in paper._length_finding("m", {**row, 150: 0.85}, sd=0.01)  # 150 adds 5 points
    assert "Does not hold" in paper._length_finding("m", {**row, 1: 0.795}, sd=0.01)  # one token is level
    assert "one token is level with 20" in paper._length_finding("m", {**row, 1: 0.795}, sd=0.01)
    dip = paper._length_finding("m", {**row, 100: 0.72}, sd=0.01)  # a longer prompt far under 20 is named
    assert "Holds" in dip and "100 tokens, one run, falls 8.00 points under 20" in dip
    assert "falls" not in paper._length_finding("m", row, sd=0.01)


def test_the_length_and_init_tables_put_a_model_per_row_and_its_finding_under_every_table(paper, tmp_path):
    results = {"length": {"m": {1: 0.70, 5: 0.78, 20: 0.80, 100: 0.805, 150: 0.802}},
               "init": {"m": {"random": 0.70, "vocab": 0.75, "class_labels": 0.80, "text": 0.78}}}
    out = tmp_path / "paper.md"
    paper.write(out, results, SimpleNamespace(steps={"m": 500}), {"m": 0.01}, "python benchmarks/paper.py")
    text = out.read_text()
    assert "| model | 1 tokens | 5 tokens | 20 tokens | 100 tokens | 150 tokens |" in text
    assert "| m | 70.00 | 78.00 | 80.00 | 80.50 | 80.20 |" in text
    init_table = "| model | random | vocab | class_labels | text |\n|---|---|---|---|---|\n"
    assert init_table + "| m | 70.00 | 75.00 | 80.00 | 78.00 |" in text
    assert text.index("## Prompt length") < text.index("## Initialisation") < text.index("## What holds")
    assert text.split("## What holds")[1].count("\n- ") == 2


def test_init_needs_class_labels_ahead_of_random_beyond_the_spread(paper):
    row = {"random": 0.70, "vocab": 0.75, "class_labels": 0.80, "text": 0.78}
    assert "Holds" in paper._init_finding("m", row, sd=0.02)
    assert "class_labels 80.00 > text 78.00 > vocab 75.00 > random 70.00" in paper._init_finding("m", row, sd=0.02)
    assert "Does not hold" in paper._init_finding("m", {**row, "random": 0.79}, sd=0.02)


def test_ensemble_verdict_reads_the_vote_against_the_best_and_the_average(paper):
    members = [0.80, 0.82, 0.81, 0.79, 0.83]
    assert paper._ensemble_finding("m", {"members": members, "majority_vote": 0.84, "mean_probability": 0.835}) \
        .split(". ")[1].startswith("Holds:")
    assert "Holds in part" in paper._ensemble_finding("m", {"members": members, "majority_vote": 0.82,
                                                            "mean_probability": 0.825})
    assert "Does not hold" in paper._ensemble_finding("m", {"members": members, "majority_vote": 0.80,
                                                            "mean_probability": 0.805})


def scores(sst2: float, rotten: float) -> dict:
    return {"sst2 unseen": {"accuracy": sst2}, "rotten_tomatoes unseen": {"accuracy": rotten}}


def test_transfer_reads_the_shifts_cost_on_each_scored_set(paper):
    # trained on sst2 / rotten_tomatoes, scored on each set's unseen texts
    row = {"prompt:sst2": scores(0.85, 0.78), "prompt:rotten_tomatoes": scores(0.82, 0.84),
           "lora:sst2": scores(0.90, 0.72), "lora:rotten_tomatoes": scores(0.80, 0.88)}
    text = paper._transfer_finding("m", row, sd=0.01)
    assert "on SST-2 dev the shift costs prompt tuning 3.00 points and LoRA 10.00" in text
    assert "on Rotten Tomatoes test the shift costs prompt tuning 6.00 points and LoRA 16.00" in text
    assert "Holds:" in text and "ahead out of domain on 2 of 2 sets" in text
    level = {**row, "lora:sst2": scores(0.90, 0.815)}  # LoRA's cost on Rotten Tomatoes: 6.5, prompt's 6
    assert "Holds on one of the two sets" in paper._transfer_finding("m", level, sd=0.01)


def test_unseen_drops_texts_equal_in_letters_and_digits_to_a_trained_one(paper):
    trained = [Example({"sentence": "a gorgeous , moving film"}, 1), Example({"text": "Dull, dull, dull."}, 0)]
    rows = [Example({"sentence": "dull , dull , dull ."}, 0), Example({"sentence": "fine"}, 1),
            Example({"text": "A gorgeous, moving film!"}, 1)]
    assert paper.unseen(rows, trained) == [rows[1]]
