"""`create_app`: the FastAPI app assembled from its pieces (the guard, the error handlers, the route modules), its
batcher and folder watcher running while it does."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Security
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from ..version import __version__
from ..multitask import MultiTaskModel
from . import openai, routes
from .batcher import Batcher
from .errors import HANDLERS
from .guard import OPEN_PATHS, Guard
from .metrics import Counted, Metrics
from .options import ServeOptions
from .state import Served
from .watcher import PromptWatcher


def create_app(model: MultiTaskModel, options: ServeOptions) -> FastAPI:
    """The HTTP app around `model`; its batcher (and folder watcher) start and stop with the app."""
    app = FastAPI(title="softprompt", version=__version__, lifespan=_lifespan, exception_handlers=HANDLERS,
                  description="One frozen model, many soft-prompted tasks. Errors are `{\"detail\": \"...\"}`.")
    metrics = Metrics()
    watcher = PromptWatcher(model, options.watch, loaded=lambda ok: metrics.loaded("watch", ok)) if options.watch \
        else None
    app.state.softprompt = Served(model, options, metrics, watcher)
    # the key in the OpenAPI page's form, when there is one (Guard checks it); a route module is one line here
    keyed = [Security(APIKeyHeader(name="X-API-Key", auto_error=False))] if options.api_key else []
    app.include_router(routes.router, dependencies=keyed)
    app.include_router(openai.router, dependencies=keyed)
    app.include_router(routes.open_router)
    app.include_router(routes.metrics_router, dependencies=[] if options.metrics_open else keyed)
    open_paths = OPEN_PATHS | {"/metrics"} if options.metrics_open else OPEN_PATHS
    app.add_middleware(Guard, api_key=options.api_key, max_body_bytes=options.max_body_bytes, open_paths=open_paths)
    app.add_middleware(Counted, metrics=metrics)  # added last, so outermost: it sees what the guard refuses too
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The batcher's thread (and the watcher's) for as long as the app runs; the watched folder's prompts are in
    before the first request."""
    served: Served = app.state.softprompt
    served.batcher = Batcher(served.run, served.options.max_batch, served.options.max_wait_ms, served.metrics)
    served.metrics.track(served.batcher.waiting, lambda: len(served.model.tasks()))
    if served.watcher:
        await run_in_threadpool(served.watcher.poll)
        served.watcher.start()
    try:
        yield
    finally:
        if served.watcher:
            served.watcher.stop()
        served.batcher.close()
