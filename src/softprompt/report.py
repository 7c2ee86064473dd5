"""`softprompt report`: one self-contained interactive HTML page for one or more runs.

Everything is read from run folders (metrics.jsonl, results.json, best/): training curves per run and
overlaid across runs, the final metrics, the dev confusion matrix of the best checkpoint, the nearest
vocabulary tokens of each virtual token, and how similar the prompts of the runs are. plotly.js is
inlined, so the file opens offline and can be mailed around.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from .checkpoint import BEST, RESULTS, Checkpoint, read_checkpoint
from .errors import SoftpromptError
from .interpret import prompt_similarity, view
from .pipeline import PromptedTask
from .tasks import TaskSpec
from .tracking import METRICS_LOG, read_metrics


@dataclass
class Run:
    path: Path
    name: str
    records: list[dict[str, Any]]
    results: dict[str, Any]
    checkpoint: Checkpoint | None  # best/, when the run has one

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "loss" in r]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if any(k.startswith("dev_") for k in r)]

    @property
    def task(self) -> TaskSpec | None:
        spec = self.checkpoint.spec if self.checkpoint else None
        return spec.task if spec else None

    def setting(self) -> str:
        spec = self.checkpoint.spec if self.checkpoint else None
        if spec is None:
            return ""
        return (f"{Path(spec.model).name} · {spec.task.name} · k={spec.prompt.num_virtual_tokens} · "
                f"init={spec.prompt.init.value} · lr={spec.lr}")


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders named directly, or every run folder one level inside a folder (a sweep)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / METRICS_LOG).is_file():
            found.append(path)
        elif path.is_dir() and (inner := sorted(p for p in path.iterdir() if (p / METRICS_LOG).is_file())):
            found += inner
        else:
            raise SoftpromptError(f"{path} is not a softprompt run folder (no {METRICS_LOG}), nor a folder of them")
    return list(dict.fromkeys(found))


def load_run(path: Path, name: str | None = None) -> Run:
    results_file = path / RESULTS
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    checkpoint = read_checkpoint(path / BEST) if (path / BEST).is_dir() else None
    return Run(path, name or path.name, read_metrics(path), results, checkpoint)


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else weight * ema + (1 - weight) * v
        out.append(ema)
    return out


def _curves(runs: list[Run], key: str, title: str, smooth: bool = False, evals: bool = False):
    fig = go.Figure()
    for run in runs:
        rows = [r for r in (run.evals if evals else run.steps) if key in r]
        if not rows:
            continue
        ys = [r[key] for r in rows]
        fig.add_trace(go.Scatter(x=[r["step"] for r in rows], y=_smooth(ys) if smooth else ys, name=run.name,
                                 mode="lines+markers" if evals else "lines"))
    if not fig.data:
        return None
    fig.update_layout(title=title + (" (EMA 0.9)" if smooth else ""), xaxis_title="step", yaxis_title=key,
                      width=640, height=380, margin=dict(l=60, r=20, t=50, b=50))
    return fig


def _run_figure(run: Run, metric: str):
    """Loss and the main dev metric of one run on two axes."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=[r["step"] for r in run.steps], y=_smooth([r["loss"] for r in run.steps]),
                             name="train loss (EMA)"), secondary_y=False)
    evals = [r for r in run.evals if f"dev_{metric}" in r]
    fig.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r[f"dev_{metric}"] for r in evals],
                             name=f"dev {metric}", mode="lines+markers"), secondary_y=True)
    fig.update_layout(title=f"{run.name}: {run.setting()}", width=640, height=340, margin=dict(l=60, r=60, t=50, b=50),
                      title_font_size=13)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss", secondary_y=False)
    fig.update_yaxes(title_text=f"dev {metric}", secondary_y=True)
    return fig


def _confusion_figure(run: Run):
    matrix = run.results.get("dev_confusion") or (run.checkpoint.metrics.get("dev_confusion")
                                                   if run.checkpoint else None)
    labels = list(run.task.labels) if run.task else []
    if not matrix or len(labels) != len(matrix):
        return None
    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Blues", text=matrix,
                               texttemplate="%{text}", hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=f"{run.name}: dev confusion (best checkpoint)", xaxis_title="predicted",
                      yaxis_title="true", yaxis_autorange="reversed", height=360, width=460,
                      margin=dict(l=80, r=20, t=50, b=60))
    return fig


def _similarity_figure(runs: list[Run], prompts: list):
    names = [f"{r.name} ({r.task.name if r.task else '?'})" for r in runs]
    sims = prompt_similarity(prompts)
    fig = go.Figure(go.Heatmap(z=sims, x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
                               text=[[("" if v is None else f"{v:.2f}") for v in row] for row in sims],
                               texttemplate="%{text}"))
    size = max(360, 60 * len(runs) + 220)
    fig.update_layout(title="prompt similarity: cosine of the mean virtual token (blank: different base models)",
                      width=size + 200, height=size, margin=dict(l=160, r=20, t=50, b=160))
    return fig


def _metrics_table(runs: list[Run]) -> str:
    names = sorted({k for r in runs for split in ("dev", "test") for k in (r.results.get(split) or {})})
    head = "".join(f"<th>{s} {html.escape(n)}</th>" for s in ("dev", "test") for n in names)
    rows = []
    for r in runs:
        cells = [f"<td>{(r.results.get(s) or {}).get(n, float('nan')):.4f}</td>" for s in ("dev", "test")
                 for n in names]
        rows.append(f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(r.setting())}</td>"
                    f"<td>{r.results.get('steps', '')}</td><td>{r.results.get('best_step', '')}</td>"
                    f"<td>{r.results.get('train_seconds', '')}</td>{''.join(cells)}</tr>")
    return (f"<table><tr><th>run</th><th>setting</th><th>steps</th><th>best step</th><th>train s</th>{head}</tr>"
            + "".join(rows) + "</table>")


def _neighbour_table(run: Run, neighbours) -> str:
    rows = "".join(
        f"<tr><td>{i}</td>" + "".join(f"<td><code>{html.escape(repr(n.token))}</code> {n.cosine:.3f}</td>"
                                      for n in row) + "</tr>"
        for i, row in enumerate(neighbours))
    return f"<h3>{html.escape(run.name)}</h3><table class='tokens'><tr><th>virtual token</th>" \
           f"<th colspan='{len(neighbours[0]) if neighbours else 1}'>nearest vocabulary tokens (cosine)</th></tr>" \
           f"{rows}</table>"


def _norm_table(run: Run, norms: list[tuple[float, float]]) -> str:
    rows = "".join(f"<tr><td>{i}</td><td>{keys:.3f}</td><td>{values:.3f}</td></tr>" for i, (keys, values) in
                   enumerate(norms))
    return f"<h3>{html.escape(run.name)}: a prefix</h3><table class='tokens'><tr><th>layer</th>" \
           f"<th>mean norm of a virtual token's keys</th><th>and values</th></tr>{rows}</table>"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}} th{{background:#f3f3f3}}
.grid>div{{display:inline-block;vertical-align:top;margin:0 12px 12px 0}} code{{background:#f6f6f6}}</style>
<script type="text/javascript">{plotly}</script></head>
<body><h1>{title}</h1><p>{subtitle}</p>{body}</body></html>
"""


def write_report(run_dirs: Sequence[str | Path], output: str | Path, top: int = 5, title: str = "softprompt report",
                 model: str | None = None) -> Path:
    """Write the report for the given run folders (or folders of runs) to `output`; returns its path."""
    runs = [load_run(p) for p in find_runs(run_dirs)]
    seen: dict[str, int] = {}
    for run in runs:  # runs of a sweep share folder names across sweeps: make legend names unique
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({run.path.parent.name})"
    figures: list[tuple[str, Any]] = []
    overlay = [("loss", "training loss", True, False), ("lr", "learning rate", False, False),
               ("tokens_per_s", "throughput, tokens/s", True, False)]
    metric_keys = sorted({k for r in runs for rec in r.evals for k in rec if k.startswith("dev_")})
    overlay[1:1] = [(k, f"dev {k[4:]}", False, True) for k in metric_keys]
    for key, name, smooth, evals in overlay:
        fig = _curves(runs, key, name + (" — all runs" if len(runs) > 1 else ""), smooth, evals)
        if fig is not None:
            figures.append(("curves", fig))
    for run in runs:
        metrics = (run.task.metrics if run.task else None) or [k[4:] for k in metric_keys[:1]]
        if run.steps:
            figures.append(("runs", _run_figure(run, metrics[0] if metrics else "accuracy")))
        confusion = _confusion_figure(run)
        if confusion is not None:
            figures.append(("confusion", confusion))
    tables, prompts, with_prompts = [], [], []
    for run in runs:
        if run.checkpoint is None:
            continue
        prompted = PromptedTask.from_pretrained(run.path / BEST, model)
        shown = view(prompted.model, prompted.encoder.tokenizer, top)
        if shown.norms is not None:  # keys/values: no tokens near them, their size per layer instead
            tables.append(_norm_table(run, shown.norms))
            continue
        tables.append(_neighbour_table(run, shown.neighbours or []))
        prompts.append(shown.vectors)
        with_prompts.append(run)
    if len(with_prompts) > 1:
        figures.append(("similarity", _similarity_figure(with_prompts, prompts)))

    def section(kind: str) -> str:
        divs = [f"<div>{fig.to_html(full_html=False, include_plotlyjs=False)}</div>"
                for k, fig in figures if k == kind]
        return f"<div class='grid'>{''.join(divs)}</div>"

    body = (f"<h2>Final metrics</h2>{_metrics_table(runs)}"
            f"<h2>Training curves</h2>{section('curves')}"
            f"<h2>Per run</h2>{section('runs')}"
            f"<h2>Dev confusion matrices</h2>{section('confusion')}"
            f"<h2>Nearest vocabulary tokens of each virtual token (a prefix: its norms per layer)</h2>{''.join(tables)}"
            f"<h2>Prompt similarity between runs</h2>"
            f"{section('similarity') if len(with_prompts) > 1 else '<p>one run: nothing to compare</p>'}")
    subtitle = html.escape(", ".join(str(r.path) for r in runs))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(PAGE.format(title=html.escape(title), subtitle=subtitle, plotly=get_plotlyjs(), body=body),
                   encoding="utf-8")
    tmp.replace(output)
    return output
