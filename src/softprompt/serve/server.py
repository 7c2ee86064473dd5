"""Running the app under uvicorn: in this process, or in `workers` processes that each build their own from the
settings handed to them in the environment."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from typing import Sequence

from fastapi import FastAPI

from .app import create_app
from .options import ServeOptions
from .sources import load_model, resolve_sources

SETTINGS_ENV = "SOFTPROMPT_SERVE"  # how `serve` hands its sources and options to uvicorn's worker processes
LOOPBACK = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger(__name__)


def _app(sources: Sequence[str], options: ServeOptions) -> FastAPI:
    return create_app(load_model(sources, options), options)


def app_from_env() -> FastAPI:
    """The app each uvicorn worker process builds (`uvicorn --factory softprompt.serve:app_from_env`)."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    return _app(settings["sources"], ServeOptions(**settings["options"]))


def serve(sources: Sequence[str], options: ServeOptions) -> None:
    """Load the model and serve it under uvicorn until interrupted; `options.workers` processes each load their own."""
    import uvicorn  # deferred: only needed to run the server, not to build the app or the CLI

    if options.host not in LOOPBACK and not options.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", options.host)
    if options.workers == 1:
        uvicorn.run(_app(sources, options), host=options.host, port=options.port)
        return
    resolve_sources(sources)  # a bad argument fails here, once, not in every worker
    os.environ[SETTINGS_ENV] = json.dumps({"sources": list(sources), "options": asdict(options)})
    # each worker loads the model before it answers uvicorn's health pings: give it time to
    uvicorn.run("softprompt.serve:app_from_env", factory=True, host=options.host, port=options.port,
                workers=options.workers, timeout_worker_healthcheck=120)
