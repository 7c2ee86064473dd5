"""The multi-task server under load: softprompt's mixed batches against peft doing the same model work behind
the same HTTP layer and batcher, with 4 and with 64 tasks, then a load run with malformed requests mixed in.

    python benchmarks/serve.py            # SmolLM2-135M, 16 clients, 5 rounds
    python benchmarks/serve.py --quick    # 1 round, fewer requests: a smoke check

Prompts: 4 trained briefly on Rotten Tomatoes (lengths 8/12/16/20, different seeds), and for the 64-task runs
60 more of lengths 4-24 started from sampled vocabulary (different seeds); label words, rank classification.
Each server runs in its own process (2 torch threads) with one frozen SmolLM2 in fp32, max batch 32, max wait
5 ms; the clients are threads of this process, each sending requests of 1-3 reviews for a random task and
waiting for the answer before the next. peft holds the same prompts as prompt-tuning adapters
(`softprompt export --format peft`), and per batch runs one forward per task present, after `set_adapter`,
with the LM head on the last position only: the best it can do, since peft cannot mix prompts in a batch.
Throughput is inputs answered per second (median over rounds); latency is per request, over all rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve()
TRAINED_LENGTHS = (8, 12, 16, 20)


# -- the prompts ---------------------------------------------------------------------------------------------
def make_prompts(root: Path, count: int) -> dict[str, str]:
    """{task: checkpoint}: 4 trained briefly, the rest vocabulary-initialised with other seeds and lengths."""
    from softprompt import PromptedTask, TrainConfig, describe_model, resolve, train
    from softprompt.tasks import get_task

    prompts = {}
    for i, k in enumerate(TRAINED_LENGTHS):
        out = root / f"trained{i}"
        if not (out / "best" / "softprompt.json").is_file():
            train(TrainConfig(data="rotten_tomatoes", prompt_length=k, seed=i, max_steps=6, eval_every=6,
                              max_eval_examples=64, eval_test=False, progress=False, output=str(out), bf16=False),
                  log=lambda *_: None)
        prompts[f"task{i:02d}"] = str(out / "best")
    info = describe_model("smollm2-135m")
    for i in range(len(prompts), count):
        out = root / f"init{i}"
        if not (out / "softprompt.json").is_file():
            spec = resolve(TrainConfig(data="rotten_tomatoes", prompt_length=4 + (i * 7) % 21, init="vocab", seed=i,
                                       bf16=False), info, get_task("rotten_tomatoes"))
            PromptedTask.build(spec, info).save_pretrained(out)
        prompts[f"task{i:02d}"] = str(out)
    return prompts


# -- peft doing the model work ---------------------------------------------------------------------------------
class PeftBackend:
    """The model interface the server calls (`tasks`, `predict`), served by peft prompt-tuning adapters."""

    def __init__(self, prompts: dict[str, str], export_root: Path) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from softprompt.assets import smollm2_path
        from softprompt.checkpoint import read_checkpoint
        from softprompt.encoding import TaskEncoder
        from softprompt.peft_interop import export_peft

        self.torch, self.base_name = torch, "smollm2-135m"
        base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        self.encoders, self.model = {}, None
        for task, checkpoint in prompts.items():
            folder, _ = export_peft(checkpoint, export_root / task)
            if self.model is None:
                self.model = PeftModel.from_pretrained(base, folder, adapter_name=task).eval()
            else:
                self.model.load_adapter(folder, adapter_name=task)
            spec = read_checkpoint(checkpoint).spec
            self.encoders[task] = TaskEncoder(tokenizer, spec.task, spec.task_type, spec.max_length)

    def tasks(self) -> dict[str, Any]:
        from softprompt.multitask import TaskInfo

        return {name: TaskInfo(name, tuple(e.task.labels), False, tuple(e.task.fields), (name,), False)
                for name, e in self.encoders.items()}

    def predict(self, items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        from softprompt.data import to_examples
        from softprompt.encoding import pad
        from softprompt.multitask import UnknownTask
        from softprompt.scoring import first_token_scores

        torch, out = self.torch, [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (task, _) in enumerate(items):
            if task not in self.encoders:
                raise UnknownTask(f"no task {task!r}")
            groups.setdefault(task, []).append(i)
        for task, index in groups.items():  # one forward per task: peft cannot mix prompts in a batch
            encoder = self.encoders[task]
            examples = to_examples([items[i][1] for i in index], encoder.task.fields)
            ids, mask = pad([encoder.encode(e).input_ids for e in examples], encoder.tokenizer.pad_token_id, "left")
            self.model.set_adapter(task)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            probs = torch.softmax(first_token_scores(logits, encoder.label_ids), -1)
            for i, p in zip(index, probs):
                out[i] = {"task": task, "label": encoder.task.labels[int(p.argmax())],
                          "scores": {name: round(float(x), 6) for name, x in zip(encoder.task.labels, p)}}
        return out


def serve_process(kind: str, prompts_file: str, port: int) -> None:
    """Child process: one server on `port`."""
    import torch
    import uvicorn

    from softprompt.multitask import MultiTaskModel
    from softprompt.serve import ServeOptions, create_app

    torch.set_num_threads(2)
    prompts = json.loads(Path(prompts_file).read_text())
    if kind == "softprompt":
        model = MultiTaskModel.from_pretrained(prompts, dtype="fp32")
    else:
        model = PeftBackend(prompts, Path(tempfile.mkdtemp(prefix="peft-adapters-")))
    app = create_app(model, ServeOptions(max_batch=32, max_wait_ms=5, max_inputs=64))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, prompts: dict[str, str], workdir: Path) -> tuple[subprocess.Popen, str]:
    prompts_file = workdir / f"{kind}-{len(prompts)}.json"
    prompts_file.write_text(json.dumps(prompts))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE), "--serve", kind, str(prompts_file), str(port)],
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {kind} server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the {kind} server did not start in 10 minutes")


# -- load ------------------------------------------------------------------------------------------------------
def run_clients(url: str, requests: list[list[dict]], timeout: float = 120) -> tuple[float, list[float], list]:
    """Each client sends its requests one after another; returns (inputs per second, latencies in ms, each
    response as (request, status, body))."""
    latencies, responses, lock = [], [], threading.Lock()

    def client(mine: list[dict]) -> None:
        with httpx.Client(timeout=timeout) as http:
            for body in mine:
                start = time.perf_counter()
                if "raw" in body:
                    r = http.post(url + body["path"], content=body["raw"], headers={"content-type": "application/json"})
                else:
                    r = http.post(url + "/v1/predict", json=body)
                took = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(took)
                    responses.append((body, r.status_code, r.json() if r.content else None))

    threads = [threading.Thread(target=client, args=(mine,)) for mine in requests]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    answered = sum(len(body.get("inputs", [])) for body, status, _ in responses if status == 200)
    return answered / wall, latencies, responses


def stream(texts: list[str], tasks: list[str], clients: int, per_client: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"task": rng.choice(tasks), "inputs": rng.sample(texts, rng.randint(1, 3))} for _ in range(per_client)]
            for _ in range(clients)]


def malformed(rng: random.Random, texts: list[str]) -> tuple[dict, int]:
    """A bad request and the status it must get."""
    kind = rng.randrange(5)
    if kind == 0:
        return {"task": "no-such-task", "inputs": [texts[0]]}, 404
    if kind == 1:
        return {"task": "task00"}, 422
    if kind == 2:
        return {"raw": "{not json", "path": "/v1/predict"}, 422
    if kind == 3:
        return {"task": "task00", "inputs": [texts[0]] * 65}, 413
    return {"task": "task00", "inputs": ["x" * 4001]}, 413


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "softprompt-serve-bench"))
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_process(*args.serve)
        return

    from softprompt import PromptedTask
    from softprompt.data import load_data

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rounds, per_client = (1, 6) if args.quick else (5, 6)
    prompts64 = make_prompts(workdir / "prompts", 64)
    prompts4 = {t: prompts64[t] for t in list(prompts64)[:4]}
    texts = [e.fields["text"] for e in load_data("rotten_tomatoes", seed=0).test[:200]]

    # what every valid answer must be: each of the 4 trained tasks predicted alone, in the single-task pipeline
    expected = {task: dict(zip(texts, PromptedTask.from_pretrained(path).predict(texts)))
                for task, path in prompts4.items()}

    servers = {}
    try:
        for name, kind, prompts in (("ours", "softprompt", prompts64), ("peft4", "peft", prompts4),
                                    ("peft64", "peft", prompts64)):
            servers[name] = start_server(kind, prompts, workdir)
        runs = {"ours_mixed4": ("ours", list(prompts4)), "ours_single": ("ours", ["task00"]),
                "peft_mixed4": ("peft4", list(prompts4)), "ours_mixed64": ("ours", list(prompts64)),
                "peft_mixed64": ("peft64", list(prompts64))}
        for server, tasks in (("ours", list(prompts64)), ("peft4", list(prompts4)), ("peft64", list(prompts64))):
            # first use of each prompt does one-time work (softprompt checks its engine on a probe batch and keeps the
            # prompt's keys/values; peft builds nothing): done before the clock starts, as a server would at start
            run_clients(servers[server][1], [[{"task": t, "inputs": texts[:2]} for t in tasks]])
        throughput: dict[str, list[float]] = {name: [] for name in runs}
        latency: dict[str, list[float]] = {name: [] for name in runs}
        errors_5xx = 0
        for r in range(rounds):
            for name, (server, tasks) in runs.items():  # interleaved, so drift hits every row alike
                rate, lat, responses = run_clients(servers[server][1],
                                                   stream(texts, tasks, args.clients, per_client, seed=r))
                errors_5xx += sum(status >= 500 for _, status, _ in responses)
                throughput[name].append(rate)
                latency[name].extend(lat)
                print(f"round {r + 1} {name:13s} {rate:7.1f} inputs/s", file=sys.stderr, flush=True)

        # the load run: 1,000 requests from 16 clients, one in ten malformed
        rng, bodies, want_status = random.Random(7), [], []
        for i in range(1000 if not args.quick else 200):
            if i % 10 == 9:
                body, status = malformed(rng, texts)
            else:
                body, status = {"task": rng.choice(list(prompts4)), "inputs": rng.sample(texts, rng.randint(1, 3))}, 200
            bodies.append(body)
            want_status.append(status)
        per = [bodies[c::args.clients] for c in range(args.clients)]
        status_of = {id(b): s for b, s in zip(bodies, want_status)}
        _, load_latency, responses = run_clients(servers["ours"][1], per)
        wrong_status = wrong_answer = 0
        for body, status, answer in responses:
            errors_5xx += status >= 500
            if status != status_of[id(body)]:
                wrong_status += 1
            elif status == 200:
                for text, got in zip(body["inputs"], answer["results"]):
                    want = expected[body["task"]][text]
                    close = all(abs(got["scores"][k] - v) <= 1e-4 for k, v in want["scores"].items())
                    wrong_answer += not close or (got["label"] != want["label"] and
                                                  abs(want["scores"][want["label"]] - 0.5) > 1e-4)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    med = {name: statistics.median(v) for name, v in throughput.items()}

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]

    print(f"{'run':14s} {'inputs/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name in runs:
        print(f"{name:14s} {med[name]:9.1f} {pct(latency[name], 50):8.0f} {pct(latency[name], 99):8.0f}")
    print(f"load run: {len(responses)} requests, p50 {pct(load_latency, 50):.0f} ms, p99 {pct(load_latency, 99):.0f} "
          f"ms, wrong status {wrong_status}, wrong answers {wrong_answer}, 5xx {errors_5xx}")
    print(f"RESULT serve_vs_peft={med['ours_mixed4'] / med['peft_mixed4']:.2f} "
          f"mixed_vs_single={med['ours_mixed4'] / med['ours_single']:.2f} "
          f"mixed64_vs_single={med['ours_mixed64'] / med['ours_single']:.2f} "
          f"p99_ms={pct(latency['ours_mixed4'], 99):.0f} errors_5xx={errors_5xx}")


if __name__ == "__main__":
    main()
