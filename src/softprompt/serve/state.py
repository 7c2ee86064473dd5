"""What an app's routes share, kept on `app.state.softprompt` and handed to them as a dependency (`ServedDep`), so
a route module needs no closure over the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Hashable, cast

from fastapi import Depends, Request

from ..multitask import MultiTaskModel
from .batcher import Batcher
from .bodies import Input
from .options import ServeOptions
from .watcher import PromptWatcher


@dataclass
class Served:
    """One app's model, options and folder watcher; `batcher` is set while the app runs (by its lifespan)."""

    model: MultiTaskModel
    options: ServeOptions
    watcher: PromptWatcher | None
    batcher: Batcher = field(init=False)

    def run(self, key: Hashable, rows: list[tuple[str, Input]]) -> list[Any]:
        """The batcher's call: `key` is ("predict", 0) or ("generate", max_new_tokens), as the routes submit."""
        kind, max_new_tokens = cast(tuple[str, int], key)
        if kind == "generate":
            return self.model.generate(rows, max_new_tokens)
        return self.model.predict(rows)


def _served(request: Request) -> Served:
    return request.app.state.softprompt


ServedDep = Annotated[Served, Depends(_served)]
