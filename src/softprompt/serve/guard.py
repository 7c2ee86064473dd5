"""The checks made before any work: the API key (401) and the body's size (413), as ASGI middleware."""

from __future__ import annotations

import hmac
from urllib.parse import unquote

from starlette.responses import Response

from .errors import error
from .page import page

KEY_COOKIE = "softprompt_key"  # set by the login page; accepted on GET only, so it cannot carry a forged POST
OPEN_PATHS = frozenset({"/health"})  # and /metrics with --metrics-open


class Guard:
    """Refuses a request without the key (a browser gets the login page) or with too large a body; the body is
    read here, at most `max_body_bytes` of it, and handed on to the app in one piece."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app, self.api_key, self.max_body_bytes, self.open_paths = app, api_key, max_body_bytes, open_paths

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
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        body = await self._read(receive)
        if body is None:
            return  # the client left before sending its body
        if len(body) > self.max_body_bytes:
            return await self._too_large(scope["path"])(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    def _refusal(self, scope, headers: dict[str, str]) -> Response | None:
        """The answer to a request refused before its body is read: no key, or a declared length over the limit."""
        path = scope["path"]
        if self.api_key and path not in self.open_paths and not self._authorized(scope["method"], headers):
            if scope["method"] == "GET" and "text/html" in headers.get("accept", ""):  # a browser: the login page
                return page("login", status_code=401)
            return error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' or "
                              "'X-API-Key: KEY'", path, code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self._too_large(path)
        return None

    async def _read(self, receive) -> bytes | None:
        """The body, read until it ends or passes the limit; None if the client leaves first."""
        body, more = bytearray(), True
        while more and len(body) <= self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
        return bytes(body)

    def _too_large(self, path: str) -> Response:
        return error(413, f"the body is over {self.max_body_bytes} bytes", path)


def _replay(body: bytes, receive):
    """A `receive` handing the app the whole body at once, then waiting as `receive` does (for the disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
