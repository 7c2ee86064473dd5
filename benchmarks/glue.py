"""GLUE under one budget: each of softprompt's methods against peft's implementation of the same method, and peft
LoRA, same model, prompt length and budget, train -> dev, side by side in one process.

    python benchmarks/glue.py                                   # SST-2, MRPC, RTE, CoLA, STS-B x both models
    python benchmarks/glue.py --tasks sst2 --models smollm2-135m   # a subset; other rows in the table stay
    python benchmarks/glue.py --methods prompt ptuning prefix lora # every method, ours beside peft's
    python benchmarks/glue.py --methods prefix --sides ours     # our prefix rows only
    python benchmarks/glue.py --seeds 0,1,2                     # three seeds; rows already in results.json are kept
    python benchmarks/glue.py --steps 300                       # step-matched: every row 300 steps, no clock
    python benchmarks/glue.py --quick                           # regression check, under 5 minutes

Two budgets, two tables. Time-matched (the default: 900 s SmolLM2, 600 s MiniLM) is the user's view, what each
system gets in the same time; step-matched (`--steps N`) is the method's view, what each learns from the same
examples. Each row is then scored once on the whole dev set (GLUE's test labels are private). Our rows'
`--max-time` is their run's wall clock (issue 29): it holds back the time of that one dev evaluation (estimated
from a timed sample first), about 3% of 900 s on SST-2, which peft's rows, training for the whole budget before
they are scored, do not spend. Our rows are `softprompt train` with its defaults and `--method`.

peft rows run at their best beside ours: the frozen model in the precision the resolver picks for our row of the
same task and budget (bf16 where the timed probe says it pays; peft's adapters stay fp32, as peft keeps them), at
our row's batch size, with the loss peft's users get (transformers' own) and AdamW with linear decay and no
warmup at the learning rate of peft's own examples for the method (prompt tuning 3e-2, P-tuning 1e-3, prefix
tuning 1e-2, LoRA 5e-4); decoders learn the label word with the LM loss (prompt tuning from a text init),
encoders a classifier head from peft's random init; decoder rows are right-padded and read at each row's last
real token.

Rows are kept in docs/results.json (one per task, model, method, budget and seed), and docs/results.md is written
beside it: the mean and standard deviation over seeds where a row has several, and a comparison that calls a
difference real only where the means differ by more than both deviations. A row already in results.json is not
run again (`--rerun` runs it anyway), so a long table fills over several sittings.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from softprompt.assets import describe_model, load_backbone, resolve_model
from softprompt.checkpoint import read_checkpoint
from softprompt.config import TaskType
from softprompt.data import Example, Splits
from softprompt.encoding import TaskEncoder, collate, pad
from softprompt.metrics import compute_metrics
from softprompt.spec import resolve
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
METHODS = ("prompt", "ptuning", "prefix", "lora")  # lora: peft's only
ROW_NAMES = {("ours", "prompt"): "softprompt", ("ours", "ptuning"): "softprompt P-tuning",
             ("ours", "prefix"): "softprompt prefix", ("peft", "prompt"): "peft prompt tuning",
             ("peft", "ptuning"): "peft P-tuning", ("peft", "prefix"): "peft prefix tuning",
             ("peft", "lora"): "peft LoRA r=8 q,v"}
PEFT_LR = {"prompt": 3e-2, "ptuning": 1e-3, "prefix": 1e-2, "lora": 5e-4}  # peft's examples for each method
LORA_TARGETS = {"smollm2-135m": ["q_proj", "v_proj"], "minilm-l6": ["query", "value"]}
# rows since issue 33: peft at our row's precision and batch size, and a seed and budget kind in every row; the
# table shows a group's rows of the newest format only, so older single runs give way as new ones land
ROW_FORMAT = 2
RAW_METRICS = ("pearson", "spearman", "mcc")  # shown as they are; the others as percentages
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Budget:
    """What every row of one table trains for: seconds (time-matched) or optimizer steps (step-matched)."""
    kind: str  # "time" or "steps"
    amount: float

    def spent(self, seconds: float, steps: int) -> float:
        """The share of the budget used so far (peft's learning-rate decay reads it)."""
        return (seconds if self.kind == "time" else steps) / self.amount

    def heading(self) -> str:
        return (f"time-matched, {self.amount:.0f} s of training" if self.kind == "time"
                else f"step-matched, {self.amount:.0f} steps")


def task_type(model: str, task) -> TaskType:
    """Encoders and regression train a head; the decoder classifies by its label words."""
    return TaskType.SEQ_CLS if model == "minilm-l6" or task.is_regression else TaskType.CAUSAL_LM


def train_config(method: str, model: str, task_name: str, budget: Budget, prompt_length: int,
                 dev_limit: int | None, seed: int, out: Path, lr: float | None = None) -> TrainConfig:
    """Our row's settings; peft's row of the same task reads its precision and batch size off their resolution."""
    task = get_task(task_name)
    limit = {"max_time": budget.amount} if budget.kind == "time" else {"max_steps": int(budget.amount)}
    return TrainConfig(model=model, data=str(GLUE / task.glue_folder), task=task_name, method=method,
                       task_type=task_type(model, task).value, prompt_length=prompt_length, eval_every=10**9,
                       eval_test=False, max_eval_examples=dev_limit, progress=False, output=str(out), lr=lr,
                       seed=seed, **limit)


def ours(cfg: TrainConfig) -> dict:
    result = train(cfg, log=lambda _: None)
    spec = read_checkpoint(Path(cfg.output) / "best").spec
    return {"metrics": result.dev, "steps": result.step, "seconds": result.seconds,
            "params": result.trained_parameters, "stored": _stored(Path(cfg.output) / "best"),
            "precision": spec.precision, "batch_size": spec.batch_size}


def _stored(checkpoint: Path) -> int:
    """Parameters in the checkpoint: a training reparameterisation is folded into the prompt at save."""
    from safetensors.torch import load_file

    return sum(t.numel() for f in checkpoint.glob("*.safetensors") for t in load_file(str(f)).values())


@dataclass
class PeftRun:
    """A trained peft model and what scoring it needs."""
    net: torch.nn.Module
    encoder: TaskEncoder
    kind: TaskType
    splits: Splits
    row: dict  # steps, seconds, parameters, precision and batch size

    def score(self, examples: list[Example]) -> dict[str, float]:
        """The task's metrics on labelled `examples` (the dev split, or another set of the same labels)."""
        return compute_metrics(self.encoder.task.metrics, _peft_predict(self.net, self.encoder, examples, self.kind),
                               [e.label for e in examples])


def peft_run(method: str, cfg: TrainConfig, budget: Budget) -> dict:
    """peft's `method` trained as its users do, for the budget, scored on the dev split."""
    run = peft_train(method, cfg, budget)
    return {"metrics": run.score(run.splits.dev), **run.row}


def peft_train(method: str, cfg: TrainConfig, budget: Budget) -> PeftRun:
    """peft's `method` trained as its users do, for the budget, at the precision and batch size the resolver
    picks for our row of the same settings `cfg`."""
    task = get_task(cfg.task)
    kind = task_type(cfg.model, task)
    info = describe_model(cfg.model)
    spec = resolve(cfg, info, task)
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(info, kind, num_labels=max(len(task.labels), 1), regression=task.is_regression)
    # the same train/dev examples as our row (the same seed's split, the same --dev-limit subset)
    splits = load_splits(cfg.data, cfg.task, cfg.seed, max_eval_examples=cfg.max_eval_examples)
    encoder = TaskEncoder(backbone.tokenizer, task, kind, spec.max_length)
    net = peft.get_peft_model(backbone.model, _peft_config(method, cfg.model, task, kind, cfg.prompt_length))
    params = [p for p in net.parameters() if p.requires_grad]
    trained = {id(p) for p in params}
    for param in net.parameters():  # the frozen weights in our row's precision; peft's adapters stay fp32
        if id(param) not in trained:
            param.data = param.data.to(DTYPES[spec.precision])
    lr = PEFT_LR[method]
    optimizer = torch.optim.AdamW(params, lr=lr)
    features = encoder.encode_all(splits.train)
    rng = torch.Generator().manual_seed(cfg.seed)
    order, cursor, steps, elapsed = torch.randperm(len(features), generator=rng).tolist(), 0, 0, 0.0
    net.train()
    while budget.spent(elapsed, steps) < 1:
        start = time.perf_counter()
        if cursor + spec.batch_size > len(order):
            order, cursor = torch.randperm(len(features), generator=rng).tolist(), 0
        inputs = _peft_batch([features[i] for i in order[cursor:cursor + spec.batch_size]], encoder, kind)
        cursor += spec.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr * max(0.0, 1 - budget.spent(elapsed, steps))
        net(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        elapsed += time.perf_counter() - start
    count = sum(p.numel() for p in params)
    return PeftRun(net, encoder, kind, splits, {"steps": steps, "seconds": elapsed, "params": count, "stored": count,
                                                "precision": spec.precision, "batch_size": spec.batch_size})


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


def row_key(row: dict) -> tuple:
    """What one run is: task, model, method, budget and seed (rows before issue 33 were seed 0, time-matched)."""
    return (row["task"], row["model"], row["method"], row.get("match", "time"), row["budget"], row.get("seed", 0))


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by task, model, method and budget: each group's seeds, of the newest row format present."""
    found: dict[tuple, list[dict]] = {}
    for row in rows:
        found.setdefault(row_key(row)[:5], []).append(row)
    newest = {key: max(r.get("format", 1) for r in members) for key, members in found.items()}
    return {key: sorted((r for r in members if r.get("format", 1) == newest[key]), key=lambda r: r.get("seed", 0))
            for key, members in found.items()}


def spread(members: list[dict], metric: str) -> tuple[float, float | None]:
    """Mean over seeds and the sample standard deviation (None for a single run)."""
    values = [m["metrics"][metric] for m in members]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(mean: float, sd: float | None, metric: str) -> str:
    scale, digits = (1, 4) if metric in RAW_METRICS else (100, 2)
    return f"{scale * mean:.{digits}f}" + ("" if sd is None else f" ± {scale * sd:.{digits}f}")


def verdict(a: str, b: str, first: list[dict], second: list[dict], metric: str) -> str:
    """Whether `a` beats `b`: only where both ran several seeds and the means differ by more than both standard
    deviations; otherwise the line says why no winner is named."""
    (mean_a, sd_a), (mean_b, sd_b) = spread(first, metric), spread(second, metric)
    seeds = f"{len(first)} and {len(second)} seeds"
    unit = metric if metric in RAW_METRICS else f"points of {metric}"
    if sd_a is None or sd_b is None:
        return f"{a} against {b}: no claim, single runs ({seeds})"
    gap = mean_a - mean_b
    if abs(gap) > max(sd_a, sd_b):
        winner, loser = (a, b) if gap > 0 else (b, a)
        return (f"{winner} beats {loser} by {_cell(abs(gap), None, metric)} {unit} ({seeds}; the gap exceeds both "
                f"deviations, {_cell(sd_a, None, metric)} and {_cell(sd_b, None, metric)})")
    return (f"{a} against {b}: within one seed's spread ({seeds}; gap {_cell(gap, None, metric)} {unit}, "
            f"deviations {_cell(sd_a, None, metric)} and {_cell(sd_b, None, metric)}): no winner")


def result_line(rows: list[dict], task: str, model: str, match: str = "time") -> str:
    """One line per task, model and budget kind: every method's first metric (the mean over its seeds), ours as
    `<method>`, peft's as `peft_<method>`."""
    metric = get_task(task).metrics[0]
    keys = {name: ("" if side == "ours" else "peft_") + method for (side, method), name in ROW_NAMES.items()}
    mine = {key: members for key, members in groups(rows).items()
            if key[:2] == (task, model) and key[3] == match}
    values = " ".join(f"{keys[key[2]]}={_fmt(spread(members, metric)[0])}" for key, members in mine.items()
                      if key[2] in keys)
    budgets = "/".join(f"{b:.0f}" for b in dict.fromkeys(key[4] for key in mine))
    unit = "budget_s" if match == "time" else "budget_steps"
    return f"RESULT task={task} model={model} metric={metric} {values} {unit}={budgets}"


def _fmt(value: float | None) -> str:
    return "na" if value is None or math.isnan(value) else f"{value:.4f}"


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["# GLUE under one budget: softprompt vs peft", "",
             "Written by `python benchmarks/glue.py` from docs/results.json (each row: the command's settings, "
             "the dates it ran). Train -> dev, 2 CPU cores. Two tables per task where both ran: time-matched (the "
             "user's view: what each system gets in the same seconds of training) and step-matched (`--steps N`, "
             "the method's view: what each learns from the same examples). A metric is the mean ± the standard "
             "deviation over the seeds in `seeds`; a row of one seed is a single run, and no comparison names a "
             "winner from single runs or where the means differ by less than either deviation. Precision is the "
             "frozen model's (the prompt and peft's adapters always train in fp32); since issue 33 (format 2) "
             "peft's rows run at the precision and batch size the resolver picks for ours, while older rows "
             "(format 1, peft in fp32) stand until their group is rerun. SST-2 rows run since 2026-12-02 read its "
             "sentences as natural text, the earlier ones as Treebank tokens (recipe.md). The machine's speed "
             "varies by day, so compare steps within one date. How the recipe was chosen, and the targets: "
             "[recipe.md](recipe.md).", ""]
    names = list(ROW_NAMES.values())
    grouped = dict(sorted(groups(rows).items(), key=lambda item: (list(MODELS).index(item[0][1]), item[0][4],
                                                                  names.index(item[0][2]))))
    for task in TASKS:
        metric_names = get_task(task).metrics
        for match in ("time", "steps"):
            mine = {key: members for key, members in grouped.items() if key[0] == task and key[3] == match}
            if not mine:
                continue
            lines += [f"## {task}, {'time' if match == 'time' else 'step'}-matched", "",
                      "| model | method | budget | precision | batch | " + " | ".join(metric_names) +
                      " | seeds | steps | train s | trained params | stored params | format | ran |",
                      "|---|---|---|---|---|" + "---|" * (len(metric_names) + 7)]
            for (_, model, method, _, budget), members in mine.items():
                values = " | ".join(_cell(*spread(members, m), m) for m in metric_names)
                first = members[0]
                unit = "s" if match == "time" else "steps"
                lines.append(
                    f"| {model} | {method} | {budget:.0f} {unit} | {first.get('precision', 'fp32')} | "
                    f"{first.get('batch_size', '')} | {values} | {', '.join(str(m.get('seed', 0)) for m in members)}"
                    f" | {statistics.fmean(m['steps'] for m in members):.0f} | "
                    f"{statistics.fmean(m['seconds'] for m in members):.0f} | {first['params']:,} | "
                    f"{first.get('stored', first['params']):,} | {first.get('format', 1)} | "
                    f"{', '.join(dict.fromkeys(m['date'] for m in members))} |")
            lines.append("")
            for model in dict.fromkeys(key[1] for key in mine):
                lines += _verdicts(mine, model, metric_names[0])
                lines.append(result_line(rows, task, model, match))
            lines.append("")
    path.write_text("\n".join(lines))


def _verdicts(mine: dict[tuple, list[dict]], model: str, metric: str) -> list[str]:
    """Our best method (by mean) against each peft row of the same model and budget."""
    ours_ = {key: m for key, m in mine.items() if key[1] == model and not key[2].startswith("peft")}
    theirs = {key: m for key, m in mine.items() if key[1] == model and key[2].startswith("peft")}
    if not ours_ or not theirs:
        return []
    best = max(ours_, key=lambda key: spread(ours_[key], metric)[0])
    return [f"- {verdict(best[2], key[2], ours_[best], members, metric)}" for key, members in theirs.items()] + [""]


def main() -> None:
    global GLUE  # --glue points every row at another copy of the data
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["prompt"], choices=METHODS,
                        help="each runs ours and peft's (--sides); lora is peft's only")
    parser.add_argument("--sides", nargs="+", default=["ours", "peft"], choices=["ours", "peft"])
    parser.add_argument("--budget", type=float, help="training seconds per run (default: 900 smollm2, 600 minilm)")
    parser.add_argument("--steps", type=int, help="step-matched: every row trains this many optimizer steps, "
                                                   "with no clock (replaces --budget)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (data order, prompt and adapter "
                                                      "init), each a row of its own: 0,1,2")
    parser.add_argument("--rerun", action="store_true", help="run rows already in --results again")
    parser.add_argument("--glue", default=str(GLUE), help="folder with the original GLUE layout (TASK/train.tsv)")
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--dev-limit", type=int, help="score only the first N dev examples")
    parser.add_argument("--lr", type=float, help="our methods' learning rate instead of the decided one (trials: "
                                                   "write them to another --results file)")
    parser.add_argument("--quick", action="store_true", help="SST-2, both models, 30 s each, 200 dev examples")
    parser.add_argument("--results", default=str(ROOT / "docs" / "results.json"),
                        help="rows are merged into this file and docs/results.md is rewritten (not with --quick)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # the fresh heads' load reports, once per row
    GLUE = Path(args.glue)
    if not GLUE.is_dir():
        sys.exit(f"no GLUE data at {GLUE}: this benchmark reads the original GLUE layout (TASK/train.tsv, dev.tsv)")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1,2")
    if args.quick:
        args.tasks, args.budget, args.dev_limit = ["sst2"], args.budget or 30.0, args.dev_limit or 200
    store = Path(args.results)
    rows = json.loads(store.read_text()) if store.is_file() and not args.quick else []
    for task in args.tasks:
        for model in args.models:
            budget = Budget("steps", args.steps) if args.steps else Budget("time", args.budget or MODELS[model])
            for seed in seeds:
                for method, side in ((m, s) for m in args.methods for s in args.sides if (s, m) in ROW_NAMES):
                    rows = run_row(rows, side, method, model, task, budget, seed, args)
                    if not args.quick:  # every row kept as it lands: a stopped sitting loses one run at most
                        store.write_text(json.dumps(rows, indent=1))
                        write_table(rows, store.with_suffix(".md"))
    for task in args.tasks:
        for model in args.models:
            print(result_line(rows, task, model, "steps" if args.steps else "time"))


def run_row(rows: list[dict], side: str, method: str, model: str, task: str, budget: Budget, seed: int,
            args: argparse.Namespace) -> list[dict]:
    """One row run (unless results.json holds it already at this format) and put in `rows`."""
    name = ROW_NAMES[side, method]
    key = (task, model, name, budget.kind, budget.amount, seed)
    if not args.rerun and any(row_key(r) == key and r.get("format", 1) == ROW_FORMAT for r in rows):
        print(f"kept: {name} on {task}, {model}, {budget.heading()}, seed {seed} (in {args.results})", flush=True)
        return rows
    if side == "peft" and peft is None:
        print(f"peft is not installed: {name} row skipped")
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        # a peft row is set up as our row of its method (LoRA, ours as our default method): precision, batch size
        cfg = train_config("prompt" if method == "lora" else method, model, task, budget, args.prompt_length,
                           args.dev_limit, seed, Path(tmp), args.lr if side == "ours" else None)
        if side == "ours":
            row = ours(cfg)
        else:
            try:
                row = peft_run(method, cfg, budget)
            except ValueError as error:  # e.g. peft's prefix tuning on BERT under transformers 5
                print(f"{name} on {model} failed: {error}", flush=True)
                return rows
    row.update(task=task, model=model, method=name, match=budget.kind, budget=budget.amount, seed=seed,
               format=ROW_FORMAT, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(row), flush=True)
    return [r for r in rows if row_key(r) != key] + [row]


if __name__ == "__main__":
    main()
