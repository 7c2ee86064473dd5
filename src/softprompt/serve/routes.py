"""The HTTP routes over the shared model: predict, generate, tasks, prompts added and removed, the playground
(`router`, behind the API key) and health (`open_router`). Every request is checked (limits, tasks, fields)
before its rows queue for the batcher, so a bad one never shares a batch with good ones."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any, Awaitable

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from ..encoding import BLANK, is_blank
from ..multitask import TaskInfo
from .bodies import GenerateBody, Input, PredictBody, PromptBody
from .page import page
from .sources import local_path
from .state import Served, ServedDep

router = APIRouter()
open_router = APIRouter()  # no key asked (guard.OPEN_PATHS)


def checked(served: Served, pairs: list[tuple[str, Input]], generate: bool = False) -> list[tuple[str, Input]]:
    """`pairs` once they pass the limits (413), then tasks (404) and fields (422), against one snapshot of the
    tasks."""
    limits = served.options
    if len(pairs) > limits.max_inputs:
        raise HTTPException(413, f"{len(pairs)} inputs in one request; the limit is {limits.max_inputs}")
    for i, (_, value) in enumerate(pairs):
        texts = [value] if isinstance(value, str) else list(value.values())
        if any(len(t) > limits.max_input_chars for t in texts):
            raise HTTPException(413, f"input {i} is over {limits.max_input_chars} characters")
    tasks = served.model.tasks()
    for i, (name, value) in enumerate(pairs):
        info = tasks.get(name)
        if info is None:
            raise HTTPException(404, f"unknown task {name!r}; this server has: {', '.join(sorted(tasks)) or 'none'}")
        _check_fields(info, value, i)
        if generate and not info.can_generate:
            raise HTTPException(422, f"task {name!r} cannot generate text (it needs a decoder prompt trained with "
                                     "label words)")
    served.model.check(pairs)  # what only the tokenizer can tell (an input of characters it drops), by request index
    return pairs


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


async def batched(request: Request, served: Served, key: tuple[str, int], pairs: list[tuple[str, Input]]) -> Any:
    """The batcher's results for `pairs`, or a 499 once the client has gone (its rows left unrun)."""
    results = await _unless_disconnected(request, served.batcher.submit(key, pairs))
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
    results = await batched(request, served, ("predict", 0), checked(served, body.pairs()))
    return results if isinstance(results, Response) else {"results": results}


@router.post("/v1/generate")
async def generate(body: GenerateBody, request: Request, served: ServedDep) -> Any:
    """Greedy free text after each input's prompt and template (decoder prompts trained with label words)."""
    pairs = checked(served, body.pairs(), generate=True)
    texts = await batched(request, served, ("generate", body.max_new_tokens), pairs)
    if isinstance(texts, Response):
        return texts
    return {"results": [{"task": task, "generated": text} for (task, _), text in zip(pairs, texts)]}


@router.get("/v1/tasks")
async def tasks(served: ServedDep) -> dict[str, Any]:
    """Every task served: its labels, input fields, ensemble members, and whether it can generate."""
    return {"base_model": served.model.base_name, "tasks": [asdict(info) for info in served.model.tasks().values()]}


@router.post("/v1/prompts", status_code=201, dependencies=[Depends(_writable)])
async def add_prompt(body: PromptBody, served: ServedDep) -> dict[str, Any]:
    """Load a checkpoint (a folder on the server's disk or a hub repo id) as a task or an ensemble member."""
    prompt = await run_in_threadpool(served.model.load, local_path(body.path), body.task, body.member)
    served.model.add(prompt)
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
