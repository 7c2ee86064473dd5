"""The HTTP routes over the shared model: predict, generate, tasks, prompts added and removed, the playground
(`router`, behind the API key), health (`open_router`) and the metrics (`metrics_router`, behind the key unless
--metrics-open). Every request is checked (limits, tasks, fields) before its rows queue for the batcher, so a bad
one never shares a batch with good ones."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict
from typing import Any, Awaitable, Iterable, Sequence, cast

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ..encoding import BLANK, is_blank
from ..errors import SoftpromptError
from ..multitask import Item, Sampling, TaskInfo, Wants
from .bodies import GenerateBody, Input, PredictBody, PromptBody
from .errors import Refused
from .page import page
from .sources import local_path
from .state import Served, ServedDep

router = APIRouter()
open_router = APIRouter()  # no key asked (guard.OPEN_PATHS)
metrics_router = APIRouter()  # behind the key unless --metrics-open


def checked(served: Served, items: Sequence[Item], generate: bool = False,
            max_new_tokens: int | None = None) -> list[int]:
    """Each input's tokens as the model reads them, once `items` pass the limits (413), then tasks (404) and fields
    (422), against one snapshot of the tasks, then what only the model can tell (422); counted as prompt tokens.
    A task of None is the base model (a text or a chat: the model checks it)."""
    limits = served.options
    if len(items) > limits.max_inputs:
        raise HTTPException(413, f"{len(items)} inputs in one request; the limit is {limits.max_inputs}")
    for i, (_, value) in enumerate(items):
        texts = [value] if isinstance(value, str) else list(value.values()) if isinstance(value, dict) else \
            [m["content"] for m in value]
        if any(len(t) > limits.max_input_chars for t in texts):
            raise HTTPException(413, f"input {i} is over {limits.max_input_chars} characters")
    tasks = served.model.tasks()
    for i, (name, value) in enumerate(items):
        if name is None:
            continue
        info = tasks.get(name)
        if info is None:
            raise HTTPException(404, f"unknown task {name!r}; this server has: {', '.join(sorted(tasks)) or 'none'}")
        _check_fields(info, cast(Input, value), i)  # a task's input (a chat is the base model's only)
        if generate and not info.can_generate:
            raise HTTPException(422, f"task {name!r} cannot generate text (it needs a decoder prompt trained with "
                                     "label words)")
    # what only the tokenizer can tell (an input of characters it drops, more tokens than positions), by index
    counts = served.model.check(items, max_new_tokens)
    served.metrics.prompt_tokens.inc(sum(counts))
    return counts


def new_tokens(served: Served, asked: int, field: str) -> int:
    """`asked` tokens to generate, unless over the server's --max-new-tokens (422, naming the request's field)."""
    if asked > served.options.max_new_tokens:
        raise Refused(422, f"{field}: {asked} is over this server's limit of {served.options.max_new_tokens} new "
                           "tokens", param=field)
    return asked


def tag(request: Request, tasks: Iterable[str]) -> None:
    """The task label of the request's count in the metrics: its one task (or model), or `mixed`."""
    names = set(tasks)
    request.state.task = names.pop() if len(names) == 1 else "mixed"


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


async def batched(request: Request, served: Served, key: tuple[str, Sampling | None], rows: Sequence[Any],
                  cancel: threading.Event | None = None) -> Any:
    """The batcher's results for `rows` (as `Served.run` takes them), or a 499 once the client has gone (its rows
    left unrun, and `cancel`, the generating rows' flag, set: they stop at their next token)."""
    try:
        results = await _unless_disconnected(request, served.batcher.submit(key, rows))
    finally:
        if cancel is not None:
            cancel.set()  # a no-op once answered
    return Response(status_code=499) if results is None else results


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


def _writable(served: ServedDep) -> None:
    if served.options.read_only:
        raise HTTPException(403, "this server is read-only: prompts cannot be added or removed")


@router.post("/v1/predict")
async def predict(body: PredictBody, request: Request, served: ServedDep) -> Any:
    """Labels and per-label probabilities (or values, for regression), one result per input, in order."""
    pairs = body.pairs()
    checked(served, pairs)
    tag(request, (task for task, _ in pairs))
    results = await batched(request, served, ("predict", None), pairs)
    return results if isinstance(results, Response) else {"results": results}


@router.post("/v1/generate")
async def generate(body: GenerateBody, request: Request, served: ServedDep) -> Any:
    """Greedy free text after each input's prompt and template (decoder prompts trained with label words)."""
    pairs, asked = body.pairs(), new_tokens(served, body.max_new_tokens, "max_new_tokens")
    checked(served, pairs, generate=True, max_new_tokens=asked)
    tag(request, (task for task, _ in pairs))
    cancel = threading.Event()
    out = await batched(request, served, ("generate", Sampling(asked)), [(*pair, Wants(cancelled=cancel))
                                                                         for pair in pairs], cancel)
    if isinstance(out, Response):
        return out
    return {"results": [{"task": task, "generated": g.text} for (task, _), g in zip(pairs, out)]}


@router.get("/v1/tasks")
async def tasks(served: ServedDep) -> dict[str, Any]:
    """Every task served: its labels, input fields, ensemble members, and whether it can generate."""
    return {"base_model": served.model.base_name, "tasks": [asdict(info) for info in served.model.tasks().values()]}


@router.post("/v1/prompts", status_code=201, dependencies=[Depends(_writable)])
async def add_prompt(body: PromptBody, served: ServedDep) -> dict[str, Any]:
    """Load a checkpoint (a folder on the server's disk or a hub repo id) as a task or an ensemble member."""
    try:
        prompt = await run_in_threadpool(served.model.load, local_path(body.path), body.task, body.member)
        served.model.add(prompt)
    except SoftpromptError:
        served.metrics.loaded("api", ok=False)
        raise
    served.metrics.loaded("api", ok=True)
    return asdict(served.model.tasks()[prompt.task])


@router.delete("/v1/prompts/{task}", dependencies=[Depends(_writable)])
async def remove_prompt(task: str, served: ServedDep, member: str | None = None) -> dict[str, Any]:
    """Remove a task, or one member of its ensemble."""
    served.model.remove(task, member)
    return {"removed": task, "member": member}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return page("playground")


@open_router.get("/health")
async def health(served: ServedDep) -> dict[str, Any]:
    """Open without a key, for load balancers."""
    return {"status": "ok", "base_model": served.model.base_name, "tasks": len(served.model.tasks())}


@metrics_router.get("/metrics")
async def metrics(served: ServedDep) -> Response:
    """Prometheus' text format (docs/serving.md lists the metrics)."""
    return Response(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST)
