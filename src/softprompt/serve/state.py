"""What an app's routes share, kept on `app.state.softprompt` and handed to them as a dependency (`ServedDep`), so
a route module needs no closure over the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Hashable, cast

from fastapi import Depends, Request

from ..multitask import MultiTaskModel, Sampling
from .batcher import Batcher
from .metrics import Metrics
from .options import ServeOptions
from .watcher import PromptWatcher


@dataclass
class Served:
    """One app's model, options, metrics and folder watcher; `batcher` is set while the app runs (by its
    lifespan)."""

    model: MultiTaskModel
    options: ServeOptions
    metrics: Metrics
    watcher: PromptWatcher | None
    batcher: Batcher = field(init=False)

    def run(self, key: Hashable, rows: list[Any]) -> list[Any]:
        """The batcher's call, as the routes submit: ("predict", None) with (task, input) rows, or ("generate",
        Sampling) with (task or None for the base model, input, Wants) rows, answered with `Generated`s."""
        kind, sampling = cast(tuple[str, Sampling], key)
        if kind == "predict":
            return self.model.predict(rows)
        out = self.model.complete([(task, given) for task, given, _ in rows], sampling, [w for _, _, w in rows])
        self.metrics.generation_tokens.inc(sum(g.tokens for g in out))
        return out


def _served(request: Request) -> Served:
    return request.app.state.softprompt


ServedDep = Annotated[Served, Depends(_served)]
