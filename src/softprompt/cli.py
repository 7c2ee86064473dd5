"""`softprompt train | eval | predict | info | report | inspect | sweep | export | import | push | serve`: a thin
layer over the Python API."""

from __future__ import annotations

import dataclasses
from inspect import Parameter, Signature
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, List, Optional

import transformers
import typer

from .assets import BUILTIN_MODELS
from .batch import predict_files, predict_files_ray
from .checkpoint import read_checkpoint
from .data import BUILTIN_DATASETS, to_examples
from .distributed import main_process
from .errors import SoftpromptError
from .hub import push_folder
from .interpret import view
from .methods import methods
from .multitask import MultiTaskModel
from .peft_interop import export_peft, import_peft
from .pipeline import PromptedTask
from .report import write_report
from .serve import ServeOptions, serve as run_server
from .spec import TrainConfig
from .sweep import sweep as run_sweep
from .tasks import TASKS
from .training import TrainingInterrupted, load_splits
from .training import train as run_training

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prompt tuning for frozen transformers: train only k soft-prompt vectors.")

def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _fmt(metrics: dict | None) -> str:
    return "n/a" if not metrics else "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _cli_type(hint: Any, default: Any) -> Any:
    """The annotation typer understands for a settings field's type: Optional/List spelled out."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = default is None or len(args) < len(typing.get_args(hint))
    inner = args[0] if args else hint
    if typing.get_origin(inner) is list:
        inner = List[typing.get_args(inner)[0]]  # type: ignore[misc]
    return Optional[inner] if optional else inner


def _parameters(settings: type[Any], defaults: dict[str, Any] | None = None) -> list[Parameter]:
    """One typer option per field of a settings dataclass (TrainConfig, ServeOptions), from the field's default and
    metadata (`options.option`: help, flag, cli_default, cli_type, other typer.Option keywords): declared there."""
    hints = typing.get_type_hints(settings)
    params = []
    for f in dataclasses.fields(settings):
        meta = dict(f.metadata)
        text = meta.pop("help")
        flags = [meta.pop("flag")] if "flag" in meta else []
        hint = meta.pop("cli_type", hints[f.name])
        default = meta.pop("cli_default", None if f.default is dataclasses.MISSING else f.default)
        default = (defaults or {}).get(f.name, default)
        option = typer.Option(default, *flags, help=text() if callable(text) else text, **meta)
        annotation = _cli_type(hint, default)
        params.append(Parameter(f.name, Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def _with_options(settings: type[Any], extra: list[Parameter], defaults: dict[str, Any] | None = None):
    """Give a command `extra` parameters plus an option per field of `settings`; it receives them all as keywords."""
    def wrap(func):
        params = extra + _parameters(settings, defaults)
        func.__signature__ = Signature(params)
        func.__annotations__ = {p.name: p.annotation for p in params}
        return func
    return wrap


def _settings(settings: type[Any], options: dict[str, Any]) -> Any:
    """The `settings` dataclass of a command's keywords (its own fields only)."""
    return settings(**{f.name: options[f.name] for f in dataclasses.fields(settings)})


RESUME = Parameter("resume", Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
    None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last/ checkpoint, with its own settings "
                                  "(--max-steps and --max-time may change)"))


@app.command()
@_with_options(TrainConfig, [RESUME])
def train(**options: Any) -> None:
    """Train a soft prompt. With no arguments: SmolLM2-135M on the embedded Rotten Tomatoes data."""
    _quiet_libraries()
    resume = options["resume"]
    cfg = _settings(TrainConfig, {**options, "output": resume} if resume else options)
    result = run_training(cfg, resume=bool(resume), log=typer.echo)
    if not main_process():
        return  # under a launcher the main rank reports
    typer.echo(f"trained {result.step} steps in {result.seconds:.0f} s ({result.eval_seconds:.0f} s of them on dev "
               "evaluation)")
    for name, metrics in result.baselines.items():
        typer.echo(f"baseline {name:<16}  {result.baseline_split:<5} {_fmt(metrics)}")
    typer.echo(f"trained prompt             dev   {_fmt(result.dev)}")
    typer.echo(f"trained prompt             test  {_fmt(result.test) if result.test else 'n/a (no test labels)'}")
    typer.echo(f"checkpoint: {result.best_checkpoint}")


_SERVE = {p.name: p.default for p in _parameters(ServeOptions)}
# eval, predict, inspect load checkpoints as serve does
TRUST, DTYPE, DEVICE = _SERVE["trust_remote_code"], _SERVE["dtype"], _SERVE["device"]


def _load(checkpoint: str, model: Optional[str], trust_remote_code: bool = False, dtype: Optional[str] = None,
          device: str = "auto"):
    _quiet_libraries()
    return PromptedTask.from_pretrained(checkpoint, model, trust_remote_code, dtype, device)


@app.command("eval")
def evaluate(
    checkpoints: List[str] = typer.Argument(..., help="checkpoint folder(s) (e.g. runs/latest/best); several "
                                                      "prompts of one task are scored as an ensemble too"),
    data: Optional[str] = typer.Option(None, help="data to score (default: the data it was trained on)"),
    split: str = typer.Option("test", help="dev | test"),
    model: Optional[str] = typer.Option(None, help="another copy of the same base model"),
    trust_remote_code: bool = TRUST,
    batch_size: int = typer.Option(64),
    dtype: Optional[str] = DTYPE,
    device: str = DEVICE,
) -> None:
    """Score a checkpoint on a labelled split and print its metrics as JSON; with several, each member's and
    the ensemble's (mean probability, majority vote), all in one batched pass."""
    if split not in ("dev", "test"):
        raise SoftpromptError(f"--split must be dev or test, not {split!r}")
    if len(checkpoints) == 1:
        prompted = _load(checkpoints[0], model, trust_remote_code, dtype, device)
        spec, score = prompted.spec, prompted.evaluate
    else:
        _quiet_libraries()
        ensemble = MultiTaskModel.from_pretrained({"ensemble": checkpoints}, trust_remote_code, dtype, base_model=model,
                                                  device=device)
        spec = ensemble.prompts("ensemble")[0].prompted.spec

        def score(examples, batch_size):
            return ensemble.evaluate("ensemble", examples, batch_size)
    splits = load_splits(data or spec.data, spec.task, spec.seed, spec.text_columns, spec.label_column)
    examples = getattr(splits, split)
    if not splits.labelled(split):
        raise SoftpromptError(f"the {split} split of {splits.source} has no labels to score against; try --split dev")
    metrics = score(examples, batch_size)
    name = {"checkpoint": checkpoints[0]} if len(checkpoints) == 1 else {"checkpoints": checkpoints}
    typer.echo(json.dumps({**name, "split": split, "n": len(examples), **metrics}))


def _stdin_lines() -> list[str]:
    """Lines piped to stdin; none from a terminal (or where there is no stdin to read)."""
    try:
        if sys.stdin is None or sys.stdin.isatty():
            return []
        return sys.stdin.read().splitlines()
    except (OSError, ValueError):  # closed, or captured (as under pytest)
        return []


def _read_inputs(texts: list[str], file: Optional[str]) -> list[str | dict]:
    """Inputs in order: the arguments, then the lines of --file, then lines piped to stdin; a line is a text,
    tab-separated fields, or a JSON object. A blank line is an empty input, which the model refuses by its
    number (so the output's lines stay the input's)."""
    lines = list(texts)
    if file:
        try:
            lines += Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SoftpromptError(f"cannot read {file}: {getattr(err, 'strerror', None) or err}") from None
    lines += _stdin_lines()
    items: list[str | dict] = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("{"):
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:
                raise SoftpromptError(f"input {i} is not valid JSON: {line[:60]}") from None
        else:
            items.append(line)
    if not items:
        raise SoftpromptError("no input texts: pass them as arguments, with --file, or on stdin")
    return items


@app.command()
def predict(
    checkpoint: str = typer.Argument(..., help="checkpoint folder; with --input, CHECKPOINT or NAME=CHECKPOINT"),
    texts: Optional[List[str]] = typer.Argument(None, help="texts to classify (then those of --file and of stdin); "
                                                           "with --input, more checkpoints"),
    file: Optional[str] = typer.Option(None, help="one input per line: a text, tab-separated fields, or JSON"),
    model: Optional[str] = typer.Option(None, help="another copy of the same base model"),
    trust_remote_code: bool = TRUST,
    batch_size: int = typer.Option(32),
    generate: bool = typer.Option(False, "--generate", help="print free text generated after the template "
                                                            "instead of a label (decoder checkpoints)"),
    max_new_tokens: int = typer.Option(20, help="with --generate: tokens to generate at most"),
    dtype: Optional[str] = DTYPE,
    device: str = DEVICE,
    input_: Optional[str] = typer.Option(None, "--input", help="a CSV/TSV/JSONL/Parquet file or a folder of them: "
                                                               "answer every row into --output"),
    output: Optional[str] = typer.Option(None, help="with --input: the .jsonl or .parquet file to write, each row "
                                                    "with its answer, in input order"),
    task_column: Optional[str] = typer.Option(None, help="with --input: the column naming each row's task "
                                                         "(default: task; read when there are several)"),
    chunk_size: int = typer.Option(256, help="with --input: rows read, predicted and written at a time"),
    resume: bool = typer.Option(False, "--resume", help="with --input: continue an interrupted --output after "
                                                        "the rows it holds"),
    answer_prefix: str = typer.Option("", help="with --input: put before the answer columns' names (label, "
                                               "scores, value, vote, members)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="with --input: a progress bar on stderr"),
    ray: bool = typer.Option(False, "--ray", help="with --input: answer on Ray Data actors "
                                                  "(pip install 'softprompt[ray]')"),
    ray_address: Optional[str] = typer.Option(None, help="with --ray: the cluster to join (auto: the one "
                                                         "`ray start` began; default: a local Ray)"),
    concurrency: int = typer.Option(2, help="with --ray: actors, each holding the model"),
) -> None:
    """Classify texts; prints one JSON line per input with the label and per-label scores. With --input, answers
    every row of files into --output, streaming, resumable, on Ray with --ray."""
    if input_ or output:
        if not (input_ and output) or file or generate:
            raise SoftpromptError("--input and --output go together, without --file or --generate")
        if resume and ray:
            raise SoftpromptError("--resume runs without --ray (Ray's readers cannot start mid-file)")
        _quiet_libraries()
        common: dict[str, Any] = {
            "task_column": task_column, "chunk_size": chunk_size, "batch_size": batch_size,
            "answer_prefix": answer_prefix, "dtype": dtype, "trust_remote_code": trust_remote_code, "base_model": model,
            "progress": progress, "device": device}
        checkpoints = [checkpoint, *(texts or [])]
        if ray:
            written = predict_files_ray(checkpoints, input_, output, address=ray_address, concurrency=concurrency,
                                        **common)
        else:
            written = predict_files(checkpoints, input_, output, resume=resume, **common)
        typer.echo(f"{written.output}: {written.rows} rows answered" +
                   (f" after the {written.skipped} it held" if written.skipped else ""))
        return
    if resume or ray:
        raise SoftpromptError("--resume and --ray go with --input and --output")
    prompted = _load(checkpoint, model, trust_remote_code, dtype, device)
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
    """Built-in models, datasets, tasks and prompt methods; or what a checkpoint holds."""
    if checkpoint:
        meta = read_checkpoint(checkpoint)
        size = sum(f.stat().st_size for f in Path(checkpoint).iterdir() if f.suffix == ".safetensors")
        spec = meta.spec
        typer.echo(json.dumps({"base_model": meta.base_model, "family": meta.family, "prompt": meta.prompt.to_dict(),
                               "precision": spec and spec.precision,
                               "task": spec and spec.task.name, "template": spec and spec.task.template,
                               "verbalizer": spec and spec.task.verbalizer, "step": meta.step,
                               "metrics": meta.metrics, "decided": spec and spec.decided, "format": meta.format,
                               "versions": meta.versions, "bytes": size}, indent=2))
        return
    typer.echo("models:")
    for name, text in BUILTIN_MODELS.items():
        typer.echo(f"  {name:<16} {text}")
    typer.echo("datasets:")
    for name, text in BUILTIN_DATASETS.items():
        typer.echo(f"  {name:<16} {text}")
    typer.echo("tasks:")
    for name, task in TASKS.items():
        kind = "regression" if task.is_regression else "/".join(task.labels)
        typer.echo(f"  {name:<16} {', '.join(task.fields):<28} {kind:<40} {', '.join(task.metrics)}")
    typer.echo("methods:")
    for method in methods():
        typer.echo(f"  {method.name:<16} {method.summary}")


@app.command()
def report(
    runs: List[str] = typer.Argument(..., help="run folders (or folders of runs, such as a sweep)"),
    output: Optional[str] = typer.Option(None, help="HTML file to write (default: report.html in the first folder)"),
    top: int = typer.Option(5, help="nearest vocabulary tokens shown per virtual token"),
    model: Optional[str] = typer.Option(None, help="another copy of the runs' base model"),
) -> None:
    """Write one self-contained interactive HTML report (works offline) for one or more runs."""
    _quiet_libraries()
    path = write_report(runs, output or Path(runs[0]) / "report.html", top=top, model=model)
    typer.echo(f"report: {path}")


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help="checkpoint folder (e.g. runs/latest/best)"),
    top: int = typer.Option(5, help="nearest vocabulary tokens per virtual token"),
    model: Optional[str] = typer.Option(None, help="another copy of the same base model"),
    trust_remote_code: bool = TRUST,
    device: str = DEVICE,
) -> None:
    """The nearest vocabulary tokens (cosine) of each virtual token of a trained prompt; per-layer norms of a
    prefix."""
    if top < 1:
        raise SoftpromptError("--top must be at least 1")
    prompted = _load(checkpoint, model, trust_remote_code, device=device)
    shown, k = view(prompted.model, prompted.encoder.tokenizer, top), prompted.model.prompt.num_tokens
    if shown.norms is not None:
        typer.echo(f"{checkpoint}: a prefix of {k} virtual tokens of {prompted.base_name}; mean norm of a virtual "
                   "token's keys and values per layer")
        for i, (keys, values) in enumerate(shown.norms):
            typer.echo(f"{i:>4}  keys {keys:.3f}  values {values:.3f}")
        return
    typer.echo(f"{checkpoint}: {k} virtual tokens of {prompted.base_name}, nearest tokens by cosine")
    for i, row in enumerate(shown.neighbours or []):
        typer.echo(f"{i:>4}  " + "  ".join(f"{n.token!r:>14} {n.cosine:.3f}" for n in row))


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="checkpoint folder (e.g. runs/latest/best)"),
    output: str = typer.Argument(..., help="folder to write"),
    format: str = typer.Option("peft", "--format", help="peft: a prompt-tuning adapter PeftModel.from_pretrained "
                                                        "loads"),
) -> None:
    """Write a checkpoint in another library's format (peft: adapter_config.json + adapter_model.safetensors)."""
    if format != "peft":
        raise SoftpromptError(f"--format must be peft, not {format!r}")
    _quiet_libraries()
    path, note = export_peft(checkpoint, output)
    typer.echo(f"peft adapter: {path}")
    typer.echo(note)


@app.command("import")
def import_(
    adapter: str = typer.Argument(..., help="peft prompt-tuning adapter folder"),
    output: str = typer.Argument(..., help="checkpoint folder to write"),
    model: Optional[str] = typer.Option(None, help="its base model (default: the adapter's base_model_name_or_path)"),
) -> None:
    """Make a softprompt checkpoint of a peft prompt-tuning adapter."""
    _quiet_libraries()
    typer.echo(f"checkpoint: {import_peft(adapter, output, model)}")


@app.command()
def push(
    checkpoint: str = typer.Argument(..., help="checkpoint folder (or an exported peft adapter folder)"),
    repo_id: str = typer.Argument(..., help="hub model repo, user/name (created if need be)"),
    private: bool = typer.Option(False, "--private", help="create the repo private"),
) -> None:
    """Upload a checkpoint to the Hugging Face hub; `from_pretrained("user/name")` and every command read it back."""
    typer.echo(f"pushed: {push_folder(checkpoint, repo_id, private=private or None)}")


def _values(text: Optional[str], kind) -> list:
    if not text:
        return []
    try:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SoftpromptError(f"cannot read {text!r} as a comma-separated list of {kind.__name__} values") from None


def _grid_option(name: str, help: str) -> Parameter:
    return Parameter(name, Parameter.KEYWORD_ONLY, annotation=Optional[str],
                             default=typer.Option(None, help=help))


SWEEP_OPTIONS = [
    _grid_option("prompt_lengths", "comma-separated prompt lengths, e.g. 8,20"),
    _grid_option("inits", "comma-separated inits, e.g. text,class_labels,vocab"),
    _grid_option("lrs", "comma-separated learning rates, e.g. 0.03,0.1"),
    Parameter("write_report", Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(True, "--report/--no-report", help="write report.html for all runs")),
]


@app.command()
@_with_options(TrainConfig, SWEEP_OPTIONS, defaults={"output": "runs/sweep"})
def sweep(**options: Any) -> None:
    """Train a small grid (prompt length x init x lr) one run after another and report them together.

    Every other option is a `train` option and applies to every run; --output is the sweep's folder."""
    _quiet_libraries()
    grid = {"prompt_length": _values(options["prompt_lengths"], int), "init": _values(options["inits"], str),
            "lr": _values(options["lrs"], float)}
    cfg = _settings(TrainConfig, options)
    results = run_sweep(cfg, grid, log=typer.echo, report=options["write_report"])
    for setting, result in results:
        typer.echo(f"{setting}  steps={result.step}  dev {_fmt(result.dev)}")
    typer.echo(f"sweep: {cfg.output}" + (f" (report: {Path(cfg.output) / 'report.html'})"
                                         if options["write_report"] else ""))


CHECKPOINTS = Parameter("checkpoints", Parameter.KEYWORD_ONLY, annotation=Optional[List[str]], default=typer.Argument(
    None, metavar="CHECKPOINT_OR_FOLDER...", help="checkpoint or run folders, NAME=PATH, folders of checkpoints "
                                                   "(DIR/<task>/[<member>/]), hub repo ids"))


@app.command()
@_with_options(ServeOptions, [CHECKPOINTS])
def serve(**options: Any) -> None:
    """Serve prompts over HTTP: a JSON API (/docs), a playground page at /, mixed-task dynamic batching."""
    settings = _settings(ServeOptions, options)
    _quiet_libraries()
    run_server(options["checkpoints"] or [], settings)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(args=argv, prog_name="softprompt", standalone_mode=False)
        return 0
    except SoftpromptError as err:
        _err(f"error: {err}")
        return 2
    except TrainingInterrupted as err:
        _err(str(err))
        return 130
    except typer.Exit as err:
        return err.exit_code
    except typer.TyperException as err:  # typer's own click: usage errors (a misspelt option, an extra argument)
        show = getattr(err, "show", None)
        if show is None:
            _err(f"error: {err}")
            return 2
        show()
        return getattr(err, "exit_code", 2)
    except (typer.Abort, KeyboardInterrupt):
        _err("aborted")
        return 130


def run() -> None:
    sys.exit(main())
