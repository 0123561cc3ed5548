"""Errors of the routing layer as JSON under /api/, like the views' own errors.

aiohttp answers an unknown path or a method a view does not take with a text/plain body
("405: Method Not Allowed"), and an exception a view did not expect with a text/plain
500; API clients parse JSON, and the allowed methods belong in the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)
API_PREFIX = "/api/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        if not request.path.startswith(API_PREFIX):
            raise
        if not isinstance(exc, web.HTTPException):  # a bug: logged, and no internals shown
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response(
                {"error": "internal error", "detail": type(exc).__name__}, status=500
            )
        if exc.status < 400:
            raise
        body: dict[str, object] = {"error": f"{exc.reason}: {request.method} {request.path}"}
        headers = {}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = sorted(exc.allowed_methods)
            body["allowed_methods"] = allowed
            headers["Allow"] = ", ".join(allowed)
        return web.json_response(body, status=exc.status, headers=headers)
