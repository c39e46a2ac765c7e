"""A request's body in and a response out, under the service's limits; errors as JSON.

    body = await read_body(request, limit=..., timeout_s=...)   # 413 / 408 / 400, or the bytes
    return tensor_response({"video": video})                     # safetensors, streamed when large

Every refusal is an `ApiError`, answered by the app as {"error": message} with its status.
"""
from __future__ import annotations

import asyncio
from typing import Dict, Optional

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from stepvideo.serving import wire

# Responses up to this size are sent in one piece; larger ones are streamed in chunks.
_STREAM_ABOVE_BYTES = 8 * 1024 * 1024


class ApiError(Exception):
    """An HTTP error answered as {"error": message} (and "request_id" when one is given)."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None,
                 request_id: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.request_id = status, message, headers, request_id


def error_response(status: int, message: str, headers: Optional[Dict[str, str]] = None,
                   request_id: Optional[str] = None) -> JSONResponse:
    body = {"error": message, **({"request_id": request_id} if request_id else {})}
    return JSONResponse(body, status_code=status, headers=headers)


def _media_type(request: Request) -> tuple:
    """(type/subtype lower-case, {param: value}) of the request's Content-Type."""
    raw = request.headers.get("content-type", "")
    main, *params = raw.split(";")
    values = {}
    for p in params:
        key, _, value = p.partition("=")
        values[key.strip().lower()] = value.strip().strip('"').lower()
    return main.strip().lower(), values


def require_media_type(request: Request, expected: str) -> None:
    """415 unless the Content-Type is `expected` (charset, if given, utf-8)."""
    got, params = _media_type(request)
    if got != expected:
        raise ApiError(415, f"Content-Type must be {expected}, got {request.headers.get('content-type', 'none')!r}")
    charset = params.get("charset")
    if charset is not None and charset not in ("utf-8", "utf8"):
        raise ApiError(415, f"charset must be utf-8, got {charset!r}")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytearray:
    """The body, refused with 413 as soon as its declared or received size passes `limit`,
    and with 408 if it has not fully arrived `timeout_s` seconds after the headers."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length must be a non-negative integer, got {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                                "(server option --max_body_mb)")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit} bytes "
                                        "(server option --max_body_mb)")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s ({len(body)} bytes came; "
                            "server option --body_timeout)", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    if not body:
        raise ApiError(400, "empty request body")
    return body


def tensor_response(tensors: Dict[str, np.ndarray]) -> Response:
    """The arrays as one safetensors body; streamed in chunks above `_STREAM_ABOVE_BYTES`."""
    total, parts = wire.encode_parts(tensors)
    if total <= _STREAM_ABOVE_BYTES:
        return Response(b"".join(parts), media_type=wire.MEDIA_TYPE)
    return StreamingResponse(wire.iter_chunks(parts), media_type=wire.MEDIA_TYPE,
                             headers={"content-length": str(total)})
