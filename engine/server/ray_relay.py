"""One HTTP exchange carried over a Ray Serve deployment handle, for `serve --replicas N`.

Ray Serve's proxy hands each request to the ingress deployment, whose ASGI app (`relay_app`) reads
the body and calls a replica through a streaming handle; the replica runs its own FastAPI app on the
request in its process (`exchange`) and streams back the ASGI messages that app sends, which the
ingress passes on to the client unchanged (status, headers with x-gpt2-engine-replica, body chunks).

Why the hop: with the proxy talking to the replicas directly, a replica that dies mid-answer leaves
its clients with a cut connection and no answer. Here the ingress sees the handle fail and answers
for it: a 502 in OpenAI's error JSON when nothing was sent yet, an SSE error event (as a drained
request's) when a stream was under way.

Disconnects cross the hop both ways: a client that leaves cancels the ingress's request, which
cancels the handle call; the replica's `exchange` is then closed and its app's `receive` answers
http.disconnect, so the app aborts the router requests as it does for a direct client.
"""
from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import JSONResponse

from gpt2_engine.server.protocol import APIError, read_body

# What of the ingress's ASGI scope the replica's app needs to route and answer the request.
_SCOPE_KEYS = ("http_version", "method", "scheme", "path", "query_string", "headers", "client")


def relay_app(forward, max_body_size: int):
    """The ingress's ASGI app: each HTTP request goes to forward.remote(scope, body) (a streaming
    deployment handle method yielding ASGI messages) and its messages come back to the client."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":       # nothing to start or stop
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        try:
            body = await read_body(Request(scope, receive), max_body_size)
        except APIError as exc:
            return await JSONResponse(exc.body(), status_code=exc.status)(scope, receive, send)
        responses = forward.remote({key: scope[key] for key in _SCOPE_KEYS if key in scope}, body)
        answered = False
        try:
            await _pass_on(responses, send)
            answered = True
        finally:
            if not answered:      # the client left (this task was cancelled): stop the replica's work
                responses.cancel()

    return app


async def _pass_on(responses, send) -> None:
    """Send the replica's ASGI messages; if the replica fails before its last one, answer for it."""
    started = streaming = False
    try:
        async for message in responses:
            if message["type"] == "http.response.start":
                started = True
                streaming = dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                return
        raise RuntimeError("the replica ended the exchange without a complete answer")
    except Exception as exc:        # the replica died or was lost (Ray raises ActorDiedError and kin)
        error = APIError(502, f"the replica serving this request failed ({type(exc).__name__}); retry it",
                         code="replica_failed")
        if not started:
            await send({"type": "http.response.start", "status": error.status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(error.body()).encode()})
        elif streaming:
            await send({"type": "http.response.body", "body": f"data: {json.dumps(error.body())}\n\n".encode()})
        else:
            raise     # a non-streamed answer half sent: the connection is cut, nothing valid can follow


async def exchange(app, scope: dict, body: bytes):
    """Run one HTTP request (the ingress's scope and the whole body) through the ASGI `app` in this
    process, yielding each ASGI message the app sends. Closing this generator (the ingress's call
    was cancelled) tells the app the client disconnected."""
    sent: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_taken = False

    async def receive():
        nonlocal body_taken
        if not body_taken:
            body_taken = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.put_nowait(message)

    full_scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
                  "query_string": b"", "headers": [], "client": None, "server": None, "root_path": "", **scope}
    full_scope["raw_path"] = full_scope["path"].encode()
    task = asyncio.ensure_future(app(full_scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            yield message
        task.result()         # the app's own failure, if it raised instead of answering
    finally:
        disconnected.set()
        task.add_done_callback(lambda done: done.cancelled() or done.exception())   # retrieved: no log noise
