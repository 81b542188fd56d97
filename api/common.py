"""Helpers every facet's handlers share: public URLs, JSON bodies with limits, positions."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from aiohttp import web

T = TypeVar("T")

POSITION_HEADER = "Hub-Position"
_json_encode = msgspec.json.Encoder().encode


def base_url(request: web.Request) -> str:
    """`scheme://host` as the client called it, honouring X-Forwarded-Proto/Host."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() or request.scheme
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or request.host
    return f"{proto}://{host}"


def ws_base_url(request: web.Request) -> str:
    url = base_url(request)
    return "wss" + url[5:] if url.startswith("https") else "ws" + url[4:]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_json_encode(body), status=status, content_type="application/json", headers=headers)


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
