"""The FastAPI app: OpenAI's /v1/completions and /v1/models, /health and /metrics, on one GPT2's
request router (so every HTTP request is batched with the others by the engine's scheduler).

    build_app(model, served_model_name=..., api_key=..., max_queue=..., max_body_size=...) -> FastAPI

A request's prompts each become one router request with n return sequences (choice index =
prompt * n + sequence, as OpenAI orders them). A streaming client that disconnects, or a choice
cut at a stop string, closes its router stream, which frees the KV blocks before it returns.

The event loop only moves bytes: parsing the body, tokenizing, the engine's checks, queueing the
router requests and /metrics run in worker threads, so one request's size cannot stall the streams
of the others. Echo with logprobs asks the engine for prompt logprobs, which its steps compute chunk
by chunk of the prefill (gpt2_engine.prompt_logprobs): admitted and bounded like any prompt. A
client that leaves while its request is still being prepared or queued aborts it there (the
prompts queued so far are closed). A request asks for at most
max_num_seqs sequences (prompts x n): more could never run at once (so they would never fit,
whatever max_queue), and one request must not fill the waiting queue ahead of everybody else.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from gpt2_engine.llm_engine import CheckedRequest
from gpt2_engine.router import RouterClosed
from gpt2_engine.sequence import PromptLogprobs
from gpt2_engine.server.choices import Choice
from gpt2_engine.server.metrics import ServerMetrics
from gpt2_engine.server.protocol import (APIError, CompletionRequest, Prompt, bad_request, for_prompts, prompts_of,
                                         read_body, sampling_params)

_DONE = object()          # a pump's end marker in the streaming queue
DEFAULT_MAX_BODY_SIZE = 4 * 1024 * 1024


class ClientGone(Exception):
    """The client disconnected before its request was admitted."""


class CompletionServer:
    """The routes' state: the model, its name, admission control, metrics."""

    def __init__(self, model, *, served_model_name: str, api_key: str | None, max_queue: int | None,
                 max_body_size: int = DEFAULT_MAX_BODY_SIZE):
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 0):
            raise ValueError(f"max_queue must be a non-negative integer, got {max_queue!r}")
        if not isinstance(max_body_size, int) or max_body_size < 1:
            raise ValueError(f"max_body_size must be a positive integer, got {max_body_size!r}")
        if model.router is None:
            raise ValueError("the server needs a runtime backend (triton or torch), not backend='eager'")
        self.model, self.router = model, model.router
        self.name, self.api_key, self.max_queue = served_model_name, api_key, max_queue
        self.max_body_size = max_body_size
        self.metrics = ServerMetrics(self.router.stats)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._admission = asyncio.Lock()
        self._scrape: asyncio.Future | None = None
        self.draining = False      # set by a Ray Serve replica's drain: new completions get a 503
        self.created = int(time.time())

    @property
    def max_num_seqs(self) -> int:
        return self.router.max_num_seqs

    # ---- checks ------------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    # ---- admission ---------------------------------------------------------------------------

    async def admit(self, checked: list[CheckedRequest], gone: threading.Event):
        """Queue the checked prompts as router requests, or refuse with 429 when the waiting queue is full.
        With max_queue, admissions are serialised so that concurrent requests cannot overfill it."""
        if self.max_queue is None:
            return await asyncio.to_thread(self._add, checked, gone)
        num_seqs = sum(request.n for request in checked)
        async with self._admission:
            stats = await asyncio.to_thread(self.router.stats)
            if stats["num_waiting"] + num_seqs > self.max_queue + max(0, self._free_slots(stats)):
                raise APIError(429, f"the waiting queue is full ({stats['num_waiting']} sequences waiting, "
                                    f"max_queue={self.max_queue}); retry later", code="queue_full")
            return await asyncio.to_thread(self._add, checked, gone)

    def _add(self, checked: list[CheckedRequest], gone: threading.Event):
        """Add the router requests (a worker thread); stop, closing those added, once `gone` is set."""
        streams = []
        try:
            for request in checked:
                if gone.is_set():
                    raise ClientGone
                streams.append(self.router.add_checked(request))
        except BaseException as exc:
            for stream in streams:
                stream.close()
            if isinstance(exc, RouterClosed):
                raise APIError(503, "the server is shutting down") from None
            raise
        return streams

    def _free_slots(self, stats) -> int:
        """Running slots nobody holds: a request that takes them does not wait."""
        return self.max_num_seqs - stats["num_running"] - stats["num_waiting"]

    # ---- one completion ----------------------------------------------------------------------

    def prepare(self, body: bytes):
        """Parse, tokenize and check one request (a worker thread): the request, its prompts,
        each prompt's CheckedRequest (the router's one validation) and the choices to fill."""
        request = CompletionRequest.parse(body)
        self.check_model(request.model)
        tokenizer, config = self.model.tokenizer, self.model.config
        prompts = prompts_of(request, tokenizer)
        # the cap on sequences per request (module docstring); a request beyond it can never fit: 400, not 429
        cap = self.max_num_seqs
        if len(prompts) * request.n > cap:
            raise APIError(400, f"a request asks for at most {cap} sequences (prompts x n, the server's max_num_seqs), "
                                f"got {len(prompts)} prompts x n={request.n}",
                           param="n" if len(prompts) == 1 else "prompt")
        stop = request.stop_strings
        params = for_prompts([sampling_params(request, p, config.n_positions, config.eos_token_id) for p in prompts])
        try:
            checked = [self.router.check(prompt.token_ids, p, request.n) for prompt, p in zip(prompts, params)]
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        choices = [Choice(tokenizer, eos_token_ids=p.eos_token_ids, stop=stop, logprobs=request.logprobs,
                          prefix=prompt.text if request.echo else "")
                   for prompt, p in zip(prompts, params) for _ in range(request.n)]
        return request, prompts, checked, choices

    async def pump(self, r: int, stream, request: CompletionRequest, prompt: Prompt, choices: list[Choice],
                   arrival: float, emit) -> None:
        """Feed one router request's events into its choices; per token emit(choice index, text delta,
        finish_reason, new logprobs entries or None). Echo with logprobs: the prompt's logprobs come
        first (PromptLogprobs events) and go into its choices before the first token; a score-only
        request (max_tokens 0) ends there, its echoed prompt emitted whole.
        Ends (closing the stream) when all its choices are finished, stop strings included."""
        n, last = request.n, {}
        own = range(r * n, (r + 1) * n)
        # each prompt token's logprob and top ones (OpenAI gives the first token none)
        prompt_entries = ([None], [None]) if request.echo and request.logprobs is not None else None
        async for event in stream:
            if isinstance(event, PromptLogprobs):
                prompt_entries[0].extend(event.logprobs)
                prompt_entries[1].extend(event.top_logprobs)
                continue
            if prompt_entries is not None:       # the first token: the prompt's entries are all in
                for index in own:
                    choices[index].add_prompt_logprobs(prompt.token_ids, *prompt_entries)
                prompt_entries = None
            if request.score_only:
                for index in own:
                    choices[index].finish_reason = "length"
                    emit(index, choices[index].text, "length", choices[index].take_logprobs())
                stream.close()
                return
            now = time.perf_counter()
            index = r * n + event.index
            if index in last:
                self.metrics.itl.observe(now - last[index])
            elif not last:
                self.metrics.ttft.observe(now - arrival)
            last[index] = now
            choice = choices[index]
            if choice.finished:      # cut at a stop string while its sibling sequences still run
                continue
            delta = choice.push(event.token_id, event.finish_reason, event.logprob, event.top_logprobs)
            emit(index, delta, choice.finish_reason, choice.take_logprobs())
            if all(choices[index].finished for index in own):
                stream.close()
                return

    def usage(self, prompts, choices) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)     # once per prompt whatever n (as vLLM)
        completion_tokens = sum(c.num_tokens for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def scrape(self) -> bytes:
        """/metrics' text, made in a worker thread (the engine's stats wait for a step to end); scrapes
        that arrive while one is being made share it."""
        if self._scrape is None:
            self._scrape = asyncio.ensure_future(asyncio.to_thread(generate_latest, self.metrics.registry))
            self._scrape.add_done_callback(lambda _: setattr(self, "_scrape", None))
        return await asyncio.shield(self._scrape)


class _ReplicaHeader:
    """ASGI middleware naming the process that answered (x-gpt2-engine-replica), so that clients can
    see how Ray Serve spread them. Pure ASGI: it adds no buffering to streamed responses."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (b"x-gpt2-engine-replica", value.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(work, watcher: asyncio.Future, gone: threading.Event, undo=None):
    """Await `work` (a coroutine); if the client disconnects first, set `gone` (the work stops at its
    next check), wait for it to stop, undo(result) if it completed, and raise ClientGone."""
    task = asyncio.ensure_future(work)
    await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    gone.set()
    await asyncio.wait([task])
    if task.exception() is None and undo is not None:     # it completed before it saw `gone`
        undo(task.result())
    raise ClientGone


def _close_all(streams) -> None:
    for stream in streams:
        stream.close()


def build_app(model, *, served_model_name: str | None = None, api_key: str | None = None,
              max_queue: int | None = None, max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> FastAPI:
    """The server's ASGI app on `model` (an engine.GPT2 on a runtime backend). The router is shut down
    when the app's lifespan ends (`gpt2-engine serve` has drained the requests by then); the
    requests still running then end with an error answer."""
    server = CompletionServer(model, served_model_name=served_model_name or model.source or "gpt2",
                              api_key=api_key, max_queue=max_queue, max_body_size=max_body_size)

    async def lifespan(app):
        yield
        await asyncio.to_thread(server.router.shutdown)

    app = FastAPI(title="gpt2-engine", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        server.metrics.requests.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Starlette's own answers (404 unknown path, 405 wrong method) in OpenAI's error shape."""
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        """A request the engine could not finish (its step failed, the engine shut down) sees why."""
        error = APIError(503, "the server is shutting down") if isinstance(exc, RouterClosed) else \
            APIError(500, f"{type(exc).__name__}: {exc}")
        return await api_error(request, error)

    app.add_middleware(_ReplicaHeader, value=server.replica)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, "replica": server.replica,
                **await asyncio.to_thread(server.router.stats)}

    @app.get("/metrics")
    async def metrics():
        # Unauthenticated, as vLLM's and as /health: --api-key guards /v1 only (README, Serve).
        return Response(await server.scrape(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                             "owned_by": "gpt2-engine", "max_model_len": model.config.n_positions}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.perf_counter()
        server.check_auth(request)
        if server.draining:
            raise APIError(503, "the server is shutting down")
        body = await read_body(request, server.max_body_size)
        watcher = asyncio.ensure_future(_until_disconnect(request))
        gone = threading.Event()
        streams = []
        try:
            req, prompts, checked, choices = await _unless_gone(asyncio.to_thread(server.prepare, body), watcher, gone)
            if not (req.score_only and req.logprobs is None):      # else the echoed prompt alone is the answer
                streams = await _unless_gone(server.admit(checked, gone), watcher, gone, _close_all)
        except ClientGone:
            watcher.cancel()
            return Response(status_code=499)
        except BaseException:
            watcher.cancel()
            raise
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.name}
        server.metrics.requests.labels("200").inc()
        if req.score_only and not streams:
            for choice in choices:
                choice.finish_reason = "length"
        if req.stream:
            return StreamingResponse(_sse(server, watcher, req, head, prompts, streams, choices, arrival),
                                     media_type="text/event-stream")
        emit = lambda *event: None  # noqa: E731 (the choices keep the text)
        pumps = [asyncio.ensure_future(server.pump(r, s, req, prompts[r], choices, arrival, emit))
                 for r, s in enumerate(streams)]
        try:
            pending = set(pumps)
            while pending and not watcher.done():
                done, _ = await asyncio.wait([*pending, watcher], return_when=asyncio.FIRST_COMPLETED)
                pending -= done
                for pump in done & set(pumps):
                    pump.result()        # the request's error (the engine failed or shut down), if any
            if pending:            # the client went away: nobody will read the answer
                return Response(status_code=499)
        finally:
            watcher.cancel()
            for pump in pumps:
                pump.cancel()
            _close_all(streams)
        return {**head, "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                                     "logprobs": c.logprobs.as_dict() if c.want_logprobs else None}
                                    for i, c in enumerate(choices)],
                "usage": server.usage(prompts, choices)}

    return app


async def _sse(server: CompletionServer, watcher: asyncio.Future, req: CompletionRequest, head: dict, prompts, streams,
               choices: list[Choice], arrival: float):
    """Server-sent events: one chunk per token that adds text (or logprobs, or ends a choice), a
    usage chunk when stream_options.include_usage (the other chunks then carry "usage": null, as
    OpenAI's do), then [DONE]. Ends early on disconnect (`watcher` done); a request the engine could
    not finish (it shut down) ends with an error event."""
    queue: asyncio.Queue = asyncio.Queue()
    if req.include_usage:
        head = {**head, "usage": None}

    async def run(r, stream):
        try:
            await server.pump(r, stream, req, prompts[r], choices, arrival, lambda *event: queue.put_nowait(event))
            queue.put_nowait(_DONE)
        except Exception as exc:     # the request's error (e.g. the engine shut down): the client sees it
            queue.put_nowait(exc)

    for index, choice in enumerate(choices if req.score_only and not streams else ()):   # the echoed prompt alone
        queue.put_nowait((index, choice.text, choice.finish_reason, choice.take_logprobs()))
    tasks = [asyncio.ensure_future(run(r, s)) for r, s in enumerate(streams)]
    watcher.add_done_callback(lambda _: queue.put_nowait(None))
    remaining = len(tasks)
    try:
        while remaining or not queue.empty():
            items = [await queue.get()]
            while not queue.empty():       # send what has piled up in one write
                items.append(queue.get_nowait())
            events = []
            for item in items:
                if item is None:           # the client disconnected
                    return
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    error = APIError(503, "the server is shutting down") if isinstance(item, RouterClosed) else \
                        APIError(500, f"{type(item).__name__}: {item}")
                    yield "".join(events) + f"data: {json.dumps(error.body())}\n\n"
                    return
                else:
                    events.append(_chunk(head, *item))
            if any(events):
                yield "".join(events)
        if req.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': server.usage(prompts, choices)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        _close_all(streams)


def _chunk(head: dict, index: int, delta: str, finish_reason: str | None, logprobs: dict | None) -> str:
    """The SSE event of one token of one choice ("" when it adds nothing to send)."""
    if not (delta or finish_reason or logprobs):
        return ""
    body = {**head, "choices": [{"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body)}\n\n"
