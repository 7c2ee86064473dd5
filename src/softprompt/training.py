"""The training loop: only the prompt (and head) learn; evaluation, early stopping, best and resumable checkpoints."""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .assets import pools_by_mean
from .checkpoint import read_meta, read_trainer_state, save_checkpoint
from .config import POOLINGS, PromptInit, PromptTuningConfig, TaskType
from .data import Example, Splits, load_data
from .encoding import Feature, collate
from .errors import SoftpromptError
from .metrics import compute_metrics, confusion_matrix
from .pipeline import PromptedTask, default_task_type
from .scoring import label_scores
from .tasks import TaskSpec, get_task
from .tracking import RunLog, parse_report_to, require_trackers

BEST, LAST, RESULTS = "best", "last", "results.json"


@dataclass
class TrainConfig:
    """Every setting of a run; saved in each checkpoint so `--resume` and `eval` need nothing else."""

    model: str = "smollm2-135m"
    data: str = "rotten_tomatoes"
    task: str | None = None  # built-in task spec; inferred from the data when it can be
    task_type: str | None = None  # SEQ_CLS | CAUSAL_LM | SEQ_2_SEQ_LM; by model family when None
    text_columns: list[str] | None = None
    label_column: str | None = None
    template: str | None = None
    verbalizer: list[str] | None = None
    prompt_length: int = 8
    # bottleneck width of the residual MLP over the prompt while training; 0: off; None: by measurement,
    # 64 with a head (+6 points SST-2 dev, minilm-l6, 90 s) and off for label words (-2.5 points, smollm2-135m)
    residual_reparam: int | None = None
    init: str | None = None  # text-to-text: text (the task's instruction) or class_labels; heads: vocab ('.' siamese)
    # encoder heads: cls (pooled [CLS]) | mean (of the text's states) | siamese (pairs apart); None: by measurement,
    # with a mean-pooling sentence-embedding model mean for one text (+3.7 points SST-2 dev, minilm-l6, 90 s) and
    # siamese for a pair (+4.9 MRPC, 600 s; with the cosine head start, STS-B Pearson 0.874 against 0.728); else cls
    pooling: str | None = None
    init_text: str | None = None
    init_file: str | None = None
    # a head's start: cosine (siamese: the pair's cosine fitted to the labels; RTE minilm-l6 600 s: 57.4% against
    # 55.2% from a random head) | fit (a ridge readout of the head's inputs) | random; None: cosine for siamese
    # heads, fit for decoder heads (docs/recipe.md), random for the other encoder heads (as their rows were measured)
    head_init: str | None = None
    loss: str = "rank"  # text-to-text: rank (cross-entropy over label scores) | lm (label-token LM loss, the paper's)
    # auto: balanced where the task is scored by MCC (CoLA: unweighted, both methods settled on the majority class)
    class_weights: str = "auto"  # auto | none | balanced (each class weighted by N / (classes * its count))
    optimizer: str = "adamw"  # adamw | adafactor (the paper's, with lr 0.3)
    # None: 0.3 for adafactor; for adamw 3e-2, but 1e-2 for a decoder's head, whose fitted start the prompt
    # should not outrun (STS-B smollm2-135m 900 s: Pearson 0.778 against 0.691 at 3e-2, docs/recipe.md)
    lr: float | None = None
    # a head's learning rate; None: --lr for encoders, --lr * 0.3 for decoders (3e-3 at their default lr), whose
    # last states are ~8x larger (L1 norm, SmolLM2 vs MiniLM), so each Adam step moves the head's output 8x
    # further (STS-B smollm2-135m 900 s, prompt at 3e-2: head at 3e-3 Pearson 0.64-0.78, at 3e-2 0.515)
    head_lr: float | None = None
    weight_decay: float = 1e-5
    schedule: str = "linear"  # linear | cosine | constant, after warmup
    warmup: float = 0.05  # fraction of the budget (steps or time)
    max_grad_norm: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    eval_batch_size: int = 64
    max_steps: int | None = None
    max_time: float | None = None  # seconds of training
    epochs: float = 1.0  # used when neither max_steps nor max_time is given
    eval_every: int = 40
    patience: int | None = None  # evaluations without dev improvement before stopping
    max_length: int = 128  # input tokens, not counting virtual ones
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 0
    # frozen model in bf16; None: on for time-budgeted decoders with label words on CPUs with AMX bf16 tiles
    bf16: bool | None = None
    output: str = "runs/latest"
    eval_test: bool = True
    baselines: bool = False  # also score the majority class and the untrained prompt on test
    progress: bool = True
    report_to: list[str] = field(default_factory=list)  # trackers besides metrics.jsonl: wandb, tensorboard, ...

    def __post_init__(self) -> None:
        checks = [
            (self.prompt_length > 0, f"prompt length must be > 0, got {self.prompt_length}"),
            (self.residual_reparam is None or self.residual_reparam >= 0,
             "--residual-reparam is a bottleneck width >= 0 (0: off)"),
            (self.loss in ("lm", "rank"), f"loss must be lm or rank, not {self.loss!r}"),
            (self.pooling in (None, *POOLINGS),
             f"--pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}"),
            (self.head_init in (None, "cosine", "fit", "random"),
             f"--head-init must be cosine, fit or random, not {self.head_init!r}"),
            (self.class_weights in ("auto", "none", "balanced"),
             f"--class-weights must be auto, none or balanced, not {self.class_weights!r}"),
            (self.optimizer in ("adamw", "adafactor"), f"optimizer must be adamw or adafactor, not {self.optimizer!r}"),
            (self.schedule in ("linear", "cosine", "constant"), f"unknown schedule {self.schedule!r}"),
            (self.batch_size > 0 and self.grad_accum > 0 and self.eval_batch_size > 0, "batch sizes must be > 0"),
            (self.max_steps is None or self.max_steps > 0, "--max-steps must be > 0"),
            (self.max_time is None or self.max_time > 0, "--max-time must be > 0 seconds"),
            (self.lr is None or self.lr > 0, "--lr must be > 0"),
            (self.head_lr is None or self.head_lr > 0, "--head-lr must be > 0"),
            (self.eval_every > 0, "--eval-every must be > 0"),
            (0 <= self.warmup < 1, "--warmup is a fraction of the budget in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise SoftpromptError(message)
        self.report_to = parse_report_to(self.report_to)


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


class TrainingInterrupted(Exception):
    """Ctrl-C: the state was saved; the message says how to resume."""


def bf16_is_fast() -> bool:
    """CPUs with AMX tiles multiply bf16 matrices about 2.4x faster than fp32 (SmolLM2's MLP shapes, 2 cores);
    without them bf16 saves memory but little time."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def check_writable(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
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
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def load_splits(cfg: TrainConfig) -> Splits:
    task = get_task(cfg.task) if cfg.task else None
    splits = load_data(cfg.data, task, seed=cfg.seed, text_columns=cfg.text_columns, label_column=cfg.label_column)
    if cfg.template:
        splits.task = replace(splits.task, template=cfg.template)  # validated by TaskSpec
    if cfg.verbalizer:
        if len(cfg.verbalizer) != len(splits.task.labels):
            raise SoftpromptError(f"--verbalizer needs {len(splits.task.labels)} label words "
                                  f"({', '.join(splits.task.labels)}), got {len(cfg.verbalizer)}")
        splits.task = replace(splits.task, verbalizer=tuple(cfg.verbalizer))
    splits.train = _subsample(splits.train, cfg.max_train_examples, cfg.seed)
    splits.dev = _subsample(splits.dev, cfg.max_eval_examples, cfg.seed)
    splits.test = _subsample(splits.test, cfg.max_eval_examples, cfg.seed)
    return splits


def prompt_config(cfg: TrainConfig, task_type: TaskType, task: TaskSpec) -> PromptTuningConfig:
    """Defaults by measurement: the task's instruction as text init keeps the zero-shot accuracy of the
    template (class-label and vocabulary inits start far below it with a decoder); heads start from vocab;
    a sentence-embedding model's head reads the mean of one text's states, or compares a pair's two texts,
    whose prompt starts as '.' repeated: punctuation the model passes over, so each text's embedding (and the
    head fitted to the pair's cosine) starts near the model's own (start on RTE dev 61.7% against 56.3% from
    vocabulary, MRPC 73.5% against 71.6%)."""
    pooling = cfg.pooling
    if pooling is None:  # a sentence-embedding model: one text by its mean, a pair compared apart
        fits = task_type is TaskType.SEQ_CLS and pools_by_mean(cfg.model)
        pooling = ("mean" if len(task.fields) == 1 else "siamese") if fits else "cls"
    if task_type is TaskType.SEQ_CLS:
        default_text = "." if pooling == "siamese" else None
    else:
        default_text = task.instruction or None
    default_init = (PromptInit.TEXT if default_text else
                    PromptInit.VOCAB if task_type is TaskType.SEQ_CLS else PromptInit.CLASS_LABELS)
    init = PromptInit(cfg.init) if cfg.init else (PromptInit.FILE if cfg.init_file else
                                                 PromptInit.TEXT if cfg.init_text else default_init)
    return PromptTuningConfig(num_virtual_tokens=cfg.prompt_length, task_type=task_type, init=init,
                              init_text=cfg.init_text or default_text, init_file=cfg.init_file, pooling=pooling,
                              label_words=[w.strip() for w in task.verbalizer] or list(task.labels))


def _class_weights(cfg: TrainConfig, task, train: list[Example], text_to_text: bool) -> torch.Tensor | None:
    """Loss weights N / (classes * count) per class, so a rare class counts as much as a common one: what MCC
    rewards, where unweighted training settled on the majority class."""
    mode = cfg.class_weights
    if mode == "auto":
        mode = "balanced" if task.metrics[0] == "mcc" and not (text_to_text and cfg.loss == "lm") else "none"
    if mode == "none":
        return None
    if task.is_regression:
        raise SoftpromptError("--class-weights balanced needs a classification task; this one is regression")
    if text_to_text and cfg.loss == "lm":
        raise SoftpromptError("--class-weights balanced weights the rank loss or a head; use --loss rank")
    counts = torch.bincount(torch.tensor([e.label for e in train]), minlength=len(task.labels)).float()
    if (counts == 0).any():
        missing = [task.labels[i] for i in (counts == 0).nonzero().flatten().tolist()]
        raise SoftpromptError(f"--class-weights balanced: no training example has label {', '.join(missing)}; "
                              "use --class-weights none")
    return counts.sum() / (len(counts) * counts)


class Trainer:
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
        self.cfg, self.log = cfg, log
        self.output = Path(cfg.output)
        check_writable(self.output)
        require_trackers(cfg.report_to)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.splits = load_splits(cfg)
        task = self.splits.task
        task_type = TaskType(cfg.task_type) if cfg.task_type else default_task_type(cfg.model, task)
        self.prompted = PromptedTask.build(cfg.model, task, prompt_config(cfg, task_type, task), cfg.max_length,
                                           corpus=[" ".join(e.fields.values()) for e in self.splits.train[:5000]],
                                           seed=cfg.seed)
        self.model = self.prompted.model
        self.encoder = self.prompted.encoder
        if cfg.bf16 is None:  # the run's folder records what was chosen; eval and predict follow it
            # bf16 buys steps within a time budget; under a step budget it only cost accuracy (docs/recipe.md)
            label_words = self.model.family == "decoder" and self.encoder.text_to_text
            self.cfg = cfg = replace(cfg, bf16=label_words and cfg.max_time is not None and bf16_is_fast())
        if cfg.bf16:
            self.model.freeze_in(torch.bfloat16)
        reparam = cfg.residual_reparam
        if reparam is None:
            reparam = 64 if task_type is TaskType.SEQ_CLS else 0
        if reparam:
            self.model.prompt.add_reparam(reparam)
        decoder_head = self.model.family == "decoder" and self.model.head is not None
        if cfg.lr is None:  # the run's folder records the lr chosen, so a resumed run keeps it
            self.cfg = cfg = replace(cfg, lr=0.3 if cfg.optimizer == "adafactor" else 1e-2 if decoder_head else 3e-2)
        lr = cfg.lr
        if cfg.head_lr is None and self.model.head is not None:
            self.cfg = cfg = replace(cfg, head_lr=lr * 0.3 if decoder_head else lr)
        siamese = self.model.config.pooling == "siamese"
        if cfg.head_init is not None and self.model.head is None:
            raise SoftpromptError("--head-init starts a classification or regression head; this run trains "
                                  "label words (use --task-type SEQ_CLS for a head)")
        if cfg.head_init == "cosine" and not siamese:
            raise SoftpromptError("--head-init cosine starts a siamese head; use fit or random with other pooling")
        if cfg.head_init is None and self.model.head is not None:
            self.cfg = cfg = replace(cfg, head_init="cosine" if siamese else
                                     "fit" if self.model.family == "decoder" else "random")
        self.optimizer = _optimizer(cfg.optimizer, self._param_groups(lr), lr, cfg.weight_decay)
        self.factor = _lr_factor(cfg.schedule, cfg.warmup)
        self.class_weights = _class_weights(cfg, task, self.splits.train, self.encoder.text_to_text)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "elapsed": 0.0,
                                      "best_metric": None, "best_step": None, "stale_evals": 0}

    def _param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The prompt (and its residual MLP) at `lr`, a head at --head-lr."""
        head = {id(p) for p in self.model.head.parameters()} if self.model.head is not None else set()
        trained = self.model.trainable_parameters()
        groups = [{"params": [p for p in trained if id(p) not in head], "lr": lr}]
        if head:
            groups.append({"params": [p for p in trained if id(p) in head], "lr": self.cfg.head_lr})
        return groups

    # -- bookkeeping --------------------------------------------------------------------------------
    def _meta(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"base_model": self.cfg.model, "task": self.splits.task.to_dict(), "max_length": self.encoder.max_length,
                "training": asdict(self.cfg), "step": self.state["step"], "metrics": metrics or {}}

    def _save_last(self, rng: torch.Tensor | None = None) -> Path:
        rng = torch.get_rng_state() if rng is None else rng
        state = dict(self.state, optimizer=self.optimizer.state_dict(), rng=rng)
        return save_checkpoint(self.output / LAST, self.model, self._meta(), trainer_state=state)

    def resume(self) -> None:
        last = self.output / LAST
        saved = read_trainer_state(last)
        if saved is None:
            raise SoftpromptError(f"nothing to resume in {self.output}: no {LAST}/ checkpoint with trainer state")
        reparam = self.model.prompt.reparam  # the optimizer holds its parameters: load into them, keep them
        self.model.load_prompt(last)  # the head, and the folded prompt
        self.model.prompt.reparam = reparam
        self.model.prompt.load_state_dict(saved.pop("prompt"))  # the prompt as it trains
        self.optimizer.load_state_dict(saved.pop("optimizer"))
        torch.set_rng_state(saved.pop("rng"))
        self.state.update(saved)
        self.log(f"resumed from {last} at step {self.state['step']}")

    def _progress(self) -> float:
        cfg, parts = self.cfg, []
        if cfg.max_steps:
            parts.append(self.state["step"] / cfg.max_steps)
        if cfg.max_time:
            parts.append(self.state["elapsed"] / cfg.max_time)
        if not parts:
            parts.append(self.state["step"] / self.total_steps_per_epochs)
        return max(parts)

    @property
    def total_steps_per_epochs(self) -> int:
        per_epoch = math.ceil(len(self.splits.train) / (self.cfg.batch_size * self.cfg.grad_accum))
        return max(1, int(per_epoch * self.cfg.epochs))

    def _done(self) -> bool:
        return self._progress() >= 1.0

    def evaluate(self, examples: list[Example]) -> dict[str, float]:
        return self.prompted.evaluate(examples, self.cfg.eval_batch_size)

    def _eval_and_keep_best(self) -> dict[str, float]:
        metrics, preds = self.prompted.evaluate_with_predictions(self.splits.dev, self.cfg.eval_batch_size)
        self.state["last_eval_step"] = self.state["step"]
        key = self.splits.task.metrics[0]
        self.run_log.log({"step": self.state["step"], "elapsed": round(self.state["elapsed"], 2),
                          **{f"dev_{k}": v for k, v in metrics.items()}})
        if self.state["best_metric"] is None or metrics[key] > self.state["best_metric"]:
            self.state.update(best_metric=metrics[key], best_step=self.state["step"], stale_evals=0)
            scores: dict[str, Any] = {"dev": metrics}
            if not self.splits.task.is_regression:
                scores["dev_confusion"] = confusion_matrix(preds, [e.label for e in self.splits.dev],
                                                           len(self.splits.task.labels))
            save_checkpoint(self.output / BEST, self.model, self._meta(scores))
        else:
            self.state["stale_evals"] += 1
        return metrics

    # -- the loop -----------------------------------------------------------------------------------
    def _micro_batches(self, features: list[Feature]):
        while True:
            batches = _batches(features, self.cfg.batch_size, self.cfg.seed, self.state["epoch"])
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
        sample = sorted(random.Random(self.cfg.seed).sample(features, min(len(features), 512)), key=len)
        cosine, seen = self.cfg.head_init == "cosine", []
        hook = None if cosine else self.model.readout.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        self.model.eval()
        try:
            for i in range(0, len(sample), self.cfg.eval_batch_size):
                inputs = collate(sample[i:i + self.cfg.eval_batch_size], self.encoder)
                inputs.pop("labels")
                if cosine:
                    u, v = self.model.pair_embeddings(inputs["input_ids"], inputs["attention_mask"],
                                                      inputs["pair_ids"], inputs["pair_mask"])
                    seen.append((u * v).sum(-1))
                else:
                    self.model(**inputs)
        finally:
            if hook is not None:
                hook.remove()
        labels = torch.tensor([f.label for f in sample], dtype=torch.float if self.splits.task.is_regression
                              else torch.long)
        if cosine:
            self.model.start_head_at_cosine(torch.cat(seen).float(), labels)
        else:
            error = self.model.start_head_at_readout(torch.cat(seen).float(), labels)
            self.log(f"head started as a ridge readout of {len(sample)} training rows "
                     f"(held-out squared error {error:.4f})")
        self.model.train()
        self.state["elapsed"] += time.perf_counter() - start

    def loss(self, features: list[Feature]) -> torch.Tensor:
        """Cross-entropy over the label scores (rank loss; a head's log-softmax when classes are weighted),
        or the model's own training loss."""
        if (self.cfg.loss == "rank" and self.encoder.text_to_text) or self.class_weights is not None:
            scores = label_scores(self.model, self.encoder, features).float()
            labels = torch.tensor([f.label for f in features], device=scores.device)
            weight = None if self.class_weights is None else self.class_weights.to(scores.device)
            return torch.nn.functional.cross_entropy(scores, labels, weight=weight)
        return self.model.training_loss(**collate(features, self.encoder))

    def _set_lr(self) -> float:
        factor = self.factor(self._progress())
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.optimizer.param_groups[0]["lr"]

    def train(self) -> TrainResult:
        cfg = self.cfg
        features = self.encoder.encode_all(self.splits.train)
        self.log(f"{self.splits.source}: {len(self.splits.train)} train / {len(self.splits.dev)} dev / "
                 f"{len(self.splits.test)} test; {self.model.family} model {cfg.model}, "
                 f"{self.model.config.task_type.value} in {'bf16' if cfg.bf16 else 'fp32'}, "
                 f"{self.model.num_trainable_parameters():,} trainable parameters")
        key = self.splits.task.metrics[0]
        last_metrics: dict[str, float] = {}
        bar = tqdm(total=cfg.max_steps, initial=self.state["step"], disable=not cfg.progress, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        batches = self._micro_batches(features)
        if self.state["step"] == 0 and cfg.head_init in ("cosine", "fit"):
            self._start_head(features)
        self.model.train()
        loss_ema, interrupted = None, False
        self.run_log = RunLog(self.output, cfg.report_to, name=self.output.name, config=asdict(cfg))
        try:
            while not self._done():
                start = time.perf_counter()
                # where this step starts: a Ctrl-C inside it rolls back to here, so resuming repeats it exactly
                snapshot = (self.state["epoch"], self.state["batch_in_epoch"], torch.get_rng_state())
                lr = self._set_lr()
                total, tokens = 0.0, 0
                for _ in range(cfg.grad_accum):
                    batch = next(batches)
                    tokens += sum(len(f) for f in batch)
                    loss = self.loss(batch) / cfg.grad_accum
                    loss.backward()
                    total += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["step"] += 1
                seconds = time.perf_counter() - start
                self.state["elapsed"] += seconds
                loss_ema = total if loss_ema is None else 0.9 * loss_ema + 0.1 * total
                self.run_log.log({"step": self.state["step"], "loss": total, "lr": lr,
                                  "elapsed": round(self.state["elapsed"], 2), "steps_per_s": round(1 / seconds, 4),
                                  "tokens_per_s": round(tokens / seconds, 1)})
                if self.state["step"] % cfg.eval_every == 0:
                    last_metrics = self._eval_and_keep_best()
                    if cfg.patience is not None and self.state["stale_evals"] >= cfg.patience:
                        self.log(f"early stop: dev {key} has not improved for {cfg.patience} evaluations")
                        break
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.4f}", **({f"dev_{key}": f"{last_metrics[key]:.4f}"}
                                                            if last_metrics else {}))
            if self.state.get("last_eval_step") != self.state["step"]:
                self._eval_and_keep_best()
        except KeyboardInterrupt:
            interrupted = True
            self.optimizer.zero_grad(set_to_none=True)
            self.state["epoch"], self.state["batch_in_epoch"], rng = snapshot
        finally:
            bar.close()
            self.run_log.close()
        last = self._save_last(rng if interrupted else None)
        if interrupted:
            raise TrainingInterrupted(
                f"interrupted at step {self.state['step']}; saved {last}. Resume with: "
                f"softprompt train --resume {self.output}"
            )
        return self._finish()

    def _finish(self) -> TrainResult:
        best = self.output / BEST
        trained = self.model.num_trainable_parameters()  # before loading drops the residual MLP
        self.model.load_prompt(best)
        meta = read_meta(best)
        dev = meta["metrics"]["dev"]  # scored when it became best; dev does not change
        test = self.evaluate(self.splits.test) if self.cfg.eval_test and self.splits.labelled("test") else None
        save_checkpoint(best, self.model, {**meta, "metrics": {**meta["metrics"], "test": test}})
        result = TrainResult(self.output, best, self.state["step"], self.state["elapsed"], dev, test,
                             trained)
        (self.output / RESULTS).write_text(json.dumps({"best_step": self.state["best_step"],
                                                       "steps": self.state["step"],
                                                       "train_seconds": round(self.state["elapsed"], 1),
                                                       "trained_parameters": trained,
                                                       "dev": dev, "test": test,
                                                       "dev_confusion": meta["metrics"].get("dev_confusion")},
                                                      indent=2))
        return result

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


def train(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Run one training job end to end (the API behind `softprompt train`)."""
    if resume:
        meta = read_meta(Path(cfg.output) / LAST)
        training = {**meta["training"], "output": cfg.output, "progress": cfg.progress}
        if training.get("head_init") == "cosine" and meta["prompt"].get("pooling") != "siamese":
            training["head_init"] = None  # saved before `fit` existed, when every run recorded cosine
        if training.get("lr") is None:  # saved before runs recorded their lr: the default then, for every run
            training["lr"] = 0.3 if training.get("optimizer") == "adafactor" else 3e-2
        saved = TrainConfig(**training)
        if cfg.max_steps:
            saved.max_steps = cfg.max_steps
        if cfg.max_time:
            saved.max_time = cfg.max_time
        cfg = saved
    trainer = Trainer(cfg, log)
    baselines = trainer.baselines() if cfg.baselines and not resume else {}
    if resume:
        trainer.resume()
    result = trainer.train()
    result.baselines, result.baseline_split = baselines, trainer.baseline_split
    return result
