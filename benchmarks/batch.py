"""Batch prediction on Ray against one process: the same rows, the same two prompts, the same output.

    python benchmarks/batch.py                                           # SmolLM2-135M, 4000 rows, 2 cores, 3 rounds
    python benchmarks/batch.py --model /path/to/tiny-model --rows 40 --rounds 1   # does the script work?

Target: Ray with 2 actors on 2 cores within 15% of one `softprompt predict` process on the same rows, i.e.
`ray_vs_predict` (one process's seconds over Ray's: a throughput ratio) at 0.85 or more.

Two prompts of Rotten Tomatoes label words (tasks `short` and `long`: 8 and 20 virtual tokens started from sampled
vocabulary, seeds 0 and 1; untrained, since the work per row is what is measured), fp32, over the first `--rows`
Rotten Tomatoes texts (`load_data("rotten_tomatoes")`, train split first), the rows alternating between the tasks,
in one Parquet file. Each round runs both commands as subprocesses, pinned to the first `--cores` cores, in
alternating order, and times the whole command (model loading and Ray's start included: what a user waits for):

- one process: `softprompt predict short=... long=... --input rows.parquet --output one.jsonl`, torch using
  every core (OMP_NUM_THREADS=cores);
- Ray: the same with `--ray --concurrency N`: a local Ray, N actors of one thread each, each holding the model.

Both outputs are checked to agree row for row (labels equal, probabilities within 1e-5). Prints the commands, the
medians and `RESULT ray_vs_predict=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LENGTHS = {"short": 8, "long": 20}


def make_prompts(root: Path, model: str) -> dict[str, str]:
    """{task: checkpoint}: vocabulary-initialised prompts of Rotten Tomatoes label words on `model`."""
    from softprompt import PromptedTask, TrainConfig, describe_model, resolve
    from softprompt.tasks import get_task

    info, prompts = describe_model(model), {}
    for seed, (task, k) in enumerate(LENGTHS.items()):
        out = root / task
        if not (out / "softprompt.json").is_file():
            spec = resolve(TrainConfig(model=model, data="rotten_tomatoes", prompt_length=k, init="vocab", seed=seed,
                                       bf16=False), info, get_task("rotten_tomatoes"))
            PromptedTask.build(spec, info).save_pretrained(out)
        prompts[task] = str(out)
    return prompts


def write_rows(path: Path, count: int) -> None:
    """The first `count` Rotten Tomatoes texts (train, dev, test in turn), alternating tasks, as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from softprompt.data import load_data

    splits = load_data("rotten_tomatoes")
    texts = [e.fields["text"] for e in splits.train + splits.dev + splits.test][:count]
    tasks = list(LENGTHS)
    pq.write_table(pa.table({"id": list(range(len(texts))), "task": [tasks[i % 2] for i in range(len(texts))],
                             "text": texts}), path)


def timed(command: list[str], threads: int, cores: int) -> float:
    """Seconds the command takes, pinned to the first `cores` cores with `threads` torch threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                   preexec_fn=lambda: os.sched_setaffinity(0, range(cores)))
    return time.perf_counter() - start


def agree(one: Path, ray: Path) -> None:
    """Row for row: the same ids and labels, probabilities within 1e-5."""
    for a, b in zip(*([json.loads(line) for line in p.read_text().splitlines()] for p in (one, ray)), strict=True):
        assert (a["id"], a["label"]) == (b["id"], b["label"]), (a, b)
        assert all(abs(a["scores"][k] - b["scores"][k]) <= 1e-5 for k in a["scores"]), (a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model (a tiny local one to check the script)")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--cores", type=int, default=2, help="cores both commands are pinned to")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors (--concurrency)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--workdir", help="where the prompts and rows go (kept; default: a temporary folder)")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < args.cores:
        sys.exit(f"--cores {args.cores}: only {len(os.sched_getaffinity(0))} cores are available")

    root = Path(args.workdir or tempfile.mkdtemp(prefix="softprompt-batch-"))
    root.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(root / "prompts", args.model)
    rows = root / "rows.parquet"
    write_rows(rows, args.rows)
    base = [sys.executable, "-m", "softprompt", "predict", *(f"{task}={path}" for task, path in prompts.items()),
            "--input", str(rows), "--chunk-size", str(args.chunk_size), "--no-progress"]
    one, ray = root / "one.jsonl", root / "ray.jsonl"
    commands = {"predict": (base + ["--output", str(one)], args.cores, one),
                "ray": (base + ["--output", str(ray), "--ray", "--concurrency", str(args.actors)], 1, ray)}
    for name, (command, threads, _) in commands.items():
        print(f"command ({name}, OMP_NUM_THREADS={threads}, cores 0-{args.cores - 1}): {' '.join(command)}")

    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(args.rounds):
        for name in (list(commands) if round_ % 2 == 0 else list(commands)[::-1]):
            command, threads, output = commands[name]
            output.unlink(missing_ok=True)
            seconds[name].append(timed(command, threads, args.cores))
        agree(one, ray)
        print(f"round {round_ + 1}: " + "  ".join(f"{name} {s[-1]:.1f} s" for name, s in seconds.items()))

    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name, value in median.items():
        print(f"{name}: median {value:.1f} s over {args.rounds} round(s), {args.rows / value:.1f} rows/s")
    print(f"RESULT ray_vs_predict={median['predict'] / median['ray']:.2f} predict_s={median['predict']:.1f} "
          f"ray_s={median['ray']:.1f} rows={args.rows} cores={args.cores} actors={args.actors} model={args.model}")


if __name__ == "__main__":
    main()
