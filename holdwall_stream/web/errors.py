"""Errors of the routing layer as JSON under /api/, like the views' own errors.

aiohttp answers an unknown path or a method a view does not take with a text/plain body
("405: Method Not Allowed"); API clients parse JSON, and the allowed methods belong in
the answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

API_PREFIX = "/api/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith(API_PREFIX):
            raise
        body: dict[str, object] = {"error": f"{exc.reason}: {request.method} {request.path}"}
        headers = {}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = sorted(exc.allowed_methods)
            body["allowed_methods"] = allowed
            headers["Allow"] = ", ".join(allowed)
        return web.json_response(body, status=exc.status, headers=headers)
