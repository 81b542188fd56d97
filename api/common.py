"""Helpers every facet's handlers share: the log's part of a request, public URLs, JSON
bodies with limits, positions."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from api.keys import LOG
from eventhub.errors import StoreCorrupt, StoreUnavailable

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

POSITION_HEADER = "Hub-Position"
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_json_encode = msgspec.json.Encoder().encode
_JSON_HEADERS = {"Content-Type": "application/json"}
log = logging.getLogger(__name__)


def route(
    handler: Handler,
    errors: type[Exception] | tuple[type[Exception], ...] = (),
    answer: Callable[[Any], web.StreamResponse] | None = None,
) -> Handler:
    """`handler` with the log's part of every request and its facet's error mapping.

    - an error of the facet (one of `errors`) becomes that facet's own answer (`answer`,
      called with that error);
    - a store that cannot serve answers 503 with a message, never a traceback;
    - `Hub-Position`: a read that names a position waits until this node has applied it,
      and a write reports the head after it, so a client can read on node B what it
      wrote through node A.

    One wrapper per route rather than an app middleware: aiohttp wraps every request in
    two more layers for a middleware, and an open websocket or SSE stream keeps them.
    """

    @functools.wraps(handler)
    async def routed(request: web.Request) -> web.StreamResponse:
        event_log = request.app[LOG]
        raw = request.headers.get(POSITION_HEADER)
        try:
            if raw:
                try:
                    position = int(raw)
                except ValueError:
                    return json_response({"error": f"{POSITION_HEADER} must be an integer"}, status=400)
                if not await event_log.wait_for(position, 10.0):
                    return json_response({"error": f"this node has not reached position {position} yet"}, status=503)
            response = await handler(request)
        except errors as exc:
            assert answer is not None
            return answer(exc)
        except StoreUnavailable as exc:
            return json_response({"error": "store unavailable", "message": str(exc)}, status=503)
        except StoreCorrupt as exc:
            log.error("corruption: %s", exc)
            return json_response({"error": "store corrupt", "message": str(exc), "position": exc.position}, status=503)
        if request.method not in _READS and not response.prepared:
            response.headers[POSITION_HEADER] = str(event_log.head)
        return response

    return routed


def base_url(request: web.Request) -> str:
    """`scheme://host` as the client called it, honouring X-Forwarded-Proto/Host."""
    headers = request.headers
    forwarded_proto = headers.get("X-Forwarded-Proto")
    forwarded_host = headers.get("X-Forwarded-Host")
    proto = forwarded_proto and forwarded_proto.split(",")[0].strip() or request.scheme
    host = forwarded_host and forwarded_host.split(",")[0].strip() or request.host
    return f"{proto}://{host}"


def ws_base_url(request: web.Request) -> str:
    url = base_url(request)
    return "wss" + url[5:] if url.startswith("https") else "ws" + url[4:]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # the header given as is: aiohttp's content_type argument parses and rebuilds it
    all_headers = {"Content-Type": "application/json", **headers} if headers else _JSON_HEADERS
    return web.Response(body=_json_encode(body), status=status, headers=all_headers)


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than {limit} bytes")
        self.limit = limit


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes before reading them."""
    length = request.content_length
    if length is not None:
        if length > limit:
            raise BodyTooLarge(limit)
        content = request.content
        if content.is_eof():  # the parser already holds all of it: a small body comes with its headers
            return content.read_nowait()
        return await request.read()  # the parser stops at Content-Length: no more can come
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes, type: type[T]) -> T:
    """Decode and validate; raises msgspec.DecodeError / ValidationError with a readable message."""
    return msgspec.json.decode(body, type=type)


class JSONError(web.HTTPException):
    """An HTTP error with a JSON body; raise it from a handler in any facet's own shape."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(text=_json_encode(body).decode(), content_type="application/json", headers=headers)
