"""`softprompt train | eval | predict | info | report | inspect | sweep`: a thin layer over the Python API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

from .errors import SoftpromptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prompt tuning for frozen transformers: train only k soft-prompt vectors.")

DEFAULT_STEPS = 80  # the embedded default job: about 3 of its 10 minutes are training, on 2 CPU cores


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _fmt(metrics: dict | None) -> str:
    return "n/a" if not metrics else "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _err(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def train(
    model: str = typer.Option("smollm2-135m", help="built-in name (smollm2-135m, minilm-l6), hub id or local folder"),
    data: str = typer.Option("rotten_tomatoes", help="built-in dataset, CSV/TSV/JSONL file, folder (GLUE layout), "
                                                     "or hub name such as glue/sst2"),
    task: Optional[str] = typer.Option(None, help="built-in task spec (sst2, mrpc, rte, ...); inferred when possible"),
    task_type: Optional[str] = typer.Option(None, help="SEQ_CLS (head), CAUSAL_LM or SEQ_2_SEQ_LM (label words)"),
    text_column: Optional[List[str]] = typer.Option(None, help="input column(s) of a file, in the task's field order"),
    label_column: Optional[str] = typer.Option(None, help="label column of a file"),
    template: Optional[str] = typer.Option(None, help="text-to-text template with {field} slots and an optional "
                                                       "{label} slot (default: the label follows the template)"),
    verbalizer: Optional[List[str]] = typer.Option(None, help="label word per label, in label order (repeat)"),
    prompt_length: int = typer.Option(8, help="number of virtual tokens k"),
    residual_reparam: Optional[int] = typer.Option(None, help="train the prompt through a residual MLP with this "
                                                            "bottleneck width, folded into a plain prompt at save "
                                                            "(0: off; default 64 with a head, off for label words)"),
    init: Optional[str] = typer.Option(None, help="random | vocab | class_labels | text | file (default: the "
                                                   "task's instruction as text for label words, vocab for heads, "
                                                   "'.' for siamese heads)"),
    init_text: Optional[str] = typer.Option(None, help="text whose token embeddings start the prompt"),
    pooling: Optional[str] = typer.Option(None, help="encoder heads: cls (the model's pooled [CLS]) | mean (mean "
                                                     "of the text's final states) | siamese (pair tasks: each text "
                                                     "mean-pooled apart, the head reads [u, v, |u-v|, u*v]) "
                                                     "(default with a mean-pooling sentence-embedding model: "
                                                     "mean for one text, siamese for a pair; else "
                                                     "cls)"),
    init_file: Optional[str] = typer.Option(None, help="checkpoint folder or prompt .safetensors to start from"),
    head_init: Optional[str] = typer.Option(None, help="a head's start: cosine (siamese heads: the pair's cosine "
                                                        "similarity fitted to the training labels) | fit (a ridge "
                                                        "readout of the head's inputs on 512 training rows) | "
                                                        "random (default: cosine for siamese heads, fit for "
                                                        "decoder heads, else random)"),
    loss: str = typer.Option("rank", help="text-to-text loss: rank (cross-entropy over the label strings' "
                                           "scores) | lm (LM loss on the label tokens, the paper's)"),
    class_weights: str = typer.Option("auto", help="none | balanced (each class's loss weighted by N / (classes "
                                                   "* count)) | auto (balanced for tasks scored by MCC)"),
    optimizer: str = typer.Option("adamw", help="adamw | adafactor"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default 3e-2 adamw, 1e-2 for a decoder's "
                                                  "head; 0.3 adafactor)"),
    head_lr: Optional[float] = typer.Option(None, help="a head's learning rate (default: --lr for "
                                                      "encoders, --lr * 0.3 for decoders)"),
    schedule: str = typer.Option("linear", help="linear | cosine | constant after warmup"),
    warmup: float = typer.Option(0.05, help="warmup as a fraction of the budget"),
    batch_size: int = typer.Option(16),
    grad_accum: int = typer.Option(1, help="micro-batches per optimizer step"),
    max_steps: Optional[int] = typer.Option(None, help=f"optimizer-step budget ({DEFAULT_STEPS} when no budget is "
                                                       "given)"),
    max_time: Optional[float] = typer.Option(None, help="training-time budget in seconds (evaluation not counted)"),
    epochs: Optional[float] = typer.Option(None, help="epoch budget"),
    eval_every: int = typer.Option(40, help="evaluate on dev every N steps"),
    patience: Optional[int] = typer.Option(None, help="stop after N evaluations without dev improvement"),
    max_length: int = typer.Option(128, help="max input tokens (virtual tokens not counted)"),
    max_train_examples: Optional[int] = typer.Option(None),
    max_eval_examples: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="the frozen model's weights and activations "
                                        "in bf16 (prompt and head train in fp32); default: bf16 under --max-time "
                                        "for decoders with label words on CPUs with AMX (2x the steps), else fp32"),
    output: str = typer.Option("runs/latest", help="run folder: best/ and last/ checkpoints, metrics.jsonl"),
    resume: bool = typer.Option(False, help="continue the run in --output from its last/ checkpoint"),
    baselines: bool = typer.Option(True, help="also score the majority class and the untrained prompt on test"),
    progress: bool = typer.Option(True, help="progress bar"),
    report_to: Optional[str] = typer.Option(None, help="trackers besides metrics.jsonl, comma-separated: "
                                                       "wandb,tensorboard,trackio,mlflow"),
) -> None:
    """Train a soft prompt. With no arguments: SmolLM2-135M on the embedded Rotten Tomatoes data."""
    from .training import train as run_training

    _quiet_libraries()
    cfg = _train_config(dict(locals()))
    result = run_training(cfg, resume=resume, log=typer.echo)
    typer.echo(f"trained {result.step} steps in {result.seconds:.0f} s")
    for name, metrics in result.baselines.items():
        typer.echo(f"baseline {name:<16}  {result.baseline_split:<5} {_fmt(metrics)}")
    typer.echo(f"trained prompt             dev   {_fmt(result.dev)}")
    typer.echo(f"trained prompt             test  {_fmt(result.test) if result.test else 'n/a (no test labels)'}")
    typer.echo(f"checkpoint: {result.best_checkpoint}")


def _train_config(options: dict):
    """The TrainConfig behind `train`'s options (also what `sweep` forwards to each run)."""
    from .training import TrainConfig

    options = {k: v for k, v in options.items() if k != "run_training"}
    budget = {"max_steps": options.pop("max_steps"), "max_time": options.pop("max_time")}
    epochs, resume = options.pop("epochs"), options.pop("resume")
    if budget["max_steps"] is None and budget["max_time"] is None and epochs is None and not resume:
        budget["max_steps"] = DEFAULT_STEPS
        typer.echo(f"budget: {DEFAULT_STEPS} steps (set --max-steps, --max-time or --epochs)")
    options["text_columns"] = options.pop("text_column") or None
    options["verbalizer"] = options["verbalizer"] or None
    return TrainConfig(**options, epochs=epochs or 1.0, **budget)


def _load(checkpoint: str, model: Optional[str]):
    from .pipeline import PromptedTask

    _quiet_libraries()
    return PromptedTask.from_checkpoint(checkpoint, model)


@app.command("eval")
def evaluate(
    checkpoint: str = typer.Argument(..., help="checkpoint folder (e.g. runs/latest/best)"),
    data: Optional[str] = typer.Option(None, help="data to score (default: the data it was trained on)"),
    split: str = typer.Option("test", help="dev | test"),
    model: Optional[str] = typer.Option(None, help="another copy of the same base model"),
    batch_size: int = typer.Option(64),
) -> None:
    """Score a checkpoint on a labelled split and print its metrics as JSON."""
    from .checkpoint import read_meta
    from .data import load_data

    if split not in ("dev", "test"):
        raise SoftpromptError(f"--split must be dev or test, not {split!r}")
    prompted = _load(checkpoint, model)
    training = read_meta(checkpoint).get("training", {})
    splits = load_data(data or training.get("data", ""), prompted.task, seed=training.get("seed", 0),
                       text_columns=training.get("text_columns"), label_column=training.get("label_column"))
    examples = getattr(splits, split)
    if not splits.labelled(split):
        raise SoftpromptError(f"the {split} split of {splits.source} has no labels to score against; try --split dev")
    metrics = prompted.evaluate(examples, batch_size)
    typer.echo(json.dumps({"checkpoint": checkpoint, "split": split, "n": len(examples), **metrics}))


def _read_inputs(texts: list[str], file: Optional[str]) -> list[str | dict]:
    """Inputs from arguments, a file or stdin: a line is a text, tab-separated fields, or a JSON object."""
    if file:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise SoftpromptError(f"cannot read {file}: {err.strerror}") from None
    else:
        lines = texts or sys.stdin.read().splitlines()
    items: list[str | dict] = []
    for line in filter(str.strip, lines):
        if line.lstrip().startswith("{"):
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:
                raise SoftpromptError(f"input line is not valid JSON: {line[:60]}") from None
        else:
            items.append(line)
    if not items:
        raise SoftpromptError("no input texts: pass them as arguments, with --file, or on stdin")
    return items


@app.command()
def predict(
    checkpoint: str = typer.Argument(..., help="checkpoint folder"),
    texts: Optional[List[str]] = typer.Argument(None, help="texts to classify (else --file or stdin)"),
    file: Optional[str] = typer.Option(None, help="one input per line: a text, tab-separated fields, or JSON"),
    model: Optional[str] = typer.Option(None, help="another copy of the same base model"),
    batch_size: int = typer.Option(32),
    generate: bool = typer.Option(False, "--generate", help="print free text generated after the template "
                                                            "instead of a label (decoder checkpoints)"),
    max_new_tokens: int = typer.Option(20, help="with --generate: tokens to generate at most"),
) -> None:
    """Classify texts; prints one JSON line per input with the label and per-label scores."""
    from .data import to_examples

    prompted = _load(checkpoint, model)
    fields = prompted.task.fields
    items = [dict(zip(fields, i.split("\t"))) if isinstance(i, str) and len(fields) > 1 else i
             for i in _read_inputs(texts or [], file)]
    examples = to_examples(items, fields)
    if generate:
        for example, text in zip(examples, prompted.generate(examples, max_new_tokens, batch_size)):
            typer.echo(json.dumps({**example.fields, "generated": text}))
        return
    for example, pred in zip(examples, prompted.predict(examples, batch_size)):
        typer.echo(json.dumps({**example.fields, **pred}))


@app.command()
def info(checkpoint: Optional[str] = typer.Argument(None, help="checkpoint folder to describe")) -> None:
    """Built-in models, datasets and tasks; or what a checkpoint holds."""
    from .assets import BUILTIN_MODELS
    from .data import BUILTIN_DATASETS
    from .tasks import TASKS

    if checkpoint:
        from .checkpoint import read_meta

        meta = read_meta(checkpoint)
        size = sum(f.stat().st_size for f in Path(checkpoint).iterdir() if f.suffix == ".safetensors")
        typer.echo(json.dumps({"base_model": meta["base_model"], "family": meta["family"], "prompt": meta["prompt"],
                               "task": meta["task"]["name"], "template": meta["task"]["template"],
                               "verbalizer": meta["task"]["verbalizer"], "step": meta.get("step"),
                               "metrics": meta.get("metrics"), "bytes": size}, indent=2))
        return
    typer.echo("models:")
    for name, text in BUILTIN_MODELS.items():
        typer.echo(f"  {name:<16} {text}")
    typer.echo("datasets:")
    for name, text in BUILTIN_DATASETS.items():
        typer.echo(f"  {name:<16} {text}")
    typer.echo("tasks:")
    for name, spec in TASKS.items():
        kind = "regression" if spec.is_regression else "/".join(spec.labels)
        typer.echo(f"  {name:<16} {', '.join(spec.fields):<28} {kind:<40} {', '.join(spec.metrics)}")


@app.command()
def report(
    runs: List[str] = typer.Argument(..., help="run folders (or folders of runs, such as a sweep)"),
    output: Optional[str] = typer.Option(None, help="HTML file to write (default: report.html in the first folder)"),
    top: int = typer.Option(5, help="nearest vocabulary tokens shown per virtual token"),
    model: Optional[str] = typer.Option(None, help="another copy of the runs' base model"),
) -> None:
    """Write one self-contained interactive HTML report (works offline) for one or more runs."""
    from .report import write_report

    _quiet_libraries()
    path = write_report(runs, output or Path(runs[0]) / "report.html", top=top, model=model)
    typer.echo(f"report: {path}")


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help="checkpoint folder (e.g. runs/latest/best)"),
    top: int = typer.Option(5, help="nearest vocabulary tokens per virtual token"),
    model: Optional[str] = typer.Option(None, help="another copy of the same base model"),
) -> None:
    """The nearest vocabulary tokens (cosine) of each virtual token of a trained prompt."""
    from .interpret import nearest_tokens

    if top < 1:
        raise SoftpromptError("--top must be at least 1")
    prompted = _load(checkpoint, model)
    weight = prompted.model.prompt.weight
    rows = nearest_tokens(weight, prompted.model.base.get_input_embeddings().weight, prompted.encoder.tokenizer, top)
    typer.echo(f"{checkpoint}: {weight.shape[0]} virtual tokens of {prompted.base_name}, nearest tokens by cosine")
    for i, row in enumerate(rows):
        typer.echo(f"{i:>4}  " + "  ".join(f"{n.token!r:>14} {n.cosine:.3f}" for n in row))


def _values(text: Optional[str], kind) -> list:
    if not text:
        return []
    try:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SoftpromptError(f"cannot read {text!r} as a comma-separated list of {kind.__name__} values") from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(
    ctx: typer.Context,
    prompt_lengths: Optional[str] = typer.Option(None, help="comma-separated prompt lengths, e.g. 8,20"),
    inits: Optional[str] = typer.Option(None, help="comma-separated inits, e.g. text,class_labels,vocab"),
    lrs: Optional[str] = typer.Option(None, help="comma-separated learning rates, e.g. 0.03,0.1"),
    report: bool = typer.Option(True, help="write report.html for all runs at the end"),
) -> None:
    """Train a small grid (prompt length x init x lr) one run after another and report them together.

    Every other option is a `train` option and applies to every run; --output is the sweep's folder."""
    from .sweep import sweep as run_sweep

    _quiet_libraries()
    train_command = typer.main.get_command(app).commands["train"]
    args = list(ctx.args)
    if "--output" not in args and not any(a.startswith("--output=") for a in args):
        args += ["--output", "runs/sweep"]
    try:
        options = train_command.make_context("softprompt sweep", args).params
    except click.ClickException as err:
        raise SoftpromptError(f"sweep: {err.format_message()}") from None
    if options.get("resume"):
        raise SoftpromptError("sweep runs start fresh; resume a single run with softprompt train --resume")
    grid = {"prompt_length": _values(prompt_lengths, int), "init": _values(inits, str), "lr": _values(lrs, float)}
    results = run_sweep(_train_config(options), grid, log=typer.echo, report=report)
    for setting, result in results:
        typer.echo(f"{setting}  steps={result.step}  dev {_fmt(result.dev)}")
    typer.echo(f"sweep: {options['output']}" + (f" (report: {Path(options['output']) / 'report.html'})"
                                                  if report else ""))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and exit code 2, never a traceback."""
    from .training import TrainingInterrupted

    try:
        app(args=argv, prog_name="softprompt", standalone_mode=False)
        return 0
    except SoftpromptError as err:
        _err(f"error: {err}")
        return 2
    except TrainingInterrupted as err:
        _err(str(err))
        return 130
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except (click.Abort, KeyboardInterrupt):
        _err("aborted")
        return 130


def run() -> None:
    sys.exit(main())
