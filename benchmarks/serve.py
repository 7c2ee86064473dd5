"""The multi-task server under load: softprompt's mixed batches against peft doing the same model work behind the
same HTTP layer and batcher, with 4 and with 64 tasks, one task alone, the OpenAI route through the `openai`
client, each precision asked for, then a load run with malformed requests mixed in.

    python benchmarks/serve.py                                   # SmolLM2-135M, fp32, 16 clients, 3 rounds
    python benchmarks/serve.py --prompt-length 100 --dtypes fp32 bf16 --openai   # issue 32's rows
    python benchmarks/serve.py --quick                           # 1 round, fewer requests: a smoke check
    python benchmarks/serve.py --device cuda --model smollm2-shape --prompt-length 100 --dtypes bf16   # a GPU

Prompts: 4 trained briefly on Rotten Tomatoes and, for the 64-task runs, 60 more started from sampled vocabulary
(other seeds); label words, rank classification; every prompt `--prompt-length` long, or lengths 4-24 when it is
not given. `--model smollm2-shape` (for a machine without the packaged SmolLM2) builds SmolLM2-135M's shape with
random weights and a byte-level BPE tokenizer trained on generated sentences, which are also the texts sent; its
prompts all start from sampled vocabulary. Each server runs in its own process (2 torch threads on a CPU) with one
frozen model in the row's precision, max batch 32, max wait 5 ms; the clients are threads of this process, each
sending requests of 1-3 texts for a random task and waiting for the answer before the next. peft holds the same
prompts as prompt-tuning adapters (`softprompt export --format peft`), in the same precision on the same device,
and per batch runs one forward per task present, after `set_adapter`, with the LM head on the last position
only: the best it can do, since peft cannot mix prompts in a batch. Throughput is inputs answered per second
(median over rounds); latency is per request, over all rounds.
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
TRAINED = 4  # prompts trained briefly (on SmolLM2 itself); the rest start from sampled vocabulary
WORDS = [f"{a}{b}{c}" for a in "bcdfglmnprst" for b in "aeiou" for c in "klmnrst"]  # the shape's made-up words


# -- the model and the prompts -----------------------------------------------------------------------------------
def shape_model(root: Path) -> str:
    """SmolLM2-135M's shape with random weights and a byte-level BPE tokenizer trained on generated sentences,
    saved as a local model folder (no download)."""
    folder = root / "smollm2-shape"
    if (folder / "config.json").is_file():
        return str(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sentences(5000, seed=1), trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(count)]


def make_prompts(root: Path, model: str, count: int, length: int | None) -> dict[str, str]:
    """{task: checkpoint}: on SmolLM2 the first TRAINED trained briefly, the rest vocabulary-initialised with other
    seeds; every one `length` long (or 4-24 when it is None)."""
    from softprompt import PromptedTask, TrainConfig, describe_model, resolve, train
    from softprompt.tasks import get_task

    prompts, info, task = {}, describe_model(model), get_task("rotten_tomatoes")
    for i in range(count):
        k = length or (8 + 4 * i if i < TRAINED else 4 + (i * 7) % 21)
        out = root / f"{model.replace('/', '_')}-{k}-{i}"
        if model == "smollm2-135m" and i < TRAINED:
            if not (out / "best" / "softprompt.json").is_file():
                train(TrainConfig(data="rotten_tomatoes", prompt_length=k, seed=i, max_steps=6, eval_every=6,
                                  max_eval_examples=64, eval_test=False, progress=False, output=str(out), bf16=False,
                                  device="cpu"), log=lambda *_: None)
            prompts[f"task{i:02d}"] = str(out / "best")
            continue
        if not (out / "softprompt.json").is_file():
            spec = resolve(TrainConfig(model=model, data="rotten_tomatoes", prompt_length=k, init="vocab", seed=i,
                                       bf16=False, device="cpu"), info, task)
            PromptedTask.build(spec, info).save_pretrained(out)
        prompts[f"task{i:02d}"] = str(out)
    return prompts


# -- peft doing the model work ---------------------------------------------------------------------------------
class PeftBackend:
    """The model interface the server calls (`base_name`, `tasks`, `check`, `predict`), served by peft
    prompt-tuning adapters in `dtype` on `device`."""

    def __init__(self, prompts: dict[str, str], export_root: Path, dtype: str, device: str) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from softprompt.assets import describe_model
        from softprompt.checkpoint import read_checkpoint
        from softprompt.encoding import TaskEncoder
        from softprompt.peft_interop import export_peft

        spec = read_checkpoint(next(iter(prompts.values()))).spec
        self.torch, self.base_name, self.device = torch, spec.model, torch.device(device)
        path = describe_model(spec.model).path
        weights = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        base = AutoModelForCausalLM.from_pretrained(path, dtype=weights).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        self.encoders, self.model, self.dtype = {}, None, dtype
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

        return {name: TaskInfo(name, tuple(e.task.labels), False, tuple(e.task.fields), (name,), False, (self.dtype,))
                for name, e in self.encoders.items()}

    def check(self, items: list[tuple[str, Any]], max_new_tokens: int | None = None) -> list[int]:
        from softprompt.data import to_example

        return [len(self.encoders[task].encode(to_example(given, self.encoders[task].task.fields)).input_ids)
                for task, given in items]

    def predict(self, items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        from softprompt.data import to_examples
        from softprompt.encoding import pad
        from softprompt.multitask import UnknownTask
        from softprompt.scoring import first_token_scores, labelled

        torch, out = self.torch, [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (task, _) in enumerate(items):
            if task not in self.encoders:
                raise UnknownTask(f"no task {task!r}")
            groups.setdefault(task, []).append(i)
        for task, index in groups.items():  # one forward per task: peft cannot mix prompts in a batch
            encoder = self.encoders[task]
            examples = to_examples([items[i][1] for i in index], encoder.task.fields)
            ids, mask = pad([encoder.encode(e).input_ids for e in examples], encoder.tokenizer.pad_token_id, "left",
                            device=self.device)
            self.model.set_adapter(task)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            probs = torch.softmax(first_token_scores(logits, encoder.label_ids), -1)
            for i, p in zip(index, probs):
                out[i] = {"task": task, **labelled(encoder.task.labels, p.cpu())}
        return out


def serve_process(kind: str, prompts_file: str, port: int, dtype: str, device: str) -> None:
    """Child process: one server on `port`."""
    import torch
    import uvicorn

    from softprompt.multitask import MultiTaskModel
    from softprompt.serve import ServeOptions, create_app

    if device == "cpu":
        torch.set_num_threads(2)
    prompts = json.loads(Path(prompts_file).read_text())
    if kind == "softprompt":
        model: Any = MultiTaskModel.from_pretrained(prompts, dtype=dtype, device=device)
    else:
        model = PeftBackend(prompts, Path(tempfile.mkdtemp(prefix="peft-adapters-")), dtype, device)
    app = create_app(model, ServeOptions(max_batch=32, max_wait_ms=5, max_inputs=64, device=device))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, prompts: dict[str, str], workdir: Path, dtype: str, device: str
                 ) -> tuple[subprocess.Popen, str]:
    prompts_file = workdir / f"{kind}-{len(prompts)}-{dtype}.json"
    prompts_file.write_text(json.dumps(prompts))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE), "--serve", kind, str(prompts_file), str(port), dtype, device],
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
def _send(http: httpx.Client, openai_client: Any, url: str, body: dict) -> tuple[int, Any]:
    """One request: through the openai client's completions (a classification: the label and every label's
    log-probability), or as JSON to the softprompt route."""
    if openai_client is not None:
        answer = openai_client.completions.create(model=body["task"], prompt=body["inputs"])
        return 200, {"results": [{"label": c.text} for c in answer.choices]}
    if "raw" in body:
        r = http.post(url + body["path"], content=body["raw"], headers={"content-type": "application/json"})
    else:
        r = http.post(url + "/v1/predict", json=body)
    return r.status_code, r.json() if r.content else None


def run_clients(url: str, requests: list[list[dict]], openai: bool = False, timeout: float = 120
                ) -> tuple[float, list[float], list]:
    """Each client sends its requests one after another; returns (inputs per second, latencies in ms, each
    response as (request, status, body))."""
    latencies, responses, lock = [], [], threading.Lock()

    def client(mine: list[dict]) -> None:
        openai_client = None
        if openai:
            from openai import OpenAI

            openai_client = OpenAI(base_url=url + "/v1", api_key="none", timeout=timeout, max_retries=0)
        with httpx.Client(timeout=timeout) as http:
            for body in mine:
                start = time.perf_counter()
                status, answer = _send(http, openai_client, url, body)
                took = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(took)
                    responses.append((body, status, answer))

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


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def load_run(url: str, prompts4: list[str], texts: list[str], expected: dict, clients: int, quick: bool
             ) -> tuple[list[float], int, int, int]:
    """1,000 requests from the clients, one in ten malformed: their latencies, wrong statuses, answers unlike the
    task alone, and 5xx answers."""
    rng, bodies, want_status = random.Random(7), [], []
    for i in range(200 if quick else 1000):
        if i % 10 == 9:
            body, status = malformed(rng, texts)
        else:
            body, status = {"task": rng.choice(prompts4), "inputs": rng.sample(texts, rng.randint(1, 3))}, 200
        bodies.append(body)
        want_status.append(status)
    status_of = {id(b): s for b, s in zip(bodies, want_status)}
    _, latency, responses = run_clients(url, [bodies[c::clients] for c in range(clients)])
    wrong_status = wrong_answer = errors_5xx = 0
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
    return latency, wrong_status, wrong_answer, errors_5xx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or smollm2-shape (random weights)")
    parser.add_argument("--prompt-length", type=int, default=None, help="every prompt this long (default 4-24)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--openai", action="store_true", help="also the 4-task stream through the openai client")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "softprompt-serve-bench"))
    parser.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_process(args.serve[0], args.serve[1], int(args.serve[2]), args.serve[3], args.serve[4])
        return

    from softprompt import PromptedTask
    from softprompt.data import load_data

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rounds, per_client = (1, 6) if args.quick else (args.rounds, 6)
    model = shape_model(workdir) if args.model == "smollm2-shape" else args.model
    prompts64 = make_prompts(workdir / "prompts", model, 64, args.prompt_length)
    prompts4 = {t: prompts64[t] for t in list(prompts64)[:4]}
    texts = sentences(200, seed=2) if args.model == "smollm2-shape" else \
        [e.fields["text"] for e in load_data("rotten_tomatoes", seed=0).test[:200]]
    first = args.dtypes[0]
    # what every valid answer of the load run must be: each of the 4 tasks predicted alone, in the single-task
    # pipeline, in the load run's precision
    expected = {task: dict(zip(texts, PromptedTask.from_pretrained(path, dtype=first, device=args.device).predict(
        texts))) for task, path in prompts4.items()}

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    runs: dict[str, tuple[str, list[str], bool]] = {}
    try:
        for dtype in args.dtypes:
            for name, kind, prompts in ((f"ours_{dtype}", "softprompt", prompts64),
                                        (f"peft4_{dtype}", "peft", prompts4), (f"peft64_{dtype}", "peft", prompts64)):
                servers[name] = start_server(kind, prompts, workdir, dtype, args.device)
            runs.update({f"single_{dtype}": (f"ours_{dtype}", ["task00"], False),
                         f"mixed4_{dtype}": (f"ours_{dtype}", list(prompts4), False),
                         f"peft4_{dtype}": (f"peft4_{dtype}", list(prompts4), False),
                         f"mixed64_{dtype}": (f"ours_{dtype}", list(prompts64), False),
                         f"peft64_{dtype}": (f"peft64_{dtype}", list(prompts64), False)})
            if args.openai:
                runs[f"openai4_{dtype}"] = (f"ours_{dtype}", list(prompts4), True)
        for server, (_, url) in servers.items():
            # first use of each prompt does one-time work (softprompt checks its engine on a probe batch and keeps
            # the prompt's keys/values; peft builds nothing): done before the clock starts, as a server would at start
            tasks = list(prompts4) if server.startswith("peft4") else list(prompts64)
            run_clients(url, [[{"task": t, "inputs": texts[:2]} for t in tasks]])
        throughput: dict[str, list[float]] = {name: [] for name in runs}
        latency: dict[str, list[float]] = {name: [] for name in runs}
        errors_5xx = 0
        for r in range(rounds):
            for name, (server, tasks, openai) in runs.items():  # interleaved, so drift hits every row alike
                rate, lat, responses = run_clients(servers[server][1], stream(texts, tasks, args.clients, per_client,
                                                                              seed=r), openai)
                errors_5xx += sum(status >= 500 for _, status, _ in responses)
                throughput[name].append(rate)
                latency[name].extend(lat)
                print(f"round {r + 1} {name:14s} {rate:7.1f} inputs/s", file=sys.stderr, flush=True)
        load_latency, wrong_status, wrong_answer, load_5xx = load_run(
            servers[f"ours_{first}"][1], list(prompts4), texts, expected, args.clients, args.quick)
        errors_5xx += load_5xx
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    med = {name: statistics.median(v) for name, v in throughput.items()}
    k = args.prompt_length or "4-24"
    print(f"# {args.model} on {args.device}, {k}-token prompts, {args.clients} clients, median of {rounds} rounds")
    print("| run | inputs/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {med[name]:.1f} | {pct(latency[name], 50):.0f} | {pct(latency[name], 99):.0f} |")
    print(f"load run ({first}): p50 {pct(load_latency, 50):.0f} ms, p99 {pct(load_latency, 99):.0f} ms, wrong status "
          f"{wrong_status}, wrong answers {wrong_answer}, 5xx {errors_5xx}")
    for dtype in args.dtypes:
        extra = f" openai_vs_predict={med[f'openai4_{dtype}'] / med[f'mixed4_{dtype}']:.2f}" if args.openai else ""
        print(f"RESULT dtype={dtype} serve_vs_peft={med[f'mixed4_{dtype}'] / med[f'peft4_{dtype}']:.2f} "
              f"serve64_vs_peft={med[f'mixed64_{dtype}'] / med[f'peft64_{dtype}']:.2f} "
              f"mixed_vs_single={med[f'mixed4_{dtype}'] / med[f'single_{dtype}']:.2f} "
              f"mixed64_vs_single={med[f'mixed64_{dtype}'] / med[f'single_{dtype}']:.2f}{extra} "
              f"p99_ms={pct(latency[f'mixed4_{dtype}'], 99):.0f} errors_5xx={errors_5xx}")
    if len(args.dtypes) > 1:
        print(f"RESULT bf16_vs_fp32={med['mixed4_bf16'] / med['mixed4_fp32']:.2f} "
              f"bf16_vs_fp32_64={med['mixed64_bf16'] / med['mixed64_fp32']:.2f}")


if __name__ == "__main__":
    main()
