"""`softprompt serve`: one frozen model answering many tasks over HTTP, prompts added and removed while it runs.

Every request's rows go through one dynamic batcher, so concurrent requests for any mix of tasks become one
`MultiTaskModel.predict` call on one worker thread. Requests are checked (key, body size, number and length of
inputs, tasks, fields) before they queue, so bad input never reaches a batch, and every error is a JSON
`{"detail": "one line"}` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Awaitable, Hashable, Sequence, Union, cast
from urllib.parse import unquote

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .batcher import Batcher
from .checkpoint import checkpoint_folder
from .encoding import BLANK, is_blank
from .errors import SoftpromptError
from .multitask import BaseMismatch, MultiTaskModel, TaskInfo, UnknownTask
from .pipeline import read_task_checkpoint
from .watch import PromptWatcher, log, scan

SETTINGS_ENV = "SOFTPROMPT_SERVE"  # how `serve` hands its settings to uvicorn's worker processes
KEY_COOKIE = "softprompt_key"  # set by the login page; accepted on GET only, so it cannot carry a forged POST
MAX_NEW_TOKENS = 256
OPEN_PATHS = {"/health"}

Input = Union[str, dict[str, str]]
UNION_TAGS = ("str", "dict[str,str]")
INPUT_IS = "an input is a text, or an object with a text for each of the task's fields"


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    input: Input


class PredictBody(BaseModel):
    """`{task, inputs}` for one task, or `{items: [{task, input}]}` for a mix."""
    model_config = ConfigDict(extra="forbid")
    task: str | None = None
    inputs: list[Input] | None = Field(None, min_length=1)
    items: list[Item] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def one_form(self) -> "PredictBody":
        if (self.items is None) == (self.inputs is None) or (self.task is None) != (self.inputs is None):
            raise ValueError("give either task and inputs, or items")
        return self

    def pairs(self) -> list[tuple[str, Input]]:
        if self.items is not None:
            return [(item.task, item.input) for item in self.items]
        return [(cast(str, self.task), i) for i in self.inputs or []]


class GenerateBody(PredictBody):
    max_new_tokens: int = Field(20, ge=1, le=MAX_NEW_TOKENS)


class PromptBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, description="checkpoint folder on the server's disk, or a hub repo id")
    task: str | None = Field(None, min_length=1, description="the task's name (default: the checkpoint's)")
    member: str | None = Field(None, min_length=1, description="name within an ensemble of prompts for one task")


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _validation_line(err: RequestValidationError) -> str:
    """Pydantic's first complaint as one line, e.g. `inputs.0: Input should be a valid string`."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON"
    if not loc and first.get("type") == "missing":
        return "the body is empty; send a JSON object, with Content-Type: application/json"
    if not loc and first.get("type") == "model_attributes_type":
        return "the body must be a JSON object, sent with Content-Type: application/json"
    if any(p in UNION_TAGS for p in loc):  # pydantic names the union branch it tried: say what an input is
        loc, message = loc[:min(loc.index(p) for p in UNION_TAGS if p in loc)], INPUT_IS
    where = ".".join(loc)
    return f"{where}: {message}" if where else message


def _unparsable(cause: BaseException) -> str:
    """Why a body FastAPI could not even decode is refused, in one line."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 text (byte {cause.object[cause.start:cause.start + 1]!r} at offset " \
               f"{cause.start}); send UTF-8 JSON"
    if isinstance(cause, RecursionError):
        return "the body's JSON nests too deeply to read; send a flatter object"
    return f"the body could not be read as JSON ({type(cause).__name__}); send a UTF-8 JSON object"


class Guard:
    """ASGI middleware, ahead of any work: the API key (401) and the body's size (413).

    The body is read here, at most `max_body_bytes` of it, and handed on to the app in one piece."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    def _authorized(self, method: str, headers: dict[str, str]) -> bool:
        offered = [headers.get("x-api-key", "")]
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            offered.append(token.strip())
        if method in ("GET", "HEAD"):
            for part in headers.get("cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == KEY_COOKIE:
                    offered.append(unquote(value))
        expected = self.api_key.encode()  # type: ignore[union-attr]
        return any(hmac.compare_digest(o.encode(), expected) for o in offered if o)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}  # names are lower case
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope["method"], headers):
            if scope["method"] == "GET" and "text/html" in headers.get("accept", ""):  # a browser: the login page
                page = resources.files(__package__).joinpath("static/login.html").read_text(encoding="utf-8")
                return await HTMLResponse(page, status_code=401)(scope, receive, send)
            return await _error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                     "or 'X-API-Key: KEY'")(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        await _error(413, f"the body is over {self.max_body_bytes} bytes")(scope, receive, send)


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None (and `work` cancelled) as soon as the client disconnects."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        answered = task.done()
        task.cancel()  # a no-op once answered; otherwise (client gone, server stopping) its rows are dropped
    return task.result() if answered else None


def create_app(model: MultiTaskModel, *, api_key: str | None = None, read_only: bool = False, max_batch: int = 32,
               max_wait_ms: float = 5, max_inputs: int = 64, max_input_chars: int = 4000,
               max_body_bytes: int = 1_000_000, watch: str | Path | None = None) -> FastAPI:
    """The HTTP app around `model`; its batcher (and folder watcher) start and stop with the app."""
    if min(max_batch, max_inputs, max_input_chars, max_body_bytes) < 1 or max_wait_ms < 0:
        raise SoftpromptError("--max-batch, --max-inputs, --max-input-chars and --max-body-bytes must be at least 1, "
                              "--max-wait-ms at least 0")
    watcher = PromptWatcher(model, watch) if watch else None
    state: dict[str, Any] = {}

    def run(key: Hashable, rows: list[tuple[str, Input]]) -> list[Any]:
        kind, max_new_tokens = cast(tuple[str, int], key)  # the keys `batched` submits
        if kind == "generate":
            return model.generate(rows, max_new_tokens)
        return model.predict(rows)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state["batcher"] = Batcher(run, max_batch, max_wait_ms)
        if watcher:
            await run_in_threadpool(watcher.poll)  # the folder's prompts are served from the first request on
            watcher.start()
        try:
            yield
        finally:
            if watcher:
                watcher.stop()
            state["batcher"].close()

    app = FastAPI(title="softprompt", version=__version__, lifespan=lifespan,
                  description="One frozen model, many soft-prompted tasks. Errors are `{\"detail\": \"...\"}`.")
    app.state.softprompt = state  # the batcher, for tests that count its calls

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_line(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400 and err.__cause__ is not None:  # FastAPI could not decode the body at all
            return _error(422, _unparsable(err.__cause__))
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(UnknownTask)
    async def unknown_task(_: Request, err: UnknownTask) -> JSONResponse:
        return _error(404, str(err))

    @app.exception_handler(BaseMismatch)
    async def base_mismatch(_: Request, err: BaseMismatch) -> JSONResponse:
        return _error(409, str(err))

    @app.exception_handler(SoftpromptError)
    async def bad_input(_: Request, err: SoftpromptError) -> JSONResponse:
        return _error(422, str(err))

    @app.exception_handler(Exception)
    async def bug(_: Request, err: Exception) -> JSONResponse:
        log.error("internal error", exc_info=err)
        return _error(500, f"internal error ({type(err).__name__}); the server's log has the details")

    def checked(pairs: list[tuple[str, Input]], generate: bool = False) -> list[tuple[str, Input]]:
        """Limits (413), then tasks (404) and fields (422), against one snapshot of the tasks."""
        if len(pairs) > max_inputs:
            raise HTTPException(413, f"{len(pairs)} inputs in one request; the limit is {max_inputs}")
        for i, (_, value) in enumerate(pairs):
            texts = [value] if isinstance(value, str) else list(value.values())
            if any(len(t) > max_input_chars for t in texts):
                raise HTTPException(413, f"input {i} is over {max_input_chars} characters")
        tasks = model.tasks()
        for i, (name, value) in enumerate(pairs):
            info = tasks.get(name)
            if info is None:
                raise HTTPException(404, f"unknown task {name!r}; this server has: {', '.join(sorted(tasks)) or 'none'}")
            _check_fields(info, value, i)
            if generate and not info.can_generate:
                raise HTTPException(422, f"task {name!r} cannot generate text (it needs a decoder prompt trained "
                                         "with label words)")
        model.check(pairs)  # what only the tokenizer can tell (an input of characters it drops), by request index
        return pairs

    async def batched(request: Request, key: tuple[str, int], pairs: list[tuple[str, Input]]) -> Any:
        results = await _unless_disconnected(request, state["batcher"].submit(key, pairs))
        return Response(status_code=499) if results is None else results

    def writable() -> None:
        if read_only:
            raise HTTPException(403, "this server is read-only: prompts cannot be added or removed")

    api_key_doc = [Security(APIKeyHeader(name="X-API-Key", auto_error=False))] if api_key else []

    @app.post("/v1/predict", dependencies=api_key_doc)
    async def predict(body: PredictBody, request: Request) -> Any:
        """Labels and per-label probabilities (or values, for regression), one result per input, in order."""
        results = await batched(request, ("predict", 0), checked(body.pairs()))
        return results if isinstance(results, Response) else {"results": results}

    @app.post("/v1/generate", dependencies=api_key_doc)
    async def generate(body: GenerateBody, request: Request) -> Any:
        """Greedy free text after each input's prompt and template (decoder prompts trained with label words)."""
        pairs = checked(body.pairs(), generate=True)
        texts = await batched(request, ("generate", body.max_new_tokens), pairs)
        if isinstance(texts, Response):
            return texts
        return {"results": [{"task": task, "generated": text} for (task, _), text in zip(pairs, texts)]}

    @app.get("/v1/tasks", dependencies=api_key_doc)
    async def tasks() -> dict[str, Any]:
        """Every task served: its labels, input fields, ensemble members, and whether it can generate."""
        return {"base_model": model.base_name, "tasks": [asdict(info) for info in model.tasks().values()]}

    @app.post("/v1/prompts", status_code=201, dependencies=[Depends(writable), *api_key_doc])
    async def add_prompt(body: PromptBody) -> dict[str, Any]:
        """Load a checkpoint (a folder on the server's disk or a hub repo id) as a task or an ensemble member."""
        prompt = await run_in_threadpool(model.load, _local(body.path), body.task, body.member)
        model.add(prompt)
        return asdict(model.tasks()[prompt.task])

    @app.delete("/v1/prompts/{task}", dependencies=[Depends(writable), *api_key_doc])
    async def remove_prompt(task: str, member: str | None = None) -> dict[str, Any]:
        """Remove a task, or one member of its ensemble."""
        model.remove(task, member)
        return {"removed": task, "member": member}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Open without a key, for load balancers."""
        return {"status": "ok", "base_model": model.base_name, "tasks": len(model.tasks())}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/playground.html").read_text("utf-8"))

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _check_fields(info: TaskInfo, value: Input, index: int) -> None:
    if isinstance(value, str):
        if len(info.fields) != 1:
            raise HTTPException(422, f"input {index}: task {info.name!r} takes the fields {', '.join(info.fields)}; "
                                     "give the input as an object")
        texts = [value]
    else:
        missing = [f for f in info.fields if f not in value]
        if missing:
            raise HTTPException(422, f"input {index} lacks {', '.join(missing)}; task {info.name!r} takes "
                                     f"{', '.join(info.fields)}")
        texts = [value[f] for f in info.fields]
    if is_blank(texts):
        raise HTTPException(422, f"input {index}: {BLANK}")


def _local(path: str) -> str:
    """A local checkpoint as an absolute path (the member name it gets does not depend on the server's working
    folder); anything else (a hub repo id) as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


Entry = tuple[str, "str | None", "str | None"]  # (checkpoint, task, member); None: the checkpoint's own name


def resolve_sources(sources: Sequence[str]) -> list[Entry]:
    """What `softprompt serve` arguments stand for: a checkpoint or run folder, NAME=PATH, a folder of
    checkpoints laid out as for --watch, or a hub repo id."""
    entries: list[Entry] = []
    for source in sources:
        name, path = None, source
        if "=" in source and not Path(source).expanduser().exists():
            name, path = source.split("=", 1)
        local = Path(path).expanduser()
        checkpoint = checkpoint_folder(local)
        if checkpoint:
            entries.append((_local(str(checkpoint)), name or None, None))
        elif local.is_dir() and not name and (found := scan(local)):
            entries += [(_local(str(p)), task, member) for (task, member), p in found.items()]
        elif not local.exists() and path.count("/") == 1:
            entries.append((path, name or None, None))  # a hub repo id, fetched by load
        else:
            raise SoftpromptError(f"{source}: not a checkpoint folder, a run folder, NAME=PATH, a folder of "
                                  "checkpoints, or a hub repo id")
    return entries


def load_model(sources: Sequence[str], watch: str | None = None, trust_remote_code: bool = False,
               dtype: str | None = None) -> MultiTaskModel:
    """The base model of the first checkpoint (of `sources`, else of the watched folder) with every source's
    prompts added, each in its own precision unless `dtype` says one for all; the watched folder's own prompts
    are added by its watcher when the app starts."""
    entries = resolve_sources(sources)
    first = entries[0][0] if entries else next(iter(scan(watch).values()), None) if watch else None
    if first is None:
        raise SoftpromptError("nothing to serve: give a checkpoint, or a --watch folder that holds one")
    _, _, spec = read_task_checkpoint(first, trust_remote_code)
    model = MultiTaskModel(spec.model, trust_remote_code, dtype)
    for path, task, member in entries:
        model.add(model.load(path, task, member))
    return model


def _app(settings: dict[str, Any]) -> FastAPI:
    model = load_model(settings["sources"], settings["watch"], settings["trust_remote_code"], settings.get("dtype"))
    return create_app(model, watch=settings["watch"], **settings["options"])


def app_from_env() -> FastAPI:
    """The app each uvicorn worker process builds (`uvicorn --factory softprompt.serve:app_from_env`)."""
    return _app(json.loads(os.environ[SETTINGS_ENV]))


def serve(sources: Sequence[str], *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          watch: str | None = None, trust_remote_code: bool = False, dtype: str | None = None,
          **options: Any) -> None:
    """Load the model and serve it under uvicorn until interrupted; `workers` processes each load their own."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not options.get("api_key"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    settings = {"sources": list(sources), "watch": watch, "trust_remote_code": trust_remote_code, "dtype": dtype,
                "options": options}
    if workers == 1:
        uvicorn.run(_app(settings), host=host, port=port)
        return
    resolve_sources(sources)  # a bad argument fails here, once, not in every worker
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    # each worker loads the model before it answers uvicorn's health pings: give it time to
    uvicorn.run("softprompt.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                timeout_worker_healthcheck=120)
