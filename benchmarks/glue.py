"""GLUE under a fixed training-time budget: each of softprompt's methods against peft's implementation of the
same method, and peft LoRA, same model, prompt length and budget, train -> dev, side by side in one process.

    python benchmarks/glue.py                                   # SST-2, MRPC, RTE, CoLA, STS-B x both models
    python benchmarks/glue.py --tasks sst2 --models smollm2-135m   # a subset; other rows in the table stay
    python benchmarks/glue.py --methods prompt ptuning prefix lora # every method, ours beside peft's
    python benchmarks/glue.py --methods prefix --sides ours     # our prefix rows only
    python benchmarks/glue.py --quick                           # regression check, under 5 minutes

Each row trains for the same budget and is then scored once on the whole dev set (GLUE's test labels are
private). Our rows' `--max-time` is their run's wall clock (issue 29): it holds back the time of that one dev
evaluation (estimated from a timed sample first), about 3% of 900 s on SST-2, which peft's rows, training for the
whole budget before they are scored, do not spend. Our rows are `softprompt train` with its
defaults and `--method`. peft rows follow what a peft user copies: AdamW with linear decay and no warmup, at the
learning rate of peft's own examples for the method (prompt tuning 3e-2, P-tuning 1e-3, prefix tuning 1e-2,
LoRA 5e-4); decoders learn the label word with the LM loss (prompt tuning from a text init), encoders a
classifier head from peft's random init; decoder rows are right-padded and read at each row's last real token.
Rows are kept in docs/results.json, and docs/results.md is written beside it, so runs of different tasks add up
to one table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from softprompt.assets import describe_model, load_backbone, resolve_model
from softprompt.checkpoint import read_checkpoint
from softprompt.config import TaskType
from softprompt.encoding import TaskEncoder, collate, pad
from softprompt.metrics import compute_metrics
from softprompt.tasks import get_task
from softprompt.training import TrainConfig, load_splits, train

try:
    import peft
except ImportError:  # the peft rows are left out
    peft = None

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")
MODELS = {"smollm2-135m": 900.0, "minilm-l6": 600.0}  # training seconds per run (the budgets)
PEFT_BATCH = {"smollm2-135m": 16, "minilm-l6": 32}
METHODS = ("prompt", "ptuning", "prefix", "lora")  # lora: peft's only
ROW_NAMES = {("ours", "prompt"): "softprompt", ("ours", "ptuning"): "softprompt P-tuning",
             ("ours", "prefix"): "softprompt prefix", ("peft", "prompt"): "peft prompt tuning",
             ("peft", "ptuning"): "peft P-tuning", ("peft", "prefix"): "peft prefix tuning",
             ("peft", "lora"): "peft LoRA r=8 q,v"}
PEFT_LR = {"prompt": 3e-2, "ptuning": 1e-3, "prefix": 1e-2, "lora": 5e-4}  # peft's examples for each method
LORA_TARGETS = {"smollm2-135m": ["q_proj", "v_proj"], "minilm-l6": ["query", "value"]}


def task_type(model: str, task) -> TaskType:
    """Encoders and regression train a head; the decoder classifies by its label words."""
    return TaskType.SEQ_CLS if model == "minilm-l6" or task.is_regression else TaskType.CAUSAL_LM


def ours(method: str, model: str, task_name: str, budget: float, prompt_length: int, dev_limit: int | None,
         out: Path, lr: float | None = None, seed: int = 0) -> dict:
    task = get_task(task_name)
    cfg = TrainConfig(model=model, data=str(GLUE / task.glue_folder), task=task_name, method=method,
                      task_type=task_type(model, task).value, prompt_length=prompt_length, max_time=budget,
                      eval_every=10**9, eval_test=False, max_eval_examples=dev_limit, progress=False,
                      output=str(out), lr=lr, seed=seed)
    result = train(cfg, log=lambda _: None)
    bf16 = read_checkpoint(out / "best").spec.bf16  # default: bf16 for label words on CPUs with AMX
    return {"metrics": result.dev, "steps": result.step, "seconds": result.seconds,
            "params": result.trained_parameters, "stored": _stored(out / "best"),
            "precision": "bf16" if bf16 else "fp32"}


def _stored(checkpoint: Path) -> int:
    """Parameters in the checkpoint: a training reparameterisation is folded into the prompt at save."""
    from safetensors.torch import load_file

    return sum(t.numel() for f in checkpoint.glob("*.safetensors") for t in load_file(str(f)).values())


def peft_run(method: str, model: str, task_name: str, budget: float, prompt_length: int, dev_limit: int | None,
             seed: int = 0) -> dict:
    """peft's `method` trained as its users do, for `budget` seconds of steps."""
    task = get_task(task_name)
    kind = task_type(model, task)
    torch.manual_seed(seed)
    backbone = load_backbone(describe_model(model), kind, num_labels=max(len(task.labels), 1),
                             regression=task.is_regression)
    # the same train/dev examples as the softprompt row (the same --dev-limit subset)
    splits = load_splits(str(GLUE / task.glue_folder), task_name, seed, max_eval_examples=dev_limit)
    dev = splits.dev
    encoder = TaskEncoder(backbone.tokenizer, task, kind, 128)
    net = peft.get_peft_model(backbone.model, _peft_config(method, model, task, kind, prompt_length))
    lr = PEFT_LR[method]
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    features = encoder.encode_all(splits.train)
    batch = PEFT_BATCH[model]
    rng = torch.Generator().manual_seed(seed)
    order, cursor, steps, elapsed = torch.randperm(len(features), generator=rng).tolist(), 0, 0, 0.0
    net.train()
    while elapsed < budget:
        start = time.perf_counter()
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(features), generator=rng).tolist(), 0
        inputs = _peft_batch([features[i] for i in order[cursor:cursor + batch]], encoder, kind)
        cursor += batch
        for group in optimizer.param_groups:
            group["lr"] = lr * max(0.0, 1 - elapsed / budget)
        net(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        elapsed += time.perf_counter() - start
    metrics = compute_metrics(task.metrics, _peft_predict(net, encoder, dev, kind), [e.label for e in dev])
    trained = sum(p.numel() for p in params)
    return {"metrics": metrics, "steps": steps, "seconds": elapsed, "params": trained, "stored": trained,
            "precision": "fp32"}


def _peft_config(method: str, model: str, task, kind: TaskType, prompt_length: int):
    if method == "lora":
        return peft.LoraConfig(task_type=kind.value, r=8, lora_alpha=16, lora_dropout=0.05,
                               target_modules=LORA_TARGETS[model])
    if method == "ptuning":
        return peft.PromptEncoderConfig(task_type=kind.value, num_virtual_tokens=prompt_length,
                                        encoder_reparameterization_type="MLP")
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=kind.value, num_virtual_tokens=prompt_length)
    if kind is TaskType.CAUSAL_LM:
        return peft.PromptTuningConfig(task_type=kind.value, num_virtual_tokens=prompt_length,
                                       prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                       prompt_tuning_init_text=task.instruction.strip() or task.name,
                                       tokenizer_name_or_path=str(resolve_model(model)))
    return peft.PromptTuningConfig(task_type=kind.value, num_virtual_tokens=prompt_length)


def _peft_batch(features, encoder: TaskEncoder, kind: TaskType) -> dict:
    """Our collate, but a decoder's head batch padded on the left: transformers pools a decoder's last column
    when it gets embeddings (as it does from peft), so right padding would pool a pad."""
    inputs = collate(features, encoder)
    if kind is TaskType.SEQ_CLS and not encoder.tokenizer.cls_token:
        inputs["input_ids"], inputs["attention_mask"] = pad([f.input_ids for f in features],
                                                            encoder.tokenizer.pad_token_id, side="left")
    return inputs


@torch.inference_mode()
def _peft_predict(net, encoder: TaskEncoder, examples, kind: TaskType) -> list:
    """Head outputs, or the label word with the highest next-token probability after the template."""
    net.eval()
    features, out = encoder.encode_all(examples), []
    label_ids = [ids[0] for ids in encoder.label_ids]  # the verbalizers here are one token each
    for start in range(0, len(features), 32):
        chunk = features[start:start + 32]
        if kind is TaskType.CAUSAL_LM:
            # right padding: a plain forward numbers positions from the first column, so left pads would shift a
            # row's positions; prompt methods hand back logits for their virtual tokens too, hence the offset
            ids, mask = pad([f.input_ids for f in chunk], encoder.tokenizer.pad_token_id, side="right")
            logits = net(input_ids=ids, attention_mask=mask).logits
            last = logits.shape[1] - ids.shape[1] + mask.sum(1) - 1
            out += logits[torch.arange(len(chunk)), last][:, label_ids].argmax(-1).tolist()
        else:
            inputs = _peft_batch(chunk, encoder, kind)
            inputs.pop("labels")
            logits = net(**inputs).logits.float()
            out += logits[:, 0].tolist() if encoder.task.is_regression else logits.argmax(-1).tolist()
    return out


def result_line(rows: list[dict], task: str, model: str) -> str:
    """One line per task and model: every method's first metric, ours as `<method>`, peft's as `peft_<method>`."""
    metric = get_task(task).metrics[0]
    by = {r["method"]: r for r in rows if r["task"] == task and r["model"] == model}
    keys = {name: ("" if side == "ours" else "peft_") + method for (side, method), name in ROW_NAMES.items()}
    values = " ".join(f"{keys[name]}={_fmt(r['metrics'][metric])}" for name, r in by.items() if name in keys)
    budgets = {r["budget"] for r in by.values()}
    return f"RESULT task={task} model={model} metric={metric} {values} budget_s={'/'.join(f'{b:.0f}' for b in budgets)}"


def _fmt(value: float | None) -> str:
    return "na" if value is None or math.isnan(value) else f"{value:.4f}"


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["# GLUE under equal training time: softprompt vs peft", "",
             "Written by `python benchmarks/glue.py` from docs/results.json (each row: the command's settings, "
             "the date it ran). Train -> dev, one seed, 2 CPU cores; precision of the frozen model per row (the prompt "
             "always trains in fp32); seconds are training steps only. SST-2 rows run since 2026-12-02 read its "
             "sentences as natural text, the earlier ones as Treebank tokens (recipe.md). The machine's speed "
             "varies by day (2026-12-02 ran about 1.7x faster than 2026-11-29), so compare steps within one date. "
             "How the recipe was chosen, and the targets: [recipe.md](recipe.md).", ""]
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        metric_names = get_task(task).metrics
        lines += [f"## {task}", "", "| model | method | precision | " + " | ".join(metric_names) +
                  " | steps | train s | trained params | stored params | budget s | ran |",
                  "|---|---|---|" + "---|" * (len(metric_names) + 6)]
        for r in mine:
            values = " | ".join(f"{100 * r['metrics'][m]:.2f}" if m not in ("pearson", "spearman", "mcc")
                                else f"{r['metrics'][m]:.4f}" for m in metric_names)
            lines.append(f"| {r['model']} | {r['method']} | {r.get('precision', 'fp32')} | {values} | "
                         f"{r['steps']} | {r['seconds']:.0f} | {r['params']:,} | {r.get('stored', r['params']):,} | "
                         f"{r['budget']:.0f} | {r['date']} |")
        lines.append("")
        lines += [result_line(rows, task, model) for model in dict.fromkeys(r["model"] for r in mine)] + [""]
    path.write_text("\n".join(lines))


def main() -> None:
    global GLUE  # --glue points every row at another copy of the data
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["prompt"], choices=METHODS,
                        help="each runs ours and peft's (--sides); lora is peft's only")
    parser.add_argument("--sides", nargs="+", default=["ours", "peft"], choices=["ours", "peft"])
    parser.add_argument("--budget", type=float, help="training seconds per run (default: 900 smollm2, 600 minilm)")
    parser.add_argument("--glue", default=str(GLUE), help="folder with the original GLUE layout (TASK/train.tsv)")
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--dev-limit", type=int, help="score only the first N dev examples")
    parser.add_argument("--lr", type=float, help="our methods' learning rate instead of the decided one (trials: "
                                                   "write them to another --results file)")
    parser.add_argument("--seed", type=int, default=0, help="our methods' seed (data order, prompt init); trials of "
                                                             "another seed go to another --results file")
    parser.add_argument("--quick", action="store_true", help="SST-2, both models, 30 s each, 200 dev examples")
    parser.add_argument("--results", default=str(ROOT / "docs" / "results.json"),
                        help="rows are merged into this file and docs/results.md is rewritten (not with --quick)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # the fresh heads' load reports, once per row
    GLUE = Path(args.glue)
    if not GLUE.is_dir():
        sys.exit(f"no GLUE data at {GLUE}: this benchmark reads the original GLUE layout (TASK/train.tsv, dev.tsv)")
    if args.quick:
        args.tasks, args.budget, args.dev_limit = ["sst2"], args.budget or 30.0, args.dev_limit or 200
    store = Path(args.results)
    rows = json.loads(store.read_text()) if store.is_file() and not args.quick else []
    for task in args.tasks:
        for model in args.models:
            budget = args.budget or MODELS[model]
            for method, side in ((m, s) for m in args.methods for s in args.sides if (s, m) in ROW_NAMES):
                if side == "peft" and peft is None:
                    print(f"peft is not installed: peft {method} row skipped")
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    if side == "ours":
                        row = ours(method, model, task, budget, args.prompt_length, args.dev_limit, Path(tmp),
                                   args.lr, args.seed)
                    else:
                        try:
                            row = peft_run(method, model, task, budget, args.prompt_length, args.dev_limit)
                        except ValueError as error:  # e.g. peft's prefix tuning on BERT under transformers 5
                            print(f"{ROW_NAMES[side, method]} on {model} failed: {error}", flush=True)
                            continue
                name = ROW_NAMES[side, method]
                row.update(task=task, model=model, method=name, budget=budget, date=time.strftime("%Y-%m-%d"))
                print(json.dumps(row), flush=True)
                rows = [r for r in rows if (r["task"], r["model"], r["method"]) != (task, model, name)] + [row]
    if not args.quick:
        store.write_text(json.dumps(rows, indent=1))
        write_table(rows, store.with_suffix(".md"))
    for task in args.tasks:
        for model in args.models:
            print(result_line(rows, task, model))


if __name__ == "__main__":
    main()
