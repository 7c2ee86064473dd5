"""OpenAI's API over the served tasks, for the clients people already have (the `openai` library, LangChain, curl
scripts): `/v1/completions`, `/v1/chat/completions` and `/v1/models`. `model` names a task, or the base model.

A task asked without max_tokens classifies: its label is the text, with every label's log-probability (the log of
the probability /v1/predict gives) as the completion's `logprobs`. With max_tokens, a task that can generate
continues after its template, and the base model after the prompt (or the chat, through its tokenizer's chat
template), greedy at temperature 0 and sampled otherwise, streamed as server-sent events when asked. The requests
go through the same checks and batcher as /v1/predict and /v1/generate. docs/serving.md has the mapping and what
is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..multitask import Generated, TaskInfo, Wants
from .bodies import Input
from .errors import Refused, openai_error, status_of
from .openai_bodies import ChatBody, CompletionBody, OpenAIBody
from .routes import batched, checked, new_tokens, tag
from .state import Served, ServedDep

log = logging.getLogger(__name__)

router = APIRouter()

LOG_ZERO = -9999.0  # the log of a probability that rounds to 0 (JSON has no -inf), as vLLM writes it
BASE_MAX_TOKENS = 16  # OpenAI's default max_tokens for a completion (chat's: this server's limit)
DONE = "data: [DONE]\n\n"


class _Shape:
    """How /v1/completions writes a choice (`text`), whole or as a stream's piece."""

    kind, chunk_kind, prefix = "text_completion", "text_completion", "cmpl"

    def choice(self, index: int, text: str, finish: str, logprobs: dict | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def opening(self, index: int) -> dict[str, Any] | None:
        """A stream's first piece of a choice, before any text (chat's role)."""
        return None

    def piece(self, index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def label_logprobs(self, label: str, logprobs: dict[str, float]) -> dict[str, Any]:
        """A classification's answer as a one-token completion whose alternatives are every label."""
        return {"tokens": [label], "token_logprobs": [logprobs[label]], "top_logprobs": [logprobs],
                "text_offset": [0]}


class _ChatShape(_Shape):
    """How /v1/chat/completions writes a choice (`message`, a stream's `delta`)."""

    kind, chunk_kind, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def choice(self, index: int, text: str, finish: str, logprobs: dict | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def opening(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def piece(self, index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish}

    def label_logprobs(self, label: str, logprobs: dict[str, float]) -> dict[str, Any]:
        def token(text: str) -> dict[str, Any]:
            return {"token": text, "logprob": logprobs[text], "bytes": list(text.encode())}
        return {"content": [{**token(label), "top_logprobs": [token(other) for other in logprobs]}]}


@dataclass
class _Reply:
    """One request's answer: its id, time, model and usage, whole or as server-sent events."""

    shape: _Shape
    model: str
    prompt_tokens: int
    usage_chunk: bool  # stream_options.include_usage: a last chunk with the usage, and `usage: null` before it
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = f"{self.shape.prefix}-{uuid.uuid4().hex}"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, choices: list[dict[str, Any]], completion_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": self.shape.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(completion_tokens)}

    def event(self, pieces: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        chunk: dict[str, Any] = {"id": self.id, "object": self.shape.chunk_kind, "created": self.created,
                                 "model": self.model, "choices": pieces}
        if self.usage_chunk:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    def openings(self, count: int) -> list[str]:
        return [self.event([piece]) for i in range(count) if (piece := self.shape.opening(i)) is not None]

    def closing(self, completion_tokens: int) -> list[str]:
        return ([self.event([], self.usage(completion_tokens))] if self.usage_chunk else []) + [DONE]


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _each(events: list[str]) -> AsyncIterator[str]:
    for event in events:
        yield event


@router.get("/v1/models")
async def models(served: ServedDep) -> dict[str, Any]:
    """The base model and every task, a task's `parent` the base model (as vLLM lists LoRA adapters)."""
    base = served.model.base_name
    return {"object": "list", "data": [_card(base, None), *(_card(task, base) for task in served.model.tasks())]}


@router.get("/v1/models/{model:path}")
async def model(model: str, served: ServedDep) -> dict[str, Any]:
    """One of /v1/models' entries."""
    base = served.model.base_name
    if model != base and model not in served.model.tasks():
        raise _unknown(model, served)
    return _card(model, None if model == base else base)


def _card(name: str, parent: str | None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "softprompt", "parent": parent}


def _unknown(model: str, served: Served) -> Refused:
    names = [served.model.base_name, *sorted(served.model.tasks())]
    return Refused(404, f"model {model!r} is not served here; GET /v1/models lists them: {', '.join(names)}",
                   param="model", code="model_not_found")


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request, served: ServedDep) -> Any:
    """A task's label (no max_tokens) or continuation of each prompt, or the base model's continuation."""
    info = _resolve(body, request, served)
    inputs: list[Input] = list(body.prompt) if info is None else [_task_input(info, t, "prompt") for t in body.prompt]
    asked = (body.max_tokens or BASE_MAX_TOKENS) if info is None else body.max_tokens
    return await _answer(request, served, body, _Shape(), info, inputs, asked, "max_tokens", body.logprobs is not None)


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, request: Request, served: ServedDep) -> Any:
    """A task's label or continuation for the last user message (read through the task's own template, as it was
    trained), or the base model's answer to the chat (through its tokenizer's chat template, where it has one)."""
    info = _resolve(body, request, served)
    last, asked = body.last_user(), body.asked_tokens()
    if info is None and served.model.tokenizer.chat_template:
        given: Input | list[dict[str, str]] = body.chat()
    elif last is None:
        raise Refused(400, "messages: no user message to answer", param="messages")
    else:
        given = last if info is None else _task_input(info, last, "messages")
    if info is None:
        asked = asked or served.options.max_new_tokens
    limit = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    return await _answer(request, served, body, _ChatShape(), info, [given], asked, limit, bool(body.logprobs))


def _resolve(body: OpenAIBody, request: Request, served: Served) -> TaskInfo | None:
    """The task `body.model` names (None: the base model), once no field is refused (400) and the model is served
    (404)."""
    refused = body.refused()
    if refused:
        raise Refused(400, f"{refused[0]}: {refused[1]}", param=refused[0])
    tasks = served.model.tasks()
    if body.model != served.model.base_name and body.model not in tasks:
        raise _unknown(body.model, served)
    tag(request, [body.model])
    return None if body.model == served.model.base_name else tasks[body.model]


def _task_input(info: TaskInfo, text: str, param: str) -> Input:
    """A task's input from a prompt: the text itself for a one-field task, a JSON object with a text for each field
    for a pair (or more) task."""
    if len(info.fields) == 1:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or any(f not in value or not isinstance(value[f], str) for f in info.fields):
        example = json.dumps({f: "..." for f in info.fields})
        raise Refused(400, f"{param}: task {info.name!r} takes the fields {', '.join(info.fields)}: give a JSON "
                           f"object with a text for each, e.g. {example}", param=param)
    return {f: value[f] for f in info.fields}


async def _answer(request: Request, served: Served, body: OpenAIBody, shape: _Shape, info: TaskInfo | None,
                  inputs: Sequence[Input | list[dict[str, str]]], asked: int | None, limit: str,
                  wants_logprobs: bool) -> Any:
    """Classify (a task asked without max_tokens: `asked` None) or generate, whole or streamed."""
    task = None if info is None else info.name
    items = [(task, given) for given in inputs]
    usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
    if asked is None:
        reply = _Reply(shape, body.model, sum(checked(served, items)), usage_chunk)
        return await _classified(request, served, reply, items, bool(body.stream))
    if wants_logprobs:
        raise Refused(400, "logprobs: only a classification answer carries log-probabilities (every label's); "
                           "generated text has none here", param="logprobs")
    new = new_tokens(served, asked, limit)
    reply = _Reply(shape, body.model, sum(checked(served, items, generate=True, max_new_tokens=new)), usage_chunk)
    key, stop, cancel = ("generate", body.sampling(new)), tuple(body.stop or ()), threading.Event()
    if body.stream:
        return _stream(_generated_events(served, reply, key, items, body.seed, stop, cancel))
    rows = [(task, given, Wants(body.seed, stop, None, cancel)) for task, given in items]
    out = await batched(request, served, key, rows, cancel)
    if isinstance(out, Response):
        return out
    choices = [shape.choice(i, g.text, g.finish_reason, None) for i, g in enumerate(out)]
    return reply.whole(choices, sum(g.tokens for g in out))


async def _classified(request: Request, served: Served, reply: _Reply, items: list[Any], stream: bool) -> Any:
    """Each input's label (or value), as /v1/predict answers it, with every label's log-probability."""
    results = await batched(request, served, ("predict", None), items)
    if isinstance(results, Response):
        return results
    choices: list[tuple[str, dict[str, Any] | None]] = []
    for result in results:
        if "value" in result:  # regression: the value as text
            choices.append((str(result["value"]), None))
        else:
            logprobs = {label: math.log(p) if p > 0 else LOG_ZERO for label, p in result["scores"].items()}
            choices.append((result["label"], reply.shape.label_logprobs(result["label"], logprobs)))
    if not stream:
        return reply.whole([reply.shape.choice(i, text, "stop", lp) for i, (text, lp) in enumerate(choices)], 0)
    pieces = [reply.event([reply.shape.piece(i, text, "stop", lp)]) for i, (text, lp) in enumerate(choices)]
    return _stream(_each(reply.openings(len(choices)) + pieces + reply.closing(0)))


async def _generated_events(served: Served, reply: _Reply, key: tuple[str, Any], items: list[Any], seed: int | None,
                            stop: tuple[str, ...], cancel: threading.Event) -> AsyncIterator[str]:
    """The stream of a generation: each choice's text as it comes, then its finish; a client that leaves stops
    its rows at their next token (the response stops this iterator; `finally` sets `cancel`)."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue[tuple[int, str] | None]()

    def put(index: int, text: str) -> None:  # on the model's thread
        loop.call_soon_threadsafe(queue.put_nowait, (index, text))

    rows = [(task, given, Wants(seed, stop, partial(put, i), cancel)) for i, (task, given) in enumerate(items)]
    job = asyncio.ensure_future(served.batcher.submit(key, rows))
    job.add_done_callback(lambda _: queue.put_nowait(None))  # after every piece: both reach the loop in order
    try:
        for event in reply.openings(len(items)):
            yield event
        while (item := await queue.get()) is not None:
            yield reply.event([reply.shape.piece(*item)])
        try:
            out: list[Generated] = job.result()
        except Exception as err:  # noqa: BLE001 -- the status line went out already: the error is an event
            yield _error_event(err)
            yield DONE
            return
        yield reply.event([reply.shape.piece(i, "", g.finish_reason) for i, g in enumerate(out)])
        for event in reply.closing(sum(g.tokens for g in out)):
            yield event
    finally:
        cancel.set()
        job.cancel()


def _error_event(err: Exception) -> str:
    """A failure after the stream began, as an event in OpenAI's error shape."""
    status = status_of(err)
    if status == 500:
        log.error("internal error in a stream", exc_info=err)
    message = str(err) if status < 500 else f"internal error ({type(err).__name__}); the server's log has the details"
    return f"data: {json.dumps(openai_error(status, message))}\n\n"
