"""A small grid of training runs, one after another, reported together."""

from __future__ import annotations

import itertools
import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable

from .errors import SoftpromptError
from .report import write_report
from .training import TrainConfig, TrainResult, train

SHORT = {"prompt_length": "k", "init": "init_", "lr": "lr", "residual_reparam": "reparam", "optimizer": "opt_",
         "loss": "loss_", "batch_size": "bs", "seed": "seed"}
SUMMARY = "sweep.json"


def run_name(setting: dict[str, Any]) -> str:
    return "-".join(f"{SHORT.get(k, k + '_')}{v}" for k, v in setting.items())


def sweep(base: TrainConfig, grid: dict[str, list[Any]], log: Callable[[str], None] = print,
          report: bool = True) -> list[tuple[dict[str, Any], TrainResult]]:
    """Train every combination of `grid` (TrainConfig field -> values) on top of `base`, each in its own
    folder under base.output; writes sweep.json and, with `report`, report.html there."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = [k for k in grid if k not in known]
    if unknown:
        raise SoftpromptError(f"cannot sweep over {unknown[0]!r}: not a training setting")
    grid = {k: list(v) for k, v in grid.items() if v}
    if not grid:
        raise SoftpromptError("nothing to sweep: give at least one list of values (e.g. --prompt-lengths 8,20)")
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    root = Path(base.output)
    results = []
    for i, setting in enumerate(settings, 1):
        cfg = replace(base, **setting, output=str(root / run_name(setting)))
        log(f"[{i}/{len(settings)}] {run_name(setting)}")
        results.append((setting, train(cfg, log=log)))
    summary = [{"run": run_name(s), **s, "steps": r.step, "train_seconds": round(r.seconds, 1), "dev": r.dev,
                "test": r.test} for s, r in results]
    best = max(results, key=lambda sr: next(iter(sr[1].dev.values())))  # the task's selection metric comes first
    (root / SUMMARY).write_text(json.dumps({"grid": grid, "runs": summary, "best": run_name(best[0])}, indent=2))
    if report:
        write_report([root / run_name(s) for s in settings], root / "report.html", title=f"sweep {root.name}")
    return results
