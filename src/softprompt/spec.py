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
from typing import Any

from .assets import ModelInfo
from .config import ENCODER_TYPES, METHODS, POOLINGS, TRUNCATIONS, PromptInit, PromptTuningConfig, TaskType
from .errors import SoftpromptError
from .options import _opt
from .tasks import TASKS, TaskSpec, label_instruction
from .tracking import parse_report_to

RECIPE = "docs/recipe.md#defaults"
CUSTOM = "docs/recipe.md#custom-data"
SKEW = 3  # classes count as imbalanced when the largest has this many times the smallest's training rows
PTUNING_LR = 1e-3  # a P-tuning encoder's AdamW rate: at 3e-2 it collapsed to one class (docs/recipe.md#defaults)
PREFIX_LR = 1e-2  # a decoder prefix's AdamW rate: above 3e-2 on SST-2 and RTE (docs/recipe.md#defaults)
CUSTOM_STEPS, CUSTOM_SECONDS = (80, 400), 300.0  # the default budget for a user's data: one epoch within these
LOSSES, CLASS_WEIGHTS, HEAD_INITS = ("rank", "lm"), ("auto", "none", "balanced"), ("cosine", "fit", "random")
OPTIMIZERS, SCHEDULES = ("adamw", "adafactor"), ("linear", "cosine", "constant")
EVAL_SHARE = 0.1  # under --max-time, dev evaluations take about this share of it (docs/recipe.md#defaults)


@dataclass
class TrainConfig:
    """Every setting of a run as the user gave it; `None` means "decide for me" (see `resolve`)."""

    model: str = _opt("smollm2-135m", "built-in name (smollm2-135m, minilm-l6), hub id or local folder")
    trust_remote_code: bool = _opt(False, "let a hub model run the code in its repository (only for one you trust)",
                                   flag="--trust-remote-code")
    data: str = _opt("rotten_tomatoes", "built-in dataset, CSV/TSV/JSONL file, folder (GLUE layout), or hub name "
                                        "such as glue/sst2")
    task: str | None = _opt(None, "built-in task spec (sst2, mrpc, rte, ...); inferred from the data when possible")
    task_type: str | None = _opt(None, "SEQ_CLS (head), CAUSAL_LM or SEQ_2_SEQ_LM (label words); default: a head "
                                       "for encoders, regression and a decoder on a user's file, label words "
                                       "otherwise")
    text_columns: list[str] | None = _opt(None, "input column(s) of a file, in the task's field order (repeat)",
                                          flag="--text-column")
    label_column: str | None = _opt(None, "label column of a file")
    template: str | None = _opt(None, "text-to-text template with {field} slots and an optional {label} slot "
                                      "(default: the task's; the label follows the template)")
    verbalizer: list[str] | None = _opt(None, "label word per label, in label order (repeat)")
    prompt_length: int = _opt(8, "number of virtual tokens k")
    method: str | None = _opt(None, "prompt (input vectors) | ptuning (input vectors from a prompt encoder while "
                                    "training) | prefix (keys and values at every layer; T5: its encoder's); default "
                                    "prompt")
    encoder_reparameterization_type: str = _opt("MLP", "ptuning's prompt encoder: MLP | LSTM")
    encoder_hidden_size: int | None = _opt(None, "ptuning's encoder / the prefix projection's hidden width "
                                                 "(default: the model's width)")
    encoder_num_layers: int = _opt(2, "ptuning LSTM layers")
    encoder_dropout: float = _opt(0.0, "ptuning LSTM dropout")
    prefix_projection: bool = _opt(False, "prefix: train through an Embedding -> Linear-Tanh-Linear MLP, folded "
                                          "into plain keys/values at save",
                                   flag="--prefix-projection/--no-prefix-projection")
    residual_reparam: int | None = _opt(None, "train the prompt through a residual MLP with this bottleneck width, "
                                              "folded into a plain prompt at save (0: off; default 64 with a "
                                              "head, off for label words)")
    init: str | None = _opt(None, "random | vocab | class_labels | text | file (default: the task's instruction "
                                  "as text for label words, vocab for heads, '.' for siamese heads)")
    init_text: str | None = _opt(None, "text whose token embeddings start the prompt")
    init_file: str | None = _opt(None, "checkpoint folder, peft adapter folder or prompt .safetensors to start from")
    pooling: str | None = _opt(None, "how a head reads the model: cls (the model's own: an encoder's pooled [CLS], "
                                     "a decoder's last token) | mean (of the text's final states) | siamese "
                                     "(encoder pairs: each text mean-pooled apart, the head reads u, v, |u-v| and "
                                     "u*v) | last_mean (decoders: the last token's state and the mean, side by "
                                     "side) (default with a mean-pooling sentence-embedding model: mean for one "
                                     "text, siamese for a pair; a decoder's head on a user's file: last_mean; "
                                     "else cls)")
    head_init: str | None = _opt(None, "a head's start: cosine (siamese heads: the pair's cosine fitted to the "
                                       "training labels) | fit (a ridge readout of the head's inputs on 512 "
                                       "training rows) | random (default: cosine for siamese heads, fit for "
                                       "decoder heads, else random)")
    loss: str | None = _opt(None, "text-to-text loss: rank (cross-entropy over the label strings' scores; the "
                                  "default) | lm (LM loss on the label tokens, the paper's)")
    class_weights: str = _opt("auto", "none | balanced (each class's loss weighted by N / (classes * count)) | "
                                      "auto (balanced for tasks scored by MCC)")
    optimizer: str = _opt("adamw", "adamw | adafactor (the paper's)")
    lr: float | None = _opt(None, "learning rate (default 3e-2 adamw, 1e-2 for a decoder's head or prefix, 1e-3 "
                                  "through P-tuning's encoder; 0.3 adafactor)")
    head_lr: float | None = _opt(None, "a head's learning rate (default: --lr for encoders, --lr * 0.3 for "
                                       "decoders)")
    weight_decay: float = _opt(1e-5, "AdamW/Adafactor weight decay")
    schedule: str = _opt("linear", "linear | cosine | constant after warmup")
    warmup: float = _opt(0.05, "warmup as a fraction of the budget (steps or time)")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    batch_size: int = _opt(16, "training batch size")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    eval_batch_size: int = _opt(64, "evaluation batch size")
    max_steps: int | None = _opt(None, "optimizer-step budget (80 when no budget is given)")
    max_time: float | None = _opt(None, "wall-clock budget in seconds for training and dev evaluation (evaluations "
                                        "paced to about 10% of it); the test scoring after it is announced with "
                                        "its time")
    epochs: float | None = _opt(None, "epoch budget")
    eval_every: int = _opt(40, "evaluate on dev every N steps")
    patience: int | None = _opt(None, "stop after N evaluations without dev improvement")
    max_length: int = _opt(128, "max input tokens (virtual tokens not counted)")
    truncation: str | None = _opt(None, "how a text longer than --max-length is cut: head (keep its start) | "
                                        "head_tail (keep its start and its end, cut the middle) (default: "
                                        "head_tail for a user's file, head for a built-in task)")
    max_train_examples: int | None = _opt(None, "train on a seeded sample of this many examples")
    max_eval_examples: int | None = _opt(None, "evaluate on a seeded sample of this many examples")
    seed: int = _opt(0, "seed of the data order, sampling and prompt init")
    bf16: bool | None = _opt(None, "the frozen model's weights and activations in bf16 (prompt and head train in "
                                   "fp32); default: bf16 under --max-time for decoders with label words (and a "
                                   "decoder on a user's file under its default time cap) where a timed probe finds "
                                   "bf16 fast (GPUs that support it), else fp32",
                                flag="--bf16/--fp32")
    output: str = _opt("runs/latest", "run folder: best/ and last/ checkpoints, metrics.jsonl")
    save_every: int | None = _opt(None, "also save last/ (for --resume) every N steps; by default every 50 steps "
                                        "and every 60 s, so a killed run loses little")
    on_nan: str = _opt("stop", "a NaN or infinite loss: stop (with last/ as of the step before) | skip the step")
    eval_test: bool = _opt(True, "score the best checkpoint on test at the end")
    # the CLI prints these beside the trained prompt's result; the API leaves the extra scoring to the caller
    baselines: bool = _opt(False, "also score the majority class and the untrained prompt on test",
                           cli_default=True)
    progress: bool = _opt(True, "progress bar")
    report_to: list[str] = _opt(list, "trackers besides metrics.jsonl, comma-separated: "
                                      "wandb,tensorboard,trackio,mlflow", cli_type=str)
    fsdp: bool = _opt(False, "under a launcher, shard the frozen model's layers across the processes (FSDP2; also on "
                             "when accelerate launch runs an FSDP config); docs/distributed.md", flag="--fsdp")

    def __post_init__(self) -> None:
        checks = [
            (self.prompt_length > 0, f"prompt length must be > 0, got {self.prompt_length}"),
            (self.residual_reparam is None or self.residual_reparam >= 0,
             "--residual-reparam is a bottleneck width >= 0 (0: off)"),
            (self.method in (None, *METHODS), f"--method must be one of {', '.join(METHODS)}, not {self.method!r}"),
            (self.encoder_reparameterization_type.upper() in ENCODER_TYPES,
             f"--encoder-reparameterization-type must be MLP or LSTM, not {self.encoder_reparameterization_type!r}"),
            (self.loss in (None, *LOSSES), f"--loss must be lm or rank, not {self.loss!r}"),
            (self.pooling in (None, *POOLINGS), f"--pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}"),
            (self.truncation in (None, *TRUNCATIONS),
             f"--truncation must be one of {', '.join(TRUNCATIONS)}, not {self.truncation!r}"),
            (self.head_init in (None, *HEAD_INITS), f"--head-init must be cosine, fit or random, not {self.head_init!r}"),
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
    decided: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def task_type(self) -> TaskType:
        return self.prompt.task_type

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
    from .precision import bf16_pays

    return bf16_pays()


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


def resolve(cfg: TrainConfig, model: ModelInfo, task: TaskSpec, bf16_fast: bool | None = None,
            label_counts: list[int] | None = None) -> RunSpec:
    """Decide every default of `cfg` for this base model and task (the one place that does); `label_counts`
    (training rows per label) lets the data decide class weights and a user's data its budget; `bf16_fast`
    stands in for the CPU check in tests."""
    why: dict[str, str] = {}

    def decide(name: str, value: Any, reason: str, where: str = RECIPE) -> Any:
        why[name] = f"{reason} ({where})"
        return value

    custom = task.name not in TASKS  # data that brought no task spec of its own: a user's file

    task = resolve_task(task, cfg.template, cfg.verbalizer)
    # a user's file brings label names, not words a model would say; asking for label words' own options
    # (--verbalizer, --loss) keeps them
    user_labels = custom and cfg.verbalizer is None and cfg.loss is None
    task_type = TaskType(cfg.task_type) if cfg.task_type else decide(
        "task_type", default_task_type(model.family, task, user_labels),
        *(("a decoder reads a user's labels, names rather than words it would say, with a head, which beat label "
           "words on both custom sets", CUSTOM) if user_labels and model.family == "decoder" else
          ("a head for encoders and regression, label words (rank classification) for generative models",)))
    if model.config is not None:  # a checkpoint's record was checked when it was trained
        from .models import check_task_type

        check_task_type(model.family, task_type, model.config.model_type)
    head = task_type is TaskType.SEQ_CLS
    decoder_head = head and model.family == "decoder"

    pooling = cfg.pooling
    from .models import check_pooling

    check_pooling(model.family, pooling, head)
    if pooling is None:
        if head and model.mean_pooling:
            pooling = decide("pooling", "mean" if len(task.fields) == 1 else "siamese",
                             "a mean-pooling sentence-embedding model reads one text by its mean and a pair as two "
                             "texts compared, as it was trained")
        elif decoder_head and custom:
            pooling = decide("pooling", "last_mean", "a decoder's head on a user's file reads its last state beside "
                             "the text's mean: at least the last state's accuracy on both sets, where the mean alone "
                             "won one and lost the other", CUSTOM)
        else:
            pooling = decide("pooling", "cls", "the model's own pooling: an encoder's pooled first token, a "
                             "decoder's last real token")
    if not head and custom and task.labels and not task.instruction and not (cfg.init or cfg.init_text):
        task = replace(task, instruction=decide("instruction", label_instruction(task.labels),
                                                "label words of data without an instruction start from one naming "
                                                "its labels", CUSTOM))
    if head:
        default_text = "." if pooling == "siamese" else None
    else:
        default_text = task.instruction or None
    if cfg.init:
        init = PromptInit(cfg.init)
    elif cfg.init_file or cfg.init_text:
        init = PromptInit.FILE if cfg.init_file else PromptInit.TEXT
    elif default_text:
        init = decide("init", PromptInit.TEXT,
                      "siamese heads start from '.' (punctuation the model passes over); label words from the "
                      "task's instruction, which keeps the template's zero-shot accuracy")
    else:
        init = decide("init", PromptInit.VOCAB if head else PromptInit.CLASS_LABELS,
                      "heads start from sampled vocabulary; label words without an instruction from their labels")
    method = cfg.method or decide("method", "prompt", "prompt tuning, the paper's; prefix won every GLUE row it ran "
                                  "at its own rate (SmolLM2 SST-2 and RTE, one run each; MiniLM SST-2 and MRPC) but is "
                                  "opt-in until the short default job and the other tasks are measured")
    if cfg.prefix_projection and method != "prefix":
        raise SoftpromptError("--prefix-projection reparameterises a prefix; add --method prefix")
    if cfg.encoder_reparameterization_type.upper() != "MLP" and method != "ptuning":
        raise SoftpromptError("--encoder-reparameterization-type sets P-tuning's prompt encoder; add --method ptuning")
    prompt = PromptTuningConfig(num_virtual_tokens=cfg.prompt_length, task_type=task_type, init=init,
                                init_text=cfg.init_text or default_text, init_file=cfg.init_file, pooling=pooling,
                                label_words=[w.strip() for w in task.verbalizer] or list(task.labels), method=method,
                                encoder_reparameterization_type=cfg.encoder_reparameterization_type,
                                encoder_hidden_size=cfg.encoder_hidden_size, encoder_num_layers=cfg.encoder_num_layers,
                                encoder_dropout=cfg.encoder_dropout, prefix_projection=cfg.prefix_projection)

    max_length = cfg.max_length
    if model.max_positions and cfg.prompt_length >= model.max_positions:
        raise SoftpromptError(f"a prompt of {cfg.prompt_length} virtual tokens leaves no room for input in "
                              f"{model.name}'s {model.max_positions} positions; use a shorter --prompt-length")
    if model.max_positions and max_length + cfg.prompt_length > model.max_positions:
        max_length = decide("max_length", model.max_positions - cfg.prompt_length,
                            "input and prompt must fit the model's positions")

    reparam = cfg.residual_reparam
    if reparam and method != "prompt":
        raise SoftpromptError(f"--residual-reparam reparameterises a plain prompt; --method {method} trains through "
                              "its own encoder")
    if reparam is None:
        reparam = decide("residual_reparam", 64 if head and method == "prompt" else 0,
                         "a residual MLP helped heads and cost label words accuracy; other methods have their own")

    if cfg.head_init is not None and not head:
        raise SoftpromptError("--head-init starts a classification or regression head; this run trains "
                              "label words (use --task-type SEQ_CLS for a head)")
    if cfg.head_init == "cosine" and pooling != "siamese":
        raise SoftpromptError("--head-init cosine starts a siamese head; use fit or random with other pooling")
    head_init = cfg.head_init
    if head_init is None and head:
        head_init = decide("head_init", "cosine" if pooling == "siamese" else "fit" if decoder_head else "random",
                           "a siamese head starts at the pair's fitted cosine, a decoder's head as a ridge readout "
                           "of its large last states; other heads as the model made them")

    rate = cfg.lr or (0.3 if cfg.optimizer == "adafactor" else 1e-2 if decoder_head else 3e-2)
    lr = cfg.lr
    if lr is None:
        adamw = cfg.optimizer == "adamw"
        lr = decide("lr", PTUNING_LR if method == "ptuning" and adamw else
                    PREFIX_LR if method == "prefix" and adamw and model.family == "decoder" else rate,
                    "Adafactor at the paper's 0.3; AdamW at 3e-2, 1e-2 where the prompt must not outrun a "
                    f"decoder head's fitted start, {PTUNING_LR} through P-tuning's encoder, which collapsed at 3e-2, "
                    f"{PREFIX_LR} for a decoder's prefix, which learned RTE there and not at 3e-2")
    head_lr = cfg.head_lr if head else None
    if head and head_lr is None:
        head_lr = decide("head_lr", rate * 0.3 if decoder_head else rate,
                         "a decoder's last states are several times larger, so its head steps slower; P-tuning's "
                         "lower rate is its encoder's, not the head's")

    text_to_text = not head
    loss = cfg.loss or (decide("loss", "rank", "the label strings' rank loss beat the paper's LM loss on the label "
                               "token on SST-2 and Rotten Tomatoes") if text_to_text else "rank")
    weights = cfg.class_weights
    if weights == "auto":
        skewed = not task.is_regression and bool(label_counts) and min(label_counts or [0]) * SKEW < max(
            label_counts or [0])
        balanced = (task.metrics[0] == "mcc" or skewed) and not (text_to_text and loss == "lm")
        weights = decide("class_weights", "balanced" if balanced else "none",
                         f"tasks scored by MCC, and data whose largest class has {SKEW}x the smallest's rows, weight "
                         "classes, where unweighted training settled on the majority")
    elif weights == "balanced" and task.is_regression:
        raise SoftpromptError("--class-weights balanced needs a classification task; this one is regression")
    elif weights == "balanced" and text_to_text and loss == "lm":
        raise SoftpromptError("--class-weights balanced weights the rank loss or a head; use --loss rank")

    max_steps, max_time = cfg.max_steps, cfg.max_time
    if cfg.max_steps is None and cfg.max_time is None and cfg.epochs is None:
        if custom and label_counts:
            epoch = -(-sum(label_counts) // (cfg.batch_size * cfg.grad_accum))
            max_steps = decide("max_steps", min(max(epoch, CUSTOM_STEPS[0]), CUSTOM_STEPS[1]),
                               f"no budget given for a user's data: one epoch, {CUSTOM_STEPS[0]} to {CUSTOM_STEPS[1]} "
                               "steps", CUSTOM)
            max_time = decide("max_time", CUSTOM_SECONDS, "and at most this long, so the run ends within 10 minutes "
                              "on 2 cores", CUSTOM)
        else:
            max_steps = decide("max_steps", 80, "no budget given: the embedded default job's, a few minutes on 2 "
                               "cores")

    save_every, save_seconds = cfg.save_every, None
    if save_every is None:
        save_every, save_seconds = decide("save_every", 50, "a killed run resumes from last/; saving a prompt takes "
                                          "milliseconds"), 60.0

    bf16 = cfg.bf16
    if bf16 is None:
        fast = fast_bf16() if bf16_fast is None else bf16_fast
        bf16 = decide("bf16", model.family == "decoder" and (text_to_text or custom) and max_time is not None and fast,
                      "bf16 frozen weights buy steps within a time budget (a user's, or a user's file's cap) where a "
                      "timed probe finds bf16 fast: label words on SST-2, a head on a user's file; under a step budget "
                      "they only cost accuracy")

    truncation = cfg.truncation or (decide("truncation", "head_tail", "a user's texts may be documents whose end (a "
                                           "signature, a verdict) tells as much as their start; on news-source, "
                                           "keeping both beat keeping the start", CUSTOM) if custom else
                                    decide("truncation", "head", "the tokenizer's own: a built-in task's texts "
                                           "mostly fit, and its GLUE rows were measured so"))

    same = {f.name: getattr(cfg, f.name) for f in fields(RunSpec) if f.name in TrainConfig.__dataclass_fields__}
    same.update(text_columns=tuple(cfg.text_columns) if cfg.text_columns else None, report_to=tuple(cfg.report_to))
    return RunSpec(**{**same, "family": model.family, "task": task, "prompt": prompt, "max_length": max_length,
                      "residual_reparam": reparam, "head_init": head_init, "lr": lr, "head_lr": head_lr, "loss": loss,
                      "class_weights": weights, "max_steps": max_steps, "max_time": max_time, "bf16": bf16,
                      "save_every": save_every, "save_seconds": save_seconds, "truncation": truncation,
                      "decided": why})
