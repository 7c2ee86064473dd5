"""Every error the server sends is `{"detail": "one line"}` with its status, or on the OpenAI-compatible routes
OpenAI's `{"error": {"message", "type", "param", "code"}}`; these handlers make it so, whatever raised it (pydantic,
FastAPI, the model, a bug)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Coroutine

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SoftpromptError
from ..multitask import BaseMismatch, UnknownTask
from .bodies import INPUT_IS, UNION_TAGS

log = logging.getLogger(__name__)

Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]


OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


def openai_path(path: str) -> bool:
    """Whether `path` is one of the OpenAI-compatible routes, whose errors take OpenAI's shape."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


class Refused(HTTPException):
    """A refusal naming the request field it is about (`param`) and, for OpenAI's clients, a `code`."""

    def __init__(self, status: int, detail: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status, detail)
        self.param, self.code = param, code


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: its type `invalid_request_error` for a 4xx (as OpenAI's own), `server_error` for a
    5xx; the field it is about; a code where one says more than the message (`model_not_found`)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, detail: str, path: str = "", param: str | None = None, code: str | None = None) -> JSONResponse:
    """The answer to a refused request at `path`: `{"detail": ...}`, or on an OpenAI route OpenAI's error object."""
    body = openai_error(status, detail, param, code) if openai_path(path) else {"detail": detail}
    return JSONResponse(body, status_code=status)


def _validation(err: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's first complaint as one line, e.g. `inputs.0: Input should be a valid string`, and the field it is
    about."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if not loc and first.get("type") == "missing":
        return "the body is empty; send a JSON object, with Content-Type: application/json", None
    if not loc and first.get("type") == "model_attributes_type":
        return "the body must be a JSON object, sent with Content-Type: application/json", None
    if any(p in UNION_TAGS for p in loc):  # pydantic names the union branch it tried: say what an input is
        loc, message = loc[:min(loc.index(p) for p in UNION_TAGS if p in loc)], INPUT_IS
    where = ".".join(loc)
    return (f"{where}: {message}" if where else message), where or None


def _unparsable(cause: BaseException) -> str:
    """Why a body FastAPI could not even decode is refused, in one line."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 text (byte {cause.object[cause.start:cause.start + 1]!r} at offset " \
               f"{cause.start}); send UTF-8 JSON"
    if isinstance(cause, RecursionError):
        return "the body's JSON nests too deeply to read; send a flatter object"
    return f"the body could not be read as JSON ({type(cause).__name__}); send a UTF-8 JSON object"


async def _malformed(request: Request, err: RequestValidationError) -> Response:
    line, where = _validation(err)
    return error(422, line, request.url.path, where)


async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
    if err.status_code == 400 and err.__cause__ is not None:  # FastAPI could not decode the body at all
        return error(422, _unparsable(err.__cause__), request.url.path)
    return error(err.status_code, str(err.detail), request.url.path, getattr(err, "param", None),
                 getattr(err, "code", None))


def _status(status: int) -> Handler:
    """A handler answering the exception's message with `status`."""
    async def handler(request: Request, err: Exception) -> Response:
        return error(status, str(err), request.url.path)
    return handler


async def _bug(request: Request, err: Exception) -> Response:
    log.error("internal error", exc_info=err)
    return error(500, f"internal error ({type(err).__name__}); the server's log has the details", request.url.path)


# the model's refusals, by exception class (the nearest along the raised one's MRO: UnknownTask before SoftpromptError)
STATUS: dict[type[Exception], int] = {UnknownTask: 404, BaseMismatch: 409, SoftpromptError: 422}


def status_of(err: BaseException) -> int:
    """The status an exception is answered with: a model's refusal's, else 500 (a bug)."""
    return next((STATUS[cls] for cls in type(err).__mro__ if cls in STATUS), 500)


HANDLERS: dict[int | type[Exception], Handler] = {
    RequestValidationError: _malformed, StarletteHTTPException: _http_error,
    **{cls: _status(status) for cls, status in STATUS.items()}, Exception: _bug}
