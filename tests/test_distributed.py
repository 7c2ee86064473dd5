"""Two CPU processes through `accelerate launch` (gloo): the ranks hold the same prompt after every step, the run
equals one process with the same global batch, only the main rank writes, and --max-time stops all ranks alike;
with --fsdp (or accelerate's FSDP config) each rank holds half of every layer and the run still equals one process."""

from __future__ import annotations

import pytest

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from softprompt.pipeline import PromptedTask
from softprompt.spec import TrainConfig
from softprompt.training import load_splits, train
from tests.ddp_worker import run

pytestmark = pytest.mark.slow  # several processes under a launcher: the slow tier

WORKER = Path(__file__).with_name("ddp_worker.py")
# Tolerance against one process: the same rows and the same mean loss, but each rank's rows are padded and packed
# apart, so sums run in another order (fp32 rounding): measured 7e-8 after four AdamW steps.
TOLERANCE = 1e-6


def _launch(args: list[str], timeout: int = 300, use_fsdp: bool = False) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp" if use_fsdp else "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_hold_one_prompt_and_equal_one_process(tiny_dirs, tiny_csv, tmp_path):
    options = {"max_steps": 4}
    _launch([str(WORKER), "loop", tiny_dirs["llama"], tiny_csv, str(tmp_path / "ddp"), str(tmp_path / "rec2"),
             json.dumps(options)])
    for step in range(1, 5):
        ranks = [load_file(str(tmp_path / "rec2" / f"rank{r}-step{step}.st"))["prompt"] for r in (0, 1)]
        assert torch.equal(ranks[0], ranks[1]), f"ranks differ after step {step}"
    results = [json.loads((tmp_path / "rec2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]  # the gathered dev scores give every rank the same metrics

    run(tiny_dirs["llama"], tiny_csv, str(tmp_path / "one"), str(tmp_path / "rec1"), **options)
    for step in range(1, 5):
        one = load_file(str(tmp_path / "rec1" / f"rank0-step{step}.st"))["prompt"]
        two = load_file(str(tmp_path / "rec2" / f"rank0-step{step}.st"))["prompt"]
        torch.testing.assert_close(two, one, rtol=0, atol=TOLERANCE)
    one = json.loads((tmp_path / "rec1" / "rank0.json").read_text())
    assert one["steps"] == results[0]["steps"] and abs(one["dev"]["accuracy"] - results[0]["dev"]["accuracy"]) < 1e-9

    logged = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # written once, by the main rank


def test_cli_under_accelerate_and_max_time_agreed(tiny_dirs, tiny_csv, tmp_path):
    done = _launch(["-m", "softprompt", "train", "--model", tiny_dirs["llama"], "--data", tiny_csv, "--output",
                    str(tmp_path / "cli"), "--max-time", "3", "--batch-size", "8", "--prompt-length", "3",
                    "--max-length", "24", "--eval-every", "1000", "--no-progress"])
    assert done.stdout.count("checkpoint: ") == 1 and done.stdout.count(" train / ") == 1  # the main rank reports
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    logged = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == list(range(1, results["steps"] + 1)) and results["steps"] >= 1
    assert (tmp_path / "cli" / "best" / "softprompt.json").is_file()


def test_prompt_trainer_under_accelerate_launch_runs_ddp(tiny_dirs, tiny_csv, tmp_path):
    _launch([str(WORKER), "hf", tiny_dirs["llama"], tiny_csv, str(tmp_path / "run"), str(tmp_path / "rec"),
             json.dumps({"max_steps": 3})])
    ranks = [safe_open(str(tmp_path / "rec" / f"rank{r}-hf.st"), "pt") for r in (0, 1)]
    assert [f.metadata()["wrapper"] for f in ranks] == ["DistributedDataParallel"] * 2
    prompts = [f.get_tensor("prompt") for f in ranks]
    assert torch.equal(prompts[0], prompts[1])
    saved = load_file(str(tmp_path / "run" / "hf" / "checkpoint-3" / "prompt.safetensors"))["prompt"]
    assert torch.equal(saved, prompts[0])  # the main rank's softprompt checkpoint


def test_fsdp_holds_half_of_each_layer_and_equals_one_process(tiny_dirs, tiny_csv, tmp_path):
    # 17 training rows in batches of 8 start with a batch of 1 (rank 1 has no row), and 7 dev rows in batches of
    # 3 give rank 0 two batches and rank 1 one: ranks that share the layers still have to run the same forwards
    # label words here (a user's file defaults to a head, which the other tests train)
    options = {"max_steps": 4, "max_train_examples": 17, "max_eval_examples": 7, "eval_batch_size": 3,
               "task_type": "CAUSAL_LM"}
    _launch([str(WORKER), "loop", tiny_dirs["llama"], tiny_csv, str(tmp_path / "fsdp"), str(tmp_path / "rec2"),
             json.dumps({**options, "fsdp": True})])
    results = [json.loads((tmp_path / "rec2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for held in results:
        assert 2 * held["query_held"] == held["query_full"]  # the layer's weight is split in two
        assert held["held"] < held["full"]
    run(tiny_dirs["llama"], tiny_csv, str(tmp_path / "one"), str(tmp_path / "rec1"), **options)
    for step in range(1, 5):
        ranks = [load_file(str(tmp_path / "rec2" / f"rank{r}-step{step}.st"))["prompt"] for r in (0, 1)]
        assert torch.equal(ranks[0], ranks[1]), f"ranks differ after step {step}"
        one = load_file(str(tmp_path / "rec1" / f"rank0-step{step}.st"))["prompt"]
        torch.testing.assert_close(ranks[0], one, rtol=0, atol=TOLERANCE)
    one = json.loads((tmp_path / "rec1" / "rank0.json").read_text())
    assert results[0]["dev"] == results[1]["dev"] == one["dev"] and results[0]["test"] == one["test"]

    # rank 0's checkpoint is a plain one: one process reads it back and scores dev as the run did
    best = tmp_path / "fsdp" / "best"
    assert set(load_file(str(best / "prompt.safetensors"))) == {"prompt"}
    splits = load_splits(tiny_csv, None, 0, max_train_examples=17, max_eval_examples=7)
    assert PromptedTask.from_pretrained(best).evaluate(splits.dev) == results[0]["dev"]


def test_fsdp_from_accelerate_config_trains_a_prefix(tiny_dirs, tiny_csv, tmp_path):
    """`accelerate launch --use_fsdp` alone shards the backbone; the CLI scores the baselines first (under
    inference mode, before any training step), prefix tuning's keys/values run through the sharded layers, and
    the head (which the model file lacks) is set alike on every rank."""
    args = ["--model", tiny_dirs["llama"], "--data", tiny_csv, "--method", "prefix", "--max-steps", "2",
            "--batch-size", "8", "--prompt-length", "3", "--max-length", "24", "--eval-every", "1000"]
    done = _launch(["-m", "softprompt", "train", *args, "--output", str(tmp_path / "fsdp"), "--no-progress"],
                   use_fsdp=True)
    assert "FSDP: rank 0 of 2 holds" in done.stdout and "baseline untrained_prompt" in done.stdout
    one = train(TrainConfig(model=tiny_dirs["llama"], data=tiny_csv, method="prefix", max_steps=2, batch_size=8,
                            prompt_length=3, max_length=24, eval_every=1000, output=str(tmp_path / "one"),
                            progress=False), log=lambda _: None)
    two = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    assert two["dev"] == one.dev and two["test"] == one.test
    prefixes = [load_file(str(path / "best" / "prompt.safetensors")) for path in (tmp_path / "fsdp", tmp_path / "one")]
    assert set(prefixes[0]) == set(prefixes[1]) == {"prefix", "head.weight"}  # a user's file: a head by default
    for name in prefixes[0]:  # the head was new in every rank's load: rank 1's is not left unset for FSDP1
        torch.testing.assert_close(prefixes[0][name], prefixes[1][name], rtol=0, atol=TOLERANCE)
