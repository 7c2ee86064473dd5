"""The training loop: only the prompt (and head) learn; evaluation, early stopping, best and resumable checkpoints.

Every setting comes from a resolved `RunSpec` (spec.py); the loop decides nothing.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import torch
from tqdm.auto import tqdm
from transformers.optimization import Adafactor

from .assets import describe_model
from .checkpoint import BEST, LAST, RESULTS, TrainerState, load_tensors, read_checkpoint, read_trainer_state
from .data import Example, Splits, load_data
from .devices import activate, fitting_rows, gpu_name, resolve_device, rng_states, set_rng_states, to_device
from .distributed import Ranks, main_process
from .encoding import Feature, collate
from .errors import SoftpromptError
from .metrics import compute_metrics, confusion_matrix
from .models import EncoderPromptModel
from .pipeline import PromptedTask
from .scoring import label_scores, predictions
from .spec import EVAL_SHARE, RunSpec, TrainConfig, resolve
from .tasks import TaskSpec, get_task
from .tracking import NullLog, RunLog, require_trackers, truncate_metrics

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingInterrupted", "train", "load_splits"]


@dataclass
class TrainResult:
    output: Path
    best_checkpoint: Path
    step: int
    seconds: float
    dev: dict[str, float]
    test: dict[str, float] | None
    trained_parameters: int = 0  # what the optimizer updated (a residual MLP included; the checkpoint is smaller)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline_split: str = "test"
    eval_seconds: float = 0.0  # of `seconds`, those spent on dev evaluation


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _silent(message: str) -> None:
    """Where ranks other than the main one log."""


class TrainingInterrupted(Exception):
    """Ctrl-C: the state was saved; the message says how to resume."""


def check_writable(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"  # one per process: ranks probe the same folder
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SoftpromptError(f"cannot write to output folder {output} ({err.strerror}); "
                              "choose another --output") from None


def _subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    return random.Random(seed).sample(examples, limit)


def _batches(features: list[Feature], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within windows of 50 batches, shuffle the batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(features)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(features[i]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _lr_factor(schedule: str, warmup: float) -> Callable[[float], float]:
    def factor(progress: float) -> float:
        if progress < warmup:
            return max(progress / warmup, 1e-3)
        rest = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
        if schedule == "linear":
            return max(0.0, 1 - rest)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * rest))
        return 1.0

    return factor


def _optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adafactor":
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def load_splits(data: str, task: TaskSpec | str | None, seed: int = 0, text_columns=None, label_column=None,
                max_train_examples: int | None = None, max_eval_examples: int | None = None) -> Splits:
    """The run's data: loaded, labels mapped to `task` (inferred when None), train and eval seeded samples."""
    splits = load_data(data, get_task(task) if isinstance(task, str) else task, seed=seed,
                       text_columns=list(text_columns) if text_columns else None, label_column=label_column)
    splits.train = _subsample(splits.train, max_train_examples, seed)
    splits.dev = _subsample(splits.dev, max_eval_examples, seed)
    splits.test = _subsample(splits.test, max_eval_examples, seed)
    return splits


def class_weights(train: list[Example], labels: tuple[str, ...]) -> torch.Tensor:
    """Loss weights N / (classes * count) per class, so a rare class counts as much as a common one."""
    counts = torch.bincount(torch.tensor([e.label for e in train]), minlength=len(labels)).float()
    if (counts == 0).any():
        missing = [labels[i] for i in (counts == 0).nonzero().flatten().tolist()]
        raise SoftpromptError(f"--class-weights balanced: no training example has label {', '.join(missing)}; "
                              "use --class-weights none")
    return counts.sum() / (len(counts) * counts)


class Trainer:
    """The loop over a resolved spec: `prompted` holds the model, `splits` the data (with `spec.task`). Started by a
    launcher, each process is a rank (distributed.py): batches and evaluations are split, gradients summed, and
    the main rank alone writes."""

    def __init__(self, spec: RunSpec, prompted: PromptedTask, splits: Splits,
                 log: Callable[[str], None] = print) -> None:
        self.ranks = Ranks.from_env(spec.fsdp, torch.device(spec.device))
        self.spec, self.prompted, self.splits = spec, prompted, splits
        self.log = log if self.ranks.is_main else _silent
        sharded = self.ranks.shard_backbone(prompted.model.base)
        if sharded:
            self.log(sharded)
        self.output = Path(spec.output)
        self.model, self.encoder = prompted.model, prompted.encoder
        task = splits.task
        if spec.residual_reparam:
            self.model.prompt.add_reparam(spec.residual_reparam)
        self.optimizer = _optimizer(spec.optimizer, self._param_groups(), spec.lr, spec.weight_decay)
        self.factor = _lr_factor(spec.schedule, spec.warmup)
        self.class_weights = class_weights(splits.train, task.labels) if spec.class_weights == "balanced" else None
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # elapsed: the run's seconds so far, dev evaluations included (what --max-time bounds); eval_seconds: theirs
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "elapsed": 0.0,
                                      "eval_seconds": 0.0, "best_metric": None, "best_step": None, "stale_evals": 0,
                                      "last_eval_step": None, "skipped_steps": 0}
        self.eval_cost: float | None = None  # seconds one dev evaluation takes (a timed sample, then the last one)
        self._loss_ema: float | None = None
        self._last_metrics: dict[str, float] = {}
        self._saved_at = 0.0  # when last/ was saved (the seconds clock of --save-every's default)
        self.device = torch.device(spec.device)
        # fp16 frozen weights (a GPU without bf16): the loss scaled so the prompt's small gradients survive them
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=spec.fp16)
        self._step_start: tuple[int, int, dict[str, torch.Tensor]] = (0, 0, rng_states(self.device))

    def _param_groups(self) -> list[dict[str, Any]]:
        """The prompt (and its residual MLP) at --lr, a head at --head-lr."""
        head = {id(p) for p in self.model.head.parameters()} if self.model.head is not None else set()
        trained = self.model.trainable_parameters()
        groups = [{"params": [p for p in trained if id(p) not in head], "lr": self.spec.lr}]
        if head:
            groups.append({"params": [p for p in trained if id(p) in head], "lr": self.spec.head_lr})
        return groups

    # -- bookkeeping --------------------------------------------------------------------------------
    def _save(self, name: str, metrics: dict[str, Any] | None = None,
              rng: dict[str, torch.Tensor] | None = None) -> Path:
        """best/ (with its dev metrics) or last/ (with what --resume needs), one atomic write each."""
        if not all(torch.isfinite(p).all() for p in self.model.trainable_parameters()):
            raise SoftpromptError("the prompt (or head) holds NaN or infinite values; not saved. Lower --lr, or "
                                  "pass --on-nan skip")
        if not self.ranks.is_main:
            return self.output / name
        state = None
        if name == LAST:
            counters = {**self.state, **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {})}
            state = TrainerState(counters, self.optimizer.state_dict(), rng_states(self.device) if rng is None else rng,
                                 self.model.prompt.state_dict())
        return self.prompted.save_pretrained(self.output / name, self.state["step"], metrics, state)

    def resume(self) -> None:
        """Restore exactly what `last/` saved: the prompt module as it trains, the head, optimizer, RNG, counters."""
        last = self.output / LAST
        meta = read_checkpoint(last)
        saved = read_trainer_state(last, meta)
        if saved is None:
            raise SoftpromptError(f"nothing to resume in {self.output}: no {LAST}/ checkpoint with trainer state")
        self.model.load_head(load_tensors(last, meta))
        self.model.prompt.load_state_dict(saved.prompt_module)
        self.optimizer.load_state_dict(saved.optimizer)
        set_rng_states(saved.rng, self.device)
        counters = dict(saved.counters)
        if "scaler" in counters:
            self.scaler.load_state_dict(counters.pop("scaler"))
        self.state.update(counters)
        if self.ranks.is_main:
            truncate_metrics(self.output, self.state["step"])  # what a killed run logged after its last save
        self.log(f"resumed from {last} at step {self.state['step']}")

    def _progress(self) -> float:
        """The share of the budget spent: the largest over the budgets given (whichever ends first). A time budget
        keeps back what the last dev evaluation will take, so that the run ends within it."""
        spec, parts = self.spec, []
        if spec.max_steps:
            parts.append(self.state["step"] / spec.max_steps)
        if spec.max_time:
            parts.append((self.state["elapsed"] + (self.eval_cost or 0.0)) / spec.max_time)
        if spec.epochs:
            parts.append(self.state["step"] / self.total_steps_per_epochs)
        return max(parts)

    @property
    def total_steps_per_epochs(self) -> int:
        per_epoch = math.ceil(len(self.splits.train) / (self.spec.batch_size * self.spec.grad_accum))
        return max(1, int(per_epoch * (self.spec.epochs or 1.0)))

    def _done(self) -> bool:
        return self._progress() >= 1.0

    def evaluate(self, examples: list[Example]) -> dict[str, float]:
        return self.evaluate_with_predictions(examples)[0]

    def evaluate_with_predictions(self, examples: list[Example]) -> tuple[dict[str, float], list]:
        """The task's metrics; with several ranks each scores its shard of the rows and all gather the scores."""
        if self.ranks.world == 1:
            return self.prompted.evaluate_with_predictions(examples, self.spec.eval_batch_size)
        part = self.prompted.scores(self.ranks.even_shard(examples), self.spec.eval_batch_size)
        part = part[:len(self.ranks.shard(examples))]
        preds = predictions(self.ranks.gather_rows(part, len(examples)))
        return compute_metrics(self.splits.task.metrics, preds, [e.label for e in examples]), preds

    def plan_evaluation(self) -> None:
        """Under a time budget, how long one dev evaluation takes (a timed sample of dev rows, scaled by tokens,
        counted in the budget), so that evaluations can be paced and the test scoring announced; said once."""
        if self.eval_cost is not None or not self.spec.max_time:
            return
        start = time.perf_counter()
        rows = random.Random(self.spec.seed).sample(self.splits.dev, min(len(self.splits.dev),
                                                                          2 * self.spec.eval_batch_size))
        self.prompted.scores(rows, self.spec.eval_batch_size)
        seconds = time.perf_counter() - start
        per_token = seconds / max(1, sum(len(f) for f in self.encoder.encode_all(rows)))

        def cost(examples: list[Example]) -> float:
            return per_token * sum(len(f) for f in self.encoder.encode_all(examples)) / self.ranks.world

        self.eval_cost = self.ranks.agree_max(cost(self.splits.dev))
        self.state["elapsed"] = self.ranks.agree_max(self.state["elapsed"] + seconds)
        test = (f"; then the test split ({len(self.splits.test)} rows) is scored, about {_secs(cost(self.splits.test))}"
                if self.spec.eval_test and self.splits.labelled("test") else "")
        self.log(f"time budget: {self.spec.max_time:.0f} s of wall clock, dev evaluation included (one takes about "
                 f"{_secs(self.eval_cost)}; paced to about {EVAL_SHARE:.0%} of the time){test}")

    def _eval_due(self) -> bool:
        """Every --eval-every steps; under a time budget only while evaluations stay within their share of the
        time so far, this one included."""
        if self.state["step"] % self.spec.eval_every:
            return False
        if not self.spec.max_time or self.eval_cost is None:
            return True
        return self.state["eval_seconds"] + self.eval_cost <= EVAL_SHARE * (self.state["elapsed"] + self.eval_cost)

    def _eval_and_keep_best(self, run_log: RunLog | NullLog) -> dict[str, float]:
        """Score dev, keep best/ when it improved; its seconds count in the budget and set the next estimate."""
        start = time.perf_counter()
        metrics = self._score_dev(run_log)
        seconds = self.ranks.agree_max(time.perf_counter() - start)
        self.eval_cost = seconds
        self.state["eval_seconds"] += seconds
        self.state["elapsed"] = self.ranks.agree_max(self.state["elapsed"] + seconds)
        return metrics

    def _score_dev(self, run_log: RunLog | NullLog) -> dict[str, float]:
        metrics, preds = self.evaluate_with_predictions(self.splits.dev)
        self.state["last_eval_step"] = self.state["step"]
        key = self.splits.task.metrics[0]
        run_log.log({"step": self.state["step"], "elapsed": round(self.state["elapsed"], 2),
                     **{f"dev_{k}": v for k, v in metrics.items()}})
        if self.state["best_metric"] is None or metrics[key] > self.state["best_metric"]:
            self.state.update(best_metric=metrics[key], best_step=self.state["step"], stale_evals=0)
            scores: dict[str, Any] = {"dev": metrics}
            if not self.splits.task.is_regression:
                scores["dev_confusion"] = confusion_matrix(preds, [e.label for e in self.splits.dev],
                                                           len(self.splits.task.labels))
            self._save(BEST, scores)
        else:
            self.state["stale_evals"] += 1
        return metrics

    # -- the loop -----------------------------------------------------------------------------------
    def _micro_batches(self, features: list[Feature]) -> Iterator[list[Feature]]:
        while True:
            batches = _batches(features, self.spec.batch_size, self.spec.seed, self.state["epoch"])
            while self.state["batch_in_epoch"] < len(batches):
                idx = batches[self.state["batch_in_epoch"]]
                self.state["batch_in_epoch"] += 1
                yield [features[i] for i in idx]
            self.state["epoch"] += 1
            self.state["batch_in_epoch"] = 0

    @torch.no_grad()
    def _start_head(self, features: list[Feature]) -> None:
        """Set the head before the first step from up to 512 training rows under the starting prompt (the
        seconds count in the training budget): a siamese head at the pair's fitted cosine
        (EncoderPromptModel.start_head_at_cosine), or any head at a ridge readout of what it reads
        (PromptModel.start_head_at_readout)."""
        start = time.perf_counter()
        spec = self.spec
        sample = sorted(random.Random(spec.seed).sample(features, min(len(features), 512)), key=len)
        cosine, seen = spec.head_init == "cosine", []
        # a decoder's head off the shared-prefix engine runs at every position of the left-aligned concat and its
        # model keeps the last column, each row's last real token: that is the row the head reads
        hook = None if cosine else self.model.readout.register_forward_hook(
            lambda m, args, out: seen.append(args[0][:, -1] if args[0].dim() == 3 else args[0]))
        self.model.eval()
        try:
            for i in range(0, len(sample), spec.eval_batch_size):
                inputs = to_device(collate(sample[i:i + spec.eval_batch_size], self.encoder), self.model.device)
                inputs.pop("labels")
                if cosine:
                    encoder = cast(EncoderPromptModel, self.model)
                    u, v = encoder.pair_embeddings(inputs["input_ids"], inputs["attention_mask"], inputs["pair_ids"],
                                                   inputs["pair_mask"])
                    seen.append((u * v).sum(-1))
                else:
                    self.model(**inputs)
        finally:
            if hook is not None:
                hook.remove()
        labels = torch.tensor([f.label for f in sample], dtype=torch.float if self.splits.task.is_regression
                              else torch.long, device=self.model.device)
        if cosine:
            cast(EncoderPromptModel, self.model).start_head_at_cosine(torch.cat(seen).float(), labels)
        else:
            error = self.model.start_head_at_readout(torch.cat(seen).float(), labels)
            self.log(f"head started as a ridge readout of {len(sample)} training rows "
                     f"(held-out squared error {error:.4f})")
        self.model.train()
        self.state["elapsed"] = self.ranks.agree_max(self.state["elapsed"] + time.perf_counter() - start)

    def loss(self, features: list[Feature]) -> torch.Tensor:
        """Cross-entropy over the label scores (rank loss; a head's log-softmax when classes are weighted),
        or the model's own training loss."""
        if (self.spec.loss == "rank" and self.encoder.text_to_text) or self.class_weights is not None:
            scores = label_scores(self.model, self.encoder, features).float()
            labels = torch.tensor([f.label for f in features], device=scores.device)
            weight = None if self.class_weights is None else self.class_weights.to(scores.device)
            return torch.nn.functional.cross_entropy(scores, labels, weight=weight)
        return self.model.training_loss(**to_device(collate(features, self.encoder), self.model.device))

    def _set_lr(self) -> float:
        factor = self.factor(self._progress())
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.optimizer.param_groups[0]["lr"]

    def train(self) -> TrainResult:
        """The loop: say what runs, start the head, then steps until the budget is spent (each one logged, `last/`
        saved on its clocks, dev evaluated when due), a last evaluation, `last/` saved, test scored. Ctrl-C saves
        `last/` as of the step it interrupted and raises `TrainingInterrupted`, which says how to resume."""
        features = self._describe()
        batches = self._micro_batches(features)
        self.plan_evaluation()
        if self.state["step"] == 0 and self.spec.head_init in ("cosine", "fit"):
            self._start_head(features)
        self.model.train()
        self._saved_at = time.monotonic()
        run_log = (RunLog(self.output, list(self.spec.report_to), name=self.output.name, config=self.spec.to_dict())
                   if self.ranks.is_main else NullLog())
        bar = tqdm(total=self.spec.max_steps, initial=self.state["step"], unit="step", dynamic_ncols=True,
                   mininterval=1.0, disable=not (self.spec.progress and self.ranks.is_main))
        rng = None
        try:
            while not self._done():
                self._step(batches, run_log)
                if self._eval_due() and self._evaluate_for_early_stop(run_log):
                    break
                bar.update(1)
                bar.set_postfix(self._postfix)
            if self.state["last_eval_step"] != self.state["step"]:
                self._eval_and_keep_best(run_log)
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            self.state["epoch"], self.state["batch_in_epoch"], rng = self._step_start
        finally:
            bar.close()
            run_log.close()
        last = self._save(LAST, rng=rng)
        if rng is not None:
            raise TrainingInterrupted(f"interrupted at step {self.state['step']}; saved {last}. Resume with: "
                                      f"softprompt train --resume {self.output}")
        return self._finish()

    def _describe(self) -> list[Feature]:
        """The training rows encoded, and what this run is, said once."""
        spec = self.spec
        features = self.encoder.encode_all(self.splits.train)
        for note in self.splits.notes:
            self.log(note)
        if self.encoder.truncated:
            kept = "start and end" if spec.truncation == "head_tail" else "start"
            self.log(f"{self.encoder.truncated} training input(s) longer than --max-length {spec.max_length} were "
                     f"cut to fit, keeping each text's {kept} (--truncation; the template and label slot are kept)")
        self.log(f"{self.splits.source}: {len(self.splits.train)} train / {len(self.splits.dev)} dev / "
                 f"{len(self.splits.test)} test; {self.model.family} model {spec.model}, "
                 f"{spec.task_type.value} in {spec.precision}{'' if spec.device == 'cpu' else ' on ' + spec.device}, "
                 f"{self.model.num_trainable_parameters():,} trainable parameters")
        return features

    def _step(self, batches: Iterator[list[Feature]], run_log: RunLog | NullLog) -> None:
        """One optimizer step over `grad_accum` micro-batches (each rank its share of every one), with its
        bookkeeping: the schedule's rate, a non-finite loss stopped or skipped, the step logged, `last/` saved
        when its clock says."""
        spec, start = self.spec, time.perf_counter()
        # where this step starts: a Ctrl-C inside it rolls back to here, so resuming repeats it exactly
        self._step_start = (self.state["epoch"], self.state["batch_in_epoch"], rng_states(self.device))
        held = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        lr = self._set_lr()
        total, tokens = 0.0, 0
        for _ in range(spec.grad_accum):
            batch = next(batches)
            part = self.ranks.shard(batch)
            tokens += sum(len(f) for f in part)
            try:
                # a rank without rows runs one at weight 0: with a sharded backbone every rank runs every forward
                loss = self.ranks.weighted(self.loss(part or batch[:1]), len(part), len(batch)) / spec.grad_accum
                self.scaler.scale(loss).backward()
            except torch.OutOfMemoryError:
                self._out_of_memory(len(part or batch[:1]), held)
            total += float(loss.detach())
        total = self.ranks.sum_gradients(self.model.trainable_parameters(), total)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), spec.max_grad_norm)
        if self.scaler.is_enabled() and math.isfinite(total):
            self.scaler.step(self.optimizer)  # an overflow at this scale skips the step, and the scale halves
            self.scaler.update()
        elif math.isfinite(total) and math.isfinite(float(norm)):
            self.optimizer.step()
        else:
            self._non_finite(total)
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        seconds = time.perf_counter() - start
        self.state["elapsed"] = self.ranks.agree_max(self.state["elapsed"] + seconds)
        self._loss_ema = total if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * total
        run_log.log({"step": self.state["step"], "loss": total, "lr": lr, "elapsed": round(self.state["elapsed"], 2),
                     "steps_per_s": round(1 / seconds, 4), "tokens_per_s": round(tokens / seconds, 1)})
        if self.state["step"] % spec.save_every == 0 or (
                spec.save_seconds is not None and time.monotonic() - self._saved_at >= spec.save_seconds):
            self._save(LAST)  # a killed run resumes from here
            self._saved_at = time.monotonic()

    def _non_finite(self, total: float) -> None:
        """A NaN or infinite loss or gradient: stop with `last/` as of the step before, or skip the step."""
        if self.spec.on_nan == "stop":
            self.optimizer.zero_grad(set_to_none=True)
            self.state["epoch"], self.state["batch_in_epoch"], rng = self._step_start
            last = self._save(LAST, rng=rng)
            raise SoftpromptError(f"the loss or its gradient is not finite at step {self.state['step'] + 1} "
                                  f"(loss {total}); stopped, {last} holds the step before. Lower --lr, or pass "
                                  "--on-nan skip to skip such steps")
        self.state["skipped_steps"] += 1
        self.log(f"step {self.state['step'] + 1}: loss or gradient not finite, step skipped "
                 f"({self.state['skipped_steps']} so far)")

    def _out_of_memory(self, rows: int, held: int) -> None:
        """Out of (GPU) memory inside a step: `last/` as of the step before, and one line saying what would fit."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state["epoch"], self.state["batch_in_epoch"], rng = self._step_start
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        last = self._save(LAST, rng=rng)
        spec, fit = self.spec, fitting_rows(self.device, rows, held)
        accum = -(-spec.batch_size * spec.grad_accum // fit)
        raise SoftpromptError(f"out of memory on {gpu_name(self.device)} at step {self.state['step'] + 1} with "
                              f"--batch-size {spec.batch_size} ({rows} rows on this process); about {fit} rows fit: "
                              f"--batch-size {fit} --grad-accum {accum} keeps the batch. {last} holds the step "
                              f"before; continue with softprompt train --resume {self.output}")

    def _evaluate_for_early_stop(self, run_log: RunLog | NullLog) -> bool:
        """Evaluate dev (keeping best/); whether --patience says to stop."""
        self._last_metrics = self._eval_and_keep_best(run_log)
        if self.spec.patience is not None and self.state["stale_evals"] >= self.spec.patience:
            self.log(f"early stop: dev {self.splits.task.metrics[0]} has not improved for {self.spec.patience} "
                     "evaluations")
            return True
        return False

    @property
    def _postfix(self) -> dict[str, str]:
        """What the progress bar shows beside the step: the smoothed loss, the last dev score."""
        key = self.splits.task.metrics[0]
        shown = {"loss": f"{self._loss_ema:.4f}"}
        if key in self._last_metrics:
            shown[f"dev_{key}"] = f"{self._last_metrics[key]:.4f}"
        return shown

    def _finish(self) -> TrainResult:
        """Score the best checkpoint on test; the run's summary goes to results.json (the checkpoint keeps
        what it was written with)."""
        best = self.output / BEST
        self.ranks.barrier()  # the main rank has written best/
        trained = self.model.num_trainable_parameters()  # what the optimizer updated, a residual MLP included
        self.model.prompt.fold()  # training is over: the prompt as the model sees it, as checkpoints hold it
        meta = read_checkpoint(best)
        self.model.load_tensors(load_tensors(best, meta))
        dev = meta.metrics["dev"]  # scored when it became best; dev does not change
        test = self.evaluate(self.splits.test) if self.spec.eval_test and self.splits.labelled("test") else None
        summary = {"best_step": self.state["best_step"], "steps": self.state["step"],
                   "train_seconds": round(self.state["elapsed"], 1),
                   "eval_seconds": round(self.state["eval_seconds"], 1), "trained_parameters": trained, "dev": dev,
                   "test": test, "dev_confusion": meta.metrics.get("dev_confusion")}
        if self.ranks.is_main:
            (self.output / RESULTS).write_text(json.dumps(summary, indent=2))
        return TrainResult(self.output, best, self.state["step"], self.state["elapsed"], dev, test, trained,
                           eval_seconds=self.state["eval_seconds"])

    @property
    def baseline_split(self) -> str:
        return "test" if self.splits.labelled("test") else "dev"  # GLUE's test files carry no labels

    def baselines(self) -> dict[str, dict[str, float]]:
        """Metrics of the majority class and of the untrained prompt (for label words: the template with the
        task's instruction as the prompt, i.e. zero-shot), on test, or on dev where test has no labels."""
        examples = getattr(self.splits, self.baseline_split)
        task = self.splits.task
        out: dict[str, dict[str, float]] = {}
        if not task.is_regression:
            majority = Counter(e.label for e in self.splits.train).most_common(1)[0][0]
            out["majority"] = compute_metrics(task.metrics, [majority] * len(examples), [e.label for e in examples])
        out["untrained_prompt"] = self.evaluate(examples)
        return out


def prepare(cfg: TrainConfig, log: Callable[[str], None] = print) -> Trainer:
    """A fresh run: the base model's config read once, the data loaded, every default resolved, the model built."""
    if not main_process():
        log = _silent  # under a launcher the main rank logs
    check_writable(Path(cfg.output))
    require_trackers(cfg.report_to)
    model = describe_model(cfg.model, cfg.trust_remote_code)
    splits = load_splits(cfg.data, cfg.task, cfg.seed, cfg.text_columns, cfg.label_column, cfg.max_train_examples,
                         cfg.max_eval_examples)
    counts = Counter(e.label for e in splits.train) if not splits.task.is_regression else None
    spec = resolve(cfg, model, splits.task,
                   label_counts=[counts[i] for i in range(len(splits.task.labels))] if counts else None)
    if "max_steps" in spec.decided:
        cap = f" or {spec.max_time:.0f} s" if "max_time" in spec.decided else ""
        log(f"budget: {spec.max_steps} steps{cap} (set --max-steps, --max-time or --epochs)")
    return _trainer(spec, splits, log, model)


def prepare_resume(output: str | Path, overrides: dict[str, Any] | None = None,
                   log: Callable[[str], None] = print) -> Trainer:
    """The run in `output` as its last/ checkpoint recorded it (budgets, the device and the progress bar may
    change), with the state restored."""
    if not (Path(output) / LAST).is_dir():
        raise SoftpromptError(f"nothing to resume in {output}: no {LAST}/ checkpoint there (give the run's folder, "
                              "or start it without --resume)")
    spec = read_checkpoint(Path(output) / LAST).spec
    if spec is None:
        raise SoftpromptError(f"{Path(output) / LAST} holds no run spec to resume")
    spec = replace(spec, output=str(output), **(overrides or {}))
    check_writable(Path(spec.output))
    require_trackers(list(spec.report_to))
    splits = load_splits(spec.data, spec.task, spec.seed, spec.text_columns, spec.label_column,
                         spec.max_train_examples, spec.max_eval_examples)
    trainer = _trainer(spec, splits, log)
    trainer.resume()
    return trainer


def _trainer(spec: RunSpec, splits: Splits, log: Callable[[str], None], model=None) -> Trainer:
    splits.task = spec.task
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    corpus = [" ".join(e.fields.values()) for e in splits.train[:5000]]
    activate(torch.device(spec.device), spec.tf32)
    # with --fsdp each process keeps its shard of the backbone before the next one on its machine loads it
    return Ranks.from_env(spec.fsdp, torch.device(spec.device)).in_turns(
        lambda: Trainer(spec, PromptedTask.build(spec, model, corpus), splits, log))


def train(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Run one training job end to end (the API behind `softprompt train`). With `resume`, the run in
    `cfg.output` continues; of `cfg` only `max_steps`, `max_time`, `device` and `progress` apply then."""
    if resume:
        overrides = {k: getattr(cfg, k) for k in ("max_steps", "max_time") if getattr(cfg, k)}
        # the device is this machine's (the device rule), not the one the run started on
        trainer = prepare_resume(cfg.output, {**overrides, "progress": cfg.progress,
                                              "device": str(resolve_device(cfg.device))}, log)
        baselines = {}
    else:
        trainer = prepare(cfg, log)
        trainer.plan_evaluation()  # said before the baselines' scoring, which the budget does not count
        baselines = trainer.baselines() if trainer.spec.baselines else {}
    result = trainer.train()
    result.baselines, result.baseline_split = baselines, trainer.baseline_split
    return result
