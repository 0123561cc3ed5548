"""Errors under /api/ are JSON, whatever raised them; other paths are left to aiohttp."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from holdwall_stream.web.errors import json_errors


async def _broken(request: web.Request) -> web.Response:
    raise RuntimeError("secret internals")


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/api/broken", _broken)
    app.router.add_get("/other/broken", _broken)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_an_exception_a_view_did_not_expect_is_a_json_500_without_internals(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = await client.get("/api/broken")
    assert response.status == 500
    assert await response.json() == {"error": "internal error", "detail": "RuntimeError"}
    assert "GET /api/broken failed" in caplog.text  # the traceback goes to the log


async def test_paths_outside_the_api_keep_aiohttps_answers(client: TestClient) -> None:
    response = await client.get("/other/broken")
    assert response.status == 500
    assert response.content_type == "text/plain"
    missing = await client.get("/api/nothing-here")
    assert missing.status == 404
    assert (await missing.json())["error"] == "Not Found: GET /api/nothing-here"
