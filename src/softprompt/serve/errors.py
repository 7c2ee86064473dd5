"""Every error the server sends is `{"detail": "one line"}` with its status; these handlers make it so, whatever
raised it (pydantic, FastAPI, the model, a bug)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Coroutine

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SoftpromptError
from ..multitask import BaseMismatch, UnknownTask
from .bodies import INPUT_IS, UNION_TAGS

log = logging.getLogger(__name__)

Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]


def error(status: int, detail: str) -> JSONResponse:
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


async def _malformed(_: Request, err: RequestValidationError) -> Response:
    return error(422, _validation_line(err))


async def _http_error(_: Request, err: StarletteHTTPException) -> Response:
    if err.status_code == 400 and err.__cause__ is not None:  # FastAPI could not decode the body at all
        return error(422, _unparsable(err.__cause__))
    return error(err.status_code, str(err.detail))


def _status(status: int) -> Handler:
    """A handler answering the exception's message with `status`."""
    async def handler(_: Request, err: Exception) -> Response:
        return error(status, str(err))
    return handler


async def _bug(_: Request, err: Exception) -> Response:
    log.error("internal error", exc_info=err)
    return error(500, f"internal error ({type(err).__name__}); the server's log has the details")


# by exception class; Starlette picks the nearest along the raised one's MRO (UnknownTask before SoftpromptError)
HANDLERS: dict[int | type[Exception], Handler] = {
    RequestValidationError: _malformed, StarletteHTTPException: _http_error, UnknownTask: _status(404),
    BaseMismatch: _status(409), SoftpromptError: _status(422), Exception: _bug}
