"""Two CPU processes through `accelerate launch` (gloo): the ranks hold the same prompt after every step, the run
equals one process with the same global batch, only the main rank writes, and --max-time stops all ranks alike."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.ddp_worker import run

WORKER = Path(__file__).with_name("ddp_worker.py")
# Tolerance against one process: the same rows and the same mean loss, but each rank's rows are padded and packed
# apart, so sums run in another order (fp32 rounding): measured 7e-8 after four AdamW steps.
TOLERANCE = 1e-6


def _launch(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), *args]
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
