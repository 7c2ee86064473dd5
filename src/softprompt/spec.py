"""What the user said (`TrainConfig`) and what a run does (`RunSpec`), and the one function between them.

`TrainConfig` holds the user's words: `None` means "decide for me". `resolve` decides every such default in
one place, from the task and the base model's config (read once, `assets.describe_model`), and returns a
frozen `RunSpec` that the trainer, `PromptedTask`, the CLI and `sweep` read; each default it decides is
recorded in `RunSpec.decided` with a one-line reason. The measurements behind the reasons live in
docs/recipe.md, section "Defaults".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
import types
import typing
from typing import Any, Callable

import torch

from . import precision
from .assets import ModelInfo
from .devices import DEVICE_HELP, gpu_name, gpu_supports_bf16, resolve_device
from .config import POOLINGS, TRUNCATIONS, PromptInit, PromptTuningConfig, TaskType
from .errors import SoftpromptError
from .families import check_pooling, check_prompt_length, check_task_type
from .methods import get_method, method_names, methods
from .methods.ptuning.config import ENCODER_TYPES
from .options import option
from .tasks import TASKS, TaskSpec, label_instruction
from .tracking import parse_report_to

RECIPE = "docs/recipe.md#defaults"
CUSTOM = "docs/recipe.md#custom-data"
SKEW = 3  # classes count as imbalanced when the largest has this many times the smallest's training rows
CUSTOM_STEPS, CUSTOM_SECONDS = (80, 400), 300.0  # the default budget for a user's data: one epoch within these
LOSSES, CLASS_WEIGHTS, HEAD_INITS = ("rank", "lm"), ("auto", "none", "balanced"), ("cosine", "fit", "random")
OPTIMIZERS, SCHEDULES = ("adamw", "adafactor"), ("linear", "cosine", "constant")
EVAL_SHARE = 0.1  # under --max-time, dev evaluations take about this share of it (docs/recipe.md#defaults)


@dataclass
class TrainConfig:
    """Every setting of a run as the user gave it; `None` means "decide for me" (see `resolve`)."""

    model: str = option("smollm2-135m", "built-in name (smollm2-135m, minilm-l6), hub id or local folder")
    trust_remote_code: bool = option(False, "let a hub model run the code in its repository (only for one you trust)",
                                   flag="--trust-remote-code")
    data: str = option("rotten_tomatoes", "built-in dataset, CSV/TSV/JSONL file, folder (GLUE layout), or hub name "
                                        "such as glue/sst2")
    task: str | None = option(None, "built-in task spec (sst2, mrpc, rte, ...); inferred from the data when possible")
    task_type: str | None = option(None, "SEQ_CLS (head), CAUSAL_LM or SEQ_2_SEQ_LM (label words); default: a head "
                                       "for encoders, regression and a decoder on a user's file, label words "
                                       "otherwise")
    text_columns: list[str] | None = option(None, "input column(s) of a file, in the task's field order (repeat)",
                                          flag="--text-column")
    label_column: str | None = option(None, "label column of a file")
    template: str | None = option(None, "text-to-text template with {field} slots and an optional {label} slot "
                                      "(default: the task's; the label follows the template)")
    verbalizer: list[str] | None = option(None, "label word per label, in label order (repeat)")
    prompt_length: int = option(8, "number of virtual tokens k")
    method: str | None = option(None, lambda: " | ".join(f"{m.name} ({m.summary})" for m in methods()) +
                              "; default prompt")
    encoder_reparameterization_type: str = option("MLP", "ptuning's prompt encoder: MLP | LSTM")
    encoder_hidden_size: int | None = option(None, "ptuning's encoder / the prefix projection's hidden width "
                                                 "(default: the model's width)")
    encoder_num_layers: int = option(2, "ptuning LSTM layers")
    encoder_dropout: float = option(0.0, "ptuning LSTM dropout")
    prefix_projection: bool = option(False, "prefix: train through an Embedding -> Linear-Tanh-Linear MLP, folded "
                                          "into plain keys/values at save",
                                   flag="--prefix-projection/--no-prefix-projection")
    residual_reparam: int | None = option(None, "train the prompt through a residual MLP with this bottleneck width, "
                                              "folded into a plain prompt at save (0: off; default 64 with a "
                                              "head, off for label words)")
    init: str | None = option(None, "random | vocab | class_labels | text | file (default: the task's instruction "
                                  "as text for label words, vocab for heads, '.' for siamese heads)")
    init_text: str | None = option(None, "text whose token embeddings start the prompt")
    init_file: str | None = option(None, "checkpoint folder, peft adapter folder or prompt .safetensors to start from")
    pooling: str | None = option(None, "how a head reads the model: cls (the model's own: an encoder's pooled [CLS], "
                                     "a decoder's last token) | mean (of the text's final states) | siamese "
                                     "(encoder pairs: each text mean-pooled apart, the head reads u, v, |u-v| and "
                                     "u*v) | last_mean (decoders: the last token's state and the mean, side by "
                                     "side) (default with a mean-pooling sentence-embedding model: mean for one "
                                     "text, siamese for a pair; a decoder's head on a user's file: last_mean; "
                                     "else cls)")
    head_init: str | None = option(None, "a head's start: cosine (siamese heads: the pair's cosine fitted to the "
                                       "training labels) | fit (a ridge readout of the head's inputs on 512 "
                                       "training rows) | random (default: cosine for siamese heads, fit for "
                                       "decoder heads, else random)")
    loss: str | None = option(None, "text-to-text loss: rank (cross-entropy over the label strings' scores; the "
                                  "default) | lm (LM loss on the label tokens, the paper's)")
    class_weights: str = option("auto", "none | balanced (each class's loss weighted by N / (classes * count)) | "
                                      "auto (balanced for tasks scored by MCC)")
    optimizer: str = option("adamw", "adamw | adafactor (the paper's)")
    lr: float | None = option(None, "learning rate (default 3e-2 adamw, 1e-2 for a decoder's head or prefix, 1e-3 "
                                  "through P-tuning's encoder; 0.3 adafactor)")
    head_lr: float | None = option(None, "a head's learning rate (default: --lr for encoders, --lr * 0.3 for "
                                       "decoders)")
    weight_decay: float = option(1e-5, "AdamW/Adafactor weight decay")
    schedule: str = option("linear", "linear | cosine | constant after warmup")
    warmup: float = option(0.05, "warmup as a fraction of the budget (steps or time)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    batch_size: int = option(16, "training batch size")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    eval_batch_size: int = option(64, "evaluation batch size")
    max_steps: int | None = option(None, "optimizer-step budget (80 when no budget is given)")
    max_time: float | None = option(None, "wall-clock budget in seconds for training and dev evaluation (evaluations "
                                        "paced to about 10% of it); the test scoring after it is announced with "
                                        "its time")
    epochs: float | None = option(None, "epoch budget")
    eval_every: int = option(40, "evaluate on dev every N steps")
    patience: int | None = option(None, "stop after N evaluations without dev improvement")
    max_length: int = option(128, "max input tokens (virtual tokens not counted)")
    truncation: str | None = option(None, "how a text longer than --max-length is cut: head (keep its start) | "
                                        "head_tail (keep its start and its end, cut the middle) (default: "
                                        "head_tail for a user's file, head for a built-in task)")
    max_train_examples: int | None = option(None, "train on a seeded sample of this many examples")
    max_eval_examples: int | None = option(None, "evaluate on a seeded sample of this many examples")
    seed: int = option(0, "seed of the data order, sampling and prompt init")
    device: str = option("auto", f"where the run computes: {DEVICE_HELP}")
    bf16: bool | None = option(None, "the frozen model's weights and activations in bf16 (prompt and head train in "
                                   "fp32); default: on a GPU, bf16 where it supports it (fp16 with loss scaling "
                                   "where not); on a CPU, bf16 under --max-time for decoders with label words (and "
                                   "a decoder on a user's file under its default time cap) where a timed probe "
                                   "finds bf16 fast, else fp32",
                                flag="--bf16/--fp32")
    output: str = option("runs/latest", "run folder: best/ and last/ checkpoints, metrics.jsonl")
    save_every: int | None = option(None, "also save last/ (for --resume) every N steps; by default every 50 steps "
                                        "and every 60 s, so a killed run loses little")
    on_nan: str = option("stop", "a NaN or infinite loss: stop (with last/ as of the step before) | skip the step")
    eval_test: bool = option(True, "score the best checkpoint on test at the end")
    # the CLI prints these beside the trained prompt's result; the API leaves the extra scoring to the caller
    baselines: bool = option(False, "also score the majority class and the untrained prompt on test",
                           cli_default=True)
    progress: bool = option(True, "progress bar")
    report_to: list[str] = option(list, "trackers besides metrics.jsonl, comma-separated: "
                                      "wandb,tensorboard,trackio,mlflow", cli_type=str)
    fsdp: bool = option(False, "under a launcher, shard the frozen model's layers across the processes (FSDP2; also on "
                             "when accelerate launch runs an FSDP config); docs/distributed.md", flag="--fsdp")

    def __post_init__(self) -> None:
        checks = [
            (self.prompt_length > 0, f"prompt length must be > 0, got {self.prompt_length}"),
            (self.residual_reparam is None or self.residual_reparam >= 0,
             "--residual-reparam is a bottleneck width >= 0 (0: off)"),
            (self.method is None or self.method in method_names(),
             f"--method must be one of {', '.join(method_names())}, not {self.method!r}"),
            (self.encoder_reparameterization_type.upper() in ENCODER_TYPES,
             f"--encoder-reparameterization-type must be MLP or LSTM, not {self.encoder_reparameterization_type!r}"),
            (self.loss in (None, *LOSSES), f"--loss must be lm or rank, not {self.loss!r}"),
            (self.pooling in (None, *POOLINGS),
             f"--pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}"),
            (self.truncation in (None, *TRUNCATIONS),
             f"--truncation must be one of {', '.join(TRUNCATIONS)}, not {self.truncation!r}"),
            (self.head_init in (None, *HEAD_INITS),
             f"--head-init must be cosine, fit or random, not {self.head_init!r}"),
            (self.class_weights in CLASS_WEIGHTS,
             f"--class-weights must be auto, none or balanced, not {self.class_weights!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be adamw or adafactor, not {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}"),
            (self.batch_size > 0 and self.grad_accum > 0 and self.eval_batch_size > 0, "batch sizes must be > 0"),
            (self.max_steps is None or self.max_steps > 0, "--max-steps must be > 0"),
            (self.max_time is None or self.max_time > 0, "--max-time must be > 0 seconds"),
            (self.epochs is None or self.epochs > 0, "--epochs must be > 0"),
            (self.lr is None or self.lr > 0, "--lr must be > 0"),
            (self.head_lr is None or self.head_lr > 0, "--head-lr must be > 0"),
            (self.eval_every > 0, "--eval-every must be > 0"),
            (0 <= self.warmup < 1, "--warmup is a fraction of the budget in [0, 1)"),
            (self.save_every is None or self.save_every > 0, "--save-every must be > 0 steps"),
            (self.on_nan in ("stop", "skip"), f"--on-nan must be stop or skip, not {self.on_nan!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SoftpromptError(message)
        self.report_to = parse_report_to(self.report_to)


@dataclass(frozen=True)
class RunSpec:
    """A run with every default decided: what the trainer runs, what a checkpoint records, what `eval` and
    `predict` rebuild. `decided` maps each field that `resolve` chose (rather than the user) to why."""

    model: str
    trust_remote_code: bool
    family: str  # encoder | decoder | seq2seq
    task: TaskSpec  # template and verbalizer as used
    prompt: PromptTuningConfig  # length, init, pooling, label words, task type
    data: str
    text_columns: tuple[str, ...] | None
    label_column: str | None
    max_train_examples: int | None
    max_eval_examples: int | None
    seed: int
    max_length: int  # input tokens, fitted to the model's positions beside the prompt
    residual_reparam: int  # 0: off
    head_init: str | None  # None: no head
    loss: str
    class_weights: str  # none | balanced
    optimizer: str
    lr: float
    head_lr: float | None  # None: no head
    weight_decay: float
    schedule: str
    warmup: float
    max_grad_norm: float
    batch_size: int
    grad_accum: int
    eval_batch_size: int
    max_steps: int | None
    max_time: float | None
    epochs: float | None
    eval_every: int
    patience: int | None
    bf16: bool
    output: str
    save_every: int
    save_seconds: float | None  # also save last/ when this long has passed since the last save
    on_nan: str
    eval_test: bool
    baselines: bool
    progress: bool
    report_to: tuple[str, ...]
    fsdp: bool = False  # a default only for specs written before the field existed
    truncation: str = "head"  # the same: runs before the field cut a long text's end
    device: str = "cpu"  # where it ran (`cuda:N` or `cpu`); a checkpoint loads wherever its reader says
    fp16: bool = False  # fp16 frozen weights with loss scaling: a GPU without bf16
    tf32: bool = False  # TF32 matmuls for what stays fp32 on a GPU
    decided: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def task_type(self) -> TaskType:
        return self.prompt.task_type

    @property
    def precision(self) -> str:
        """The frozen weights' dtype: bf16, fp16 (a GPU without bf16) or fp32."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def method(self) -> str:
        """prompt | ptuning | prefix, as the prompt config records it (a checkpoint without one: prompt)."""
        return self.prompt.method

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(task=self.task.to_dict(), prompt=self.prompt.to_dict(), decided=dict(self.decided))
        return asdict_plain(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise SoftpromptError(f"run spec has unknown field(s) {', '.join(unknown)}; written by a newer softprompt?")
        hints = typing.get_type_hints(cls)
        for name, value in d.items():
            union = typing.get_origin(hints[name]) in (typing.Union, types.UnionType)
            allowed = typing.get_args(hints[name]) if union else (hints[name],)
            plain = tuple(t for t in allowed if t in (int, float, bool, str, type(None)))
            if len(plain) == len(allowed) and not isinstance(value, plain + ((int,) if float in plain else ())):
                raise SoftpromptError(f"run spec field {name!r} holds {repr(value)[:40]}, which is not a "
                                      f"{hints[name]}")
        d["task"] = TaskSpec.from_dict(d["task"])
        d["prompt"] = PromptTuningConfig.from_dict(d["prompt"])
        for name in ("text_columns", "report_to"):
            d[name] = tuple(d[name]) if d.get(name) is not None else d.get(name)
        return cls(**d)


def asdict_plain(d: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, so a dict survives a JSON round trip unchanged."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def fast_bf16() -> bool:
    """Whether bf16 matrix products are fast here: a timed probe, once per machine (precision.py; docs/recipe.md,
    Precision)."""
    return precision.bf16_pays()


def default_task_type(family: str, task: TaskSpec, user_labels: bool = False) -> TaskType:
    """Encoders classify with a head; decoders and encoder-decoders generate label words (regression: head); a
    decoder reads labels that are a user's names (`user_labels`) with a head."""
    if family == "encoder" or task.is_regression or (user_labels and family == "decoder"):
        return TaskType.SEQ_CLS
    return TaskType.CAUSAL_LM if family == "decoder" else TaskType.SEQ_2_SEQ_LM


def resolve_task(task: TaskSpec, template: str | None, verbalizer: list[str] | None) -> TaskSpec:
    """The task as the run uses it: the user's template and label words in place of the task's own."""
    if template:
        task = replace(task, template=template)  # validated by TaskSpec
    if verbalizer:
        if len(verbalizer) != len(task.labels):
            raise SoftpromptError(f"--verbalizer needs {len(task.labels)} label words "
                                  f"({', '.join(task.labels)}), got {len(verbalizer)}")
        task = replace(task, verbalizer=tuple(verbalizer))
    return task


@dataclass
class _Run:
    """What the decisions below read: the user's words, the model, the task, and the few facts they share.
    `decide` records each default with its reason."""

    cfg: TrainConfig
    model: ModelInfo
    task: TaskSpec
    custom: bool  # data that brought no task spec of its own: a user's file
    label_counts: list[int] | None
    why: dict[str, str] = field(default_factory=dict)
    task_type: TaskType = TaskType.CAUSAL_LM

    def decide(self, name: str, value: Any, reason: str, where: str = RECIPE) -> Any:
        self.why[name] = f"{reason} ({where})"
        return value

    @property
    def head(self) -> bool:
        return self.task_type is TaskType.SEQ_CLS

    @property
    def decoder_head(self) -> bool:
        return self.head and self.model.family == "decoder"


def _task_type(run: _Run) -> TaskType:
    cfg, model = run.cfg, run.model
    # a user's file brings label names, not words a model would say; asking for label words' own options
    # (--verbalizer, --loss) keeps them
    user_labels = run.custom and cfg.verbalizer is None and cfg.loss is None
    task_type = TaskType(cfg.task_type) if cfg.task_type else run.decide(
        "task_type", default_task_type(model.family, run.task, user_labels),
        *(("a decoder reads a user's labels, names rather than words it would say, with a head, which beat label "
           "words on both custom sets", CUSTOM) if user_labels and model.family == "decoder" else
          ("a head for encoders and regression, label words (rank classification) for generative models",)))
    if model.config is not None:  # a checkpoint's record was checked when it was trained
        check_task_type(model.family, task_type, model.config.model_type)
    return task_type


def _pooling(run: _Run) -> str:
    pooling = run.cfg.pooling
    check_pooling(run.model.family, pooling, run.head)
    if pooling is not None:
        return pooling
    if run.head and run.model.mean_pooling:
        return run.decide("pooling", "mean" if len(run.task.fields) == 1 else "siamese",
                          "a mean-pooling sentence-embedding model reads one text by its mean and a pair as two "
                          "texts compared, as it was trained")
    if run.decoder_head and run.custom:
        return run.decide("pooling", "last_mean", "a decoder's head on a user's file reads its last state beside the "
                          "text's mean: at least the last state's accuracy on both sets, where the mean alone won "
                          "one and lost the other", CUSTOM)
    return run.decide("pooling", "cls", "the model's own pooling: an encoder's pooled first token, a decoder's last "
                      "real token")


def _instruction(run: _Run) -> TaskSpec:
    """Label words of a user's file start from an instruction naming its labels, unless an init is given."""
    cfg, task = run.cfg, run.task
    if not run.head and run.custom and task.labels and not task.instruction and not (cfg.init or cfg.init_text):
        return replace(task, instruction=run.decide("instruction", label_instruction(task.labels),
                                                    "label words of data without an instruction start from one "
                                                    "naming its labels", CUSTOM))
    return task


def _init(run: _Run, pooling: str) -> tuple[PromptInit, str | None]:
    """The prompt's start, and the text a text init reads."""
    cfg = run.cfg
    default_text = ("." if pooling == "siamese" else None) if run.head else (run.task.instruction or None)
    if cfg.init:
        return PromptInit(cfg.init), default_text
    if cfg.init_file or cfg.init_text:
        return (PromptInit.FILE if cfg.init_file else PromptInit.TEXT), default_text
    if default_text:
        return run.decide("init", PromptInit.TEXT, "siamese heads start from '.' (punctuation the model passes "
                          "over); label words from the task's instruction, which keeps the template's zero-shot "
                          "accuracy"), default_text
    return run.decide("init", PromptInit.VOCAB if run.head else PromptInit.CLASS_LABELS,
                      "heads start from sampled vocabulary; label words without an instruction from their "
                      "labels"), default_text


def _method(run: _Run) -> str:
    """The prompt method; a setting only another method reads is an error rather than ignored."""
    cfg = run.cfg
    method = cfg.method or run.decide("method", "prompt", "prompt tuning, the paper's; prefix leads on every GLUE "
                                      "row it ran, but on several seeds against our prompt tuning on none yet")
    chosen = get_method(method)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for other in methods():
        for name in other.fields:
            value = getattr(cfg, name)
            if name in chosen.fields or value in (None, False, 0, defaults[name]):
                continue
            if isinstance(value, str) and value.upper() == str(defaults[name]).upper():
                continue
            flag = "--" + name.replace("_", "-")
            raise SoftpromptError(f"{flag} is a setting of method {other.name} ({other.summary}); add --method "
                                  f"{other.name}")
    return method


def _max_length(run: _Run) -> int:
    cfg, model = run.cfg, run.model
    check_prompt_length(cfg.prompt_length, model.max_positions, model.name)
    if model.max_positions and cfg.max_length + cfg.prompt_length > model.max_positions:
        return run.decide("max_length", model.max_positions - cfg.prompt_length,
                          "input and prompt must fit the model's positions")
    return cfg.max_length


def _residual_reparam(run: _Run, method: str) -> int:
    if run.cfg.residual_reparam is not None:
        return run.cfg.residual_reparam
    return run.decide("residual_reparam", 64 if run.head and method == "prompt" else 0,
                      "a residual MLP helped heads and cost label words accuracy; other methods have their own")


def _head_init(run: _Run, pooling: str) -> str | None:
    cfg = run.cfg
    if cfg.head_init is not None and not run.head:
        raise SoftpromptError("--head-init starts a classification or regression head; this run trains "
                              "label words (use --task-type SEQ_CLS for a head)")
    if cfg.head_init == "cosine" and pooling != "siamese":
        raise SoftpromptError("--head-init cosine starts a siamese head; use fit or random with other pooling")
    if cfg.head_init is not None or not run.head:
        return cfg.head_init
    return run.decide("head_init", "cosine" if pooling == "siamese" else "fit" if run.decoder_head else "random",
                      "a siamese head starts at the pair's fitted cosine, a decoder's head as a ridge readout of its "
                      "large last states; other heads as the model made them")


def _rates(run: _Run, method: str) -> tuple[float, float | None]:
    """The prompt's learning rate and a head's."""
    cfg = run.cfg
    rate = cfg.lr or (0.3 if cfg.optimizer == "adafactor" else 1e-2 if run.decoder_head else 3e-2)
    lr = cfg.lr
    if lr is None:
        own = get_method(method).lr(run.model.family) if cfg.optimizer == "adamw" else None
        reasons = "; ".join(m.lr_reason for m in methods() if m.lr_reason)
        lr = run.decide("lr", own or rate, "Adafactor at the paper's 0.3; AdamW at 3e-2, 1e-2 where the prompt must "
                        f"not outrun a decoder head's fitted start; {reasons}")
    head_lr = cfg.head_lr if run.head else None
    if run.head and head_lr is None:
        head_lr = run.decide("head_lr", rate * 0.3 if run.decoder_head else rate,
                             "a decoder's last states are several times larger, so its head steps slower; a method's "
                             "own rate is its prompt's, not the head's")
    return lr, head_lr


def _loss(run: _Run) -> str:
    if run.head:
        return run.cfg.loss or "rank"
    return run.cfg.loss or run.decide("loss", "rank", "the label strings' rank loss beat the paper's LM loss on the "
                                      "label token on SST-2 and Rotten Tomatoes")


def _class_weights(run: _Run, loss: str) -> str:
    cfg, task, counts = run.cfg, run.task, run.label_counts
    lm_loss = not run.head and loss == "lm"
    if cfg.class_weights == "auto":
        skewed = not task.is_regression and bool(counts) and min(counts or [0]) * SKEW < max(counts or [0])
        balanced = (task.metrics[0] == "mcc" or skewed) and not lm_loss
        return run.decide("class_weights", "balanced" if balanced else "none",
                          f"tasks scored by MCC, and data whose largest class has {SKEW}x the smallest's rows, weight "
                          "classes, where unweighted training settled on the majority")
    if cfg.class_weights == "balanced" and task.is_regression:
        raise SoftpromptError("--class-weights balanced needs a classification task; this one is regression")
    if cfg.class_weights == "balanced" and lm_loss:
        raise SoftpromptError("--class-weights balanced weights the rank loss or a head; use --loss rank")
    return cfg.class_weights


def _budget(run: _Run) -> tuple[int | None, float | None]:
    """Steps and seconds: the user's, or, with none given, the default job's or a user's file's."""
    cfg, counts = run.cfg, run.label_counts
    if cfg.max_steps is not None or cfg.max_time is not None or cfg.epochs is not None:
        return cfg.max_steps, cfg.max_time
    if run.custom and counts:
        epoch = -(-sum(counts) // (cfg.batch_size * cfg.grad_accum))
        steps = run.decide("max_steps", min(max(epoch, CUSTOM_STEPS[0]), CUSTOM_STEPS[1]),
                           f"no budget given for a user's data: one epoch, {CUSTOM_STEPS[0]} to {CUSTOM_STEPS[1]} "
                           "steps", CUSTOM)
        return steps, run.decide("max_time", CUSTOM_SECONDS, "and at most this long, so the run ends within 10 "
                                 "minutes on 2 cores", CUSTOM)
    return run.decide("max_steps", 80, "no budget given: the embedded default job's, a few minutes on 2 cores"), None


def _saving(run: _Run) -> tuple[int, float | None]:
    if run.cfg.save_every is not None:
        return run.cfg.save_every, None
    return run.decide("save_every", 50, "a killed run resumes from last/; saving a prompt takes milliseconds"), 60.0


def _device(run: _Run, device: torch.device | None) -> torch.device:
    if device is not None:
        return device
    found = resolve_device(run.cfg.device)
    if run.cfg.device != "auto":
        return found
    return run.decide("device", found, "the accelerator when there is one (each launcher rank its own local GPU), "
                      "else the CPU")


def _gpu_precision(run: _Run, device: torch.device) -> tuple[bool, bool, bool]:
    """bf16, fp16 and TF32 on a GPU: bf16 frozen weights where it has bf16, else fp16 with loss scaling; TF32 for
    the fp32 rest. Asking for bf16 on a GPU without it is an error, not a slow emulation."""
    supported = gpu_supports_bf16(device)
    if run.cfg.bf16 and not supported:
        raise SoftpromptError(f"--bf16: {gpu_name(device)} has no bf16; leave it out (fp16 with loss scaling is "
                              "the default there) or pass --fp32")
    if run.cfg.bf16 is not None:
        bf16 = run.cfg.bf16
    else:
        bf16 = run.decide("bf16", supported, "a GPU that supports bf16 runs the frozen weights in it: half the memory "
                          "and its tensor cores; what trains stays fp32")
    fp16 = False
    if run.cfg.bf16 is None and not supported:
        fp16 = run.decide("fp16", True, "a GPU without bf16 runs the frozen weights in fp16, with loss scaling so "
                          "that the prompt's small gradients survive it")
    tf32 = run.decide("tf32", True, "TF32 matmuls for what stays fp32 on a GPU (the prompt, a head): Ampere and "
                      "later run them on tensor cores")
    return bf16, fp16, tf32


def _bf16(run: _Run, max_time: float | None, bf16_fast: bool | None) -> bool:
    if run.cfg.bf16 is not None:
        return run.cfg.bf16
    fast = fast_bf16() if bf16_fast is None else bf16_fast
    return run.decide("bf16", run.model.family == "decoder" and (not run.head or run.custom) and max_time is not None
                      and fast, "bf16 frozen weights buy steps within a time budget (a user's, or a user's file's "
                      "cap) where a timed probe finds bf16 fast: label words on SST-2, a head on a user's file; "
                      "under a step budget they only cost accuracy")


def _truncation(run: _Run) -> str:
    if run.cfg.truncation:
        return run.cfg.truncation
    if run.custom:
        return run.decide("truncation", "head_tail", "a user's texts may be documents whose end (a signature, a "
                          "verdict) tells as much as their start; on news-source, keeping both beat keeping the "
                          "start", CUSTOM)
    return run.decide("truncation", "head", "the tokenizer's own: a built-in task's texts mostly fit, and its GLUE "
                      "rows were measured so")


def resolve(cfg: TrainConfig, model: ModelInfo, task: TaskSpec, bf16_fast: bool | None = None,
            label_counts: list[int] | None = None, device: torch.device | None = None) -> RunSpec:
    """Decide every default of `cfg` for this base model and task (the one place that does); `label_counts`
    (training rows per label) lets the data decide class weights and a user's data its budget; `bf16_fast`
    stands in for the CPU check in tests, `device` for the device rule (a checkpoint's record). Each decision is a
    small function above, recording its reason."""
    run = _Run(cfg, model, resolve_task(task, cfg.template, cfg.verbalizer), task.name not in TASKS, label_counts)
    run.task_type = _task_type(run)
    pooling = _pooling(run)
    run.task = _instruction(run)
    init, init_text = _init(run, pooling)
    method = _method(run)
    prompt = PromptTuningConfig(
        num_virtual_tokens=cfg.prompt_length, task_type=run.task_type, init=init, init_text=cfg.init_text or init_text,
        init_file=cfg.init_file, pooling=pooling, label_words=[w.strip() for w in run.task.verbalizer] or
        list(run.task.labels), method=method, encoder_reparameterization_type=cfg.encoder_reparameterization_type,
        encoder_hidden_size=cfg.encoder_hidden_size, encoder_num_layers=cfg.encoder_num_layers,
        encoder_dropout=cfg.encoder_dropout, prefix_projection=cfg.prefix_projection)
    lr, head_lr = _rates(run, method)
    loss = _loss(run)
    max_steps, max_time = _budget(run)
    save_every, save_seconds = _saving(run)
    where = _device(run, device)
    bf16, fp16, tf32 = _gpu_precision(run, where) if where.type == "cuda" else (
        _bf16(run, max_time, bf16_fast), False, False)
    same = {f.name: getattr(cfg, f.name) for f in fields(RunSpec) if f.name in TrainConfig.__dataclass_fields__}
    same.update(text_columns=tuple(cfg.text_columns) if cfg.text_columns else None, report_to=tuple(cfg.report_to))
    return RunSpec(**{**same, "family": model.family, "task": run.task, "prompt": prompt,
                      "max_length": _max_length(run), "residual_reparam": _residual_reparam(run, method),
                      "head_init": _head_init(run, pooling), "lr": lr, "head_lr": head_lr, "loss": loss,
                      "class_weights": _class_weights(run, loss), "max_steps": max_steps, "max_time": max_time,
                      "bf16": bf16, "fp16": fp16, "tf32": tf32, "device": str(where), "save_every": save_every,
                      "save_seconds": save_seconds, "truncation": _truncation(run), "decided": run.why})
