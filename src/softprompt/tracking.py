"""Where a run's metrics go: always `metrics.jsonl` in the run folder, plus any trackers the user names.

The trackers are the official libraries (wandb, tensorboard, trackio, mlflow), imported only when
asked for; each record the trainer logs (training loss, learning rate, throughput every step; dev
metrics at each evaluation) reaches every one of them with its step.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import SoftpromptError

METRICS_LOG = "metrics.jsonl"
TRACKERS = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow"}


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """'wandb,tensorboard' or a list of names -> validated names ('none' or empty: none)."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else [n for v in value for n in v.split(",")]
    names = [n.strip().lower() for n in items if n.strip() and n.strip().lower() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise SoftpromptError(f"unknown tracker {unknown[0]!r} in --report-to; choose from {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def require_trackers(names: list[str]) -> None:
    """Fail before any work when a named tracker's library is missing."""
    for name in names:
        _require(name)


def _require(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise SoftpromptError(f"--report-to {name} needs the {TRACKERS[name]} package: "
                              f"pip install 'softprompt[{name}]'") from None


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class _Wandb:
    def __init__(self, run_dir: Path, name: str, config: dict) -> None:
        wandb = _require("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "softprompt"), name=name, dir=str(run_dir),
                              config=config, reinit="finish_previous")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorBoard:
    def __init__(self, run_dir: Path, name: str, config: dict) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter  # deferred: the optional tensorboard extra

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=2, default=str)}\n```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, run_dir: Path, name: str, config: dict) -> None:
        self.trackio = _require("trackio")
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", "softprompt"), name=name, config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _MLflow:
    def __init__(self, run_dir: Path, name: str, config: dict) -> None:
        self.mlflow = _require("mlflow")
        self.mlflow.start_run(run_name=name)
        self.mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_CLASSES: dict[str, type[_Wandb | _TensorBoard | _Trackio | _MLflow]] = {
    "wandb": _Wandb, "tensorboard": _TensorBoard, "trackio": _Trackio, "mlflow": _MLflow}


class RunLog:
    """Appends every record to the run folder's metrics.jsonl and forwards it to the chosen trackers."""

    def __init__(self, run_dir: str | Path, report_to: list[str] | None = None, name: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / METRICS_LOG
        self.trackers = [_CLASSES[t](Path(run_dir), name or Path(run_dir).name, config or {})
                         for t in parse_report_to(report_to)]

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = _numbers(record)
        for tracker in self.trackers:
            tracker.log(int(record["step"]), values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


class NullLog:
    """A RunLog that keeps nothing: what ranks other than the main one log to."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop the records after `step` (a run resumed from there logs them again)."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a line cut short by a crash is skipped)."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        raise SoftpromptError(f"{run_dir} is not a softprompt run folder (no {METRICS_LOG})")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
