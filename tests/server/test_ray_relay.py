"""The Ray ingress's hop (gpt2_engine.server.ray_relay) without Ray: relay_app in front of exchange()
on a small ASGI app, with a stand-in for the deployment handle that can fail like a killed replica."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import require_modules

require_modules("fastapi", "uvicorn", "pydantic")

import httpx  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from gpt2_engine.server.ray_relay import exchange, relay_app  # noqa: E402


async def _echo(request: Request):
    return JSONResponse({"path": request.url.path, "query": request.url.query, "body": (await request.body()).decode(),
                         "auth": request.headers.get("authorization")})


async def _events(request: Request):
    async def events():
        for i in range(3):
            yield f"data: {i}\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


REPLICA_APP = Starlette(routes=[Route("/echo", _echo, methods=["POST"]), Route("/events", _events)])


class _Replica:
    """Stands in for `handle.options(stream=True).forward`: .remote() streams exchange()'s messages, and
    the replica "dies" (raises, as Ray's ActorDiedError) after `messages_before_death` of them."""

    def __init__(self, messages_before_death: int | None = None):
        self.messages_before_death = messages_before_death

    def remote(self, scope: dict, body: bytes):
        return _Responses(exchange(REPLICA_APP, scope, body), self.messages_before_death)


class _Responses:
    def __init__(self, messages, messages_before_death):
        self.messages, self.left = messages, messages_before_death

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.left == 0:
            raise RuntimeError("the replica's process died")
        self.left = None if self.left is None else self.left - 1
        return await self.messages.__anext__()

    def cancel(self):
        pass


def _client(replica: _Replica, max_body_size: int = 1000) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=relay_app(replica, max_body_size)), base_url="http://relay")


def test_the_replica_answer_reaches_the_client_unchanged():
    async def run():
        async with _client(_Replica()) as http:
            echoed = await http.post("/echo?a=1", content=b"hello", headers={"authorization": "Bearer k"})
            events = await http.get("/events")
        return echoed, events

    echoed, events = asyncio.run(run())
    assert echoed.status_code == 200
    assert echoed.json() == {"path": "/echo", "query": "a=1", "body": "hello", "auth": "Bearer k"}
    assert events.headers["content-type"].startswith("text/event-stream")
    assert events.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


@pytest.mark.parametrize("messages_before_death", [0, 1])
def test_a_replica_that_dies_before_answering_gets_its_client_a_502(messages_before_death):
    async def run():
        async with _client(_Replica(messages_before_death)) as http:
            return await http.post("/echo", content=b"hello")

    if messages_before_death == 1:      # the status line was sent: a JSON answer cannot be completed
        with pytest.raises(RuntimeError, match="died"):
            asyncio.run(run())
        return
    response = asyncio.run(run())
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "replica_failed"


def test_a_replica_that_dies_mid_stream_ends_the_stream_with_an_error_event():
    async def run():
        async with _client(_Replica(messages_before_death=3)) as http:    # start, two events
            return await http.get("/events")

    response = asyncio.run(run())
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[:2] == ["0", "1"]
    assert json.loads(events[-1])["error"]["code"] == "replica_failed"


def test_a_body_over_the_limit_is_refused_at_the_ingress():
    async def run():
        async with _client(_Replica(), max_body_size=4) as http:
            return await http.post("/echo", content=b"hello")

    response = asyncio.run(run())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_closing_the_exchange_tells_the_app_its_client_disconnected():
    seen = []

    async def app(scope, receive, send):
        await receive()                               # the body
        seen.append((await receive())["type"])        # blocks until the exchange is closed

    async def run():
        messages = exchange(app, {"method": "GET", "path": "/"}, b"")
        step = asyncio.ensure_future(messages.__anext__())
        await asyncio.sleep(0.01)
        step.cancel()                 # the ingress's call cancelled (its client left)
        await asyncio.gather(step, return_exceptions=True)
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert seen == ["http.disconnect"]
