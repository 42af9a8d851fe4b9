"""The request router: one background thread steps the engine and hands each request's token
events to that request's own consumer (GPT2.generate / generate_text / stream, the HTTP server).

    stream = router.add(prompt_token_ids, params, n)   # validated now; a RequestStream
    checked = router.check(prompt_token_ids, params, n) # or validate a whole call first ...
    stream = router.add_checked(checked)               # ... and queue each without checking again
    for event in stream: ...                           # TokenEvents of this request only
    async for event in stream: ...                     # the same from an asyncio task
    stream.close() / router.abort(request_id)          # KV blocks are free when it returns
    router.prompt_logits(prompts)                      # GPT2.__call__: a forward between two steps
    router.stats(); router.max_num_seqs; router.shutdown()

Locks. `_engine_lock` serialises everything that touches the engine: a step, add, abort, stats,
prompt_logits.
`_cond` guards the per-request event queues and wakes consumers and the loop. A thread that holds
both took the engine lock first; the loop holds neither while it waits for work.
Fairness. The loop takes the engine lock again right after each step, and a thread merely blocked
on a lock rarely gets in between (the stepping thread holds the GIL as it releases it): under load
an add, a stats call or a shutdown could wait until the running requests end. So clients take the
lock through `_between_steps`, which counts them in, and before its next step the loop waits until
every client that had arrived has been served (later arrivals wait for the next gap, so clients
cannot hold the loop back either).

Faults. The engine rolls a failed step back (no token lost, random generators restored) and the
loop steps again; a request whose steps failed MAX_STEP_FAILURES times in a row ends with the
error, which its consumer raises. Delivery is appending to in-memory queues under `_cond`, so an exception in
any consumer (a callback, Ctrl-C, a client gone) touches only that consumer's request: leaving
the iteration early aborts it, and so does dropping an unread stream (when it is collected).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Callable

import torch

from gpt2_engine.llm_engine import CheckedRequest, LLMEngine, StepError
from gpt2_engine.sequence import TokenEvent
from gpt2_engine.sampling import SamplingParams

MAX_STEP_FAILURES = 2


class RouterClosed(RuntimeError):
    """The router was shut down while the request was running."""


class _RequestState:
    """A request's undelivered events and how it ended; guarded by the router's `_cond`."""

    def __init__(self, num_sequences: int):
        self.events: deque[TokenEvent] = deque()
        self.num_unfinished = num_sequences
        self.done = False                          # no more events will come
        self.error: BaseException | None = None    # raised by the consumer after the last event
        self.failures = 0
        self.wakeup: Callable[[], None] | None = None   # an asyncio consumer's waker

    def end(self, error: BaseException | None = None) -> None:
        self.done, self.error = True, error


class RequestStream:
    """The token events of one request, in order; iterate it from a thread or an asyncio task.
    Leaving it early (break, exception, close(), or dropping it unread) aborts the request."""

    def __init__(self, router: "RequestRouter", request_id: int, state: _RequestState):
        self.request_id = request_id
        self._router, self._state = router, state
        # Collection of an abandoned stream may happen in any thread, even the loop's own while it
        # holds its locks, so the finalizer only queues the abort (a lock-free deque append).
        self._finalizer = weakref.finalize(self, router._pending_aborts.append, request_id)

    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        try:
            return self._router._next_event(self._state)
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        router, state = self._router, self._state
        if state.wakeup is None:
            loop, wake = asyncio.get_running_loop(), asyncio.Event()
            state.wakeup = lambda: loop.call_soon_threadsafe(wake.set)
            self._wake = wake
        try:
            while True:
                self._wake.clear()
                event = router._next_event(state, block=False)
                if event is not None:
                    return event
                await self._wake.wait()
        except StopIteration:
            raise StopAsyncIteration from None
        except BaseException:       # cancelled (client gone), or the request's error
            self.close()
            raise

    def close(self) -> None:
        """Abort the request if it is still running; its blocks are free when this returns."""
        if self._finalizer.detach() is not None:
            self._router.abort(self.request_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RequestRouter:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._engine_lock = threading.Lock()
        self._cond = threading.Condition()
        self._requests: dict[int, _RequestState] = {}
        self._pending_aborts: deque[int] = deque()
        self._closed = False
        self._clients_arrived = self._clients_served = 0     # of _between_steps (module docstring)
        self._thread = threading.Thread(target=self._loop, name="gpt2-engine-router", daemon=True)
        self._thread.start()

    # ---- clients ---------------------------------------------------------------------------------

    @property
    def max_num_seqs(self) -> int:
        """The engine's capacity: sequences it runs at once."""
        return self.engine.scheduler.max_num_seqs

    def check(self, prompt_token_ids: list[int], params: SamplingParams, n: int = 1) -> CheckedRequest:
        """The request validated (ValueError now for one the engine cannot take; nothing is queued),
        for add_checked."""
        return self.engine.check_request(prompt_token_ids, params, n)

    @contextlib.contextmanager
    def _between_steps(self):
        """The engine lock for a client, taken before the loop's next step (module docstring: Fairness)."""
        with self._cond:
            self._clients_arrived += 1
        try:
            with self._engine_lock:
                yield
        finally:
            with self._cond:
                self._clients_served += 1
                self._cond.notify_all()

    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """fp32 logits [L_i, V] at every position of each prompt (one forward, between two steps)."""
        with self._between_steps():
            if self._closed:
                raise RouterClosed("the engine was shut down")
            return self.engine.prompt_logits(prompts)

    def add(self, prompt_token_ids: list[int], params: SamplingParams, n: int = 1) -> RequestStream:
        """Check and queue one request."""
        return self.add_checked(self.check(prompt_token_ids, params, n))

    def add_checked(self, request: CheckedRequest) -> RequestStream:
        """Queue a request check() returned, without validating it again."""
        with self._between_steps():
            if self._closed:
                raise RouterClosed("the engine was shut down")
            request_id = self.engine.add_checked(request)
            state = _RequestState(request.n)
            with self._cond:
                self._requests[request_id] = state
                self._cond.notify_all()
        return RequestStream(self, request_id, state)

    def abort(self, request_id: int) -> None:
        with self._between_steps():
            self._abort_locked(request_id)

    def stats(self) -> dict[str, int]:
        with self._between_steps():
            stats = self.engine.stats()
        with self._cond:
            stats["num_requests"] = len(self._requests)
        return stats

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is live (or timeout); True when idle."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._requests, timeout)

    def shutdown(self) -> None:
        """End every live request (their consumers raise RouterClosed) and stop the loop.

        The loop is told first and joined before the engine lock is taken: it ends with the step it is
        in, and nothing waits on a lock the loop keeps taking."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        with self._engine_lock, self._cond:
            for request_id, state in self._requests.items():
                self.engine.abort_request(request_id)
                state.end(RouterClosed("the engine was shut down"))
                self._notify(state)
            self._requests.clear()
            self._cond.notify_all()

    def _next_event(self, state: _RequestState, block: bool = True) -> TokenEvent | None:
        """The request's next event; None when not blocking and none is ready; StopIteration at the end."""
        with self._cond:
            while block and not state.events and not state.done:
                self._cond.wait()
            if state.events:
                return state.events.popleft()
            if state.error is not None:
                raise state.error
            if state.done:
                raise StopIteration
            return None

    # ---- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._wait_for_work():
                    self._step_once()
        except BaseException as exc:   # the loop must never die silently with consumers waiting
            self._fail_all(RuntimeError(f"the engine loop stopped: {type(exc).__name__}: {exc}"))
            raise

    def _wait_for_work(self) -> bool:
        """Until there are requests and every client that has arrived got the engine lock; False once closed."""
        with self._cond:
            arrived = self._clients_arrived
            while not self._closed and (not self._requests or self._clients_served < arrived):
                self._cond.wait()
            return not self._closed

    def _step_once(self) -> None:
        with self._engine_lock:
            while self._pending_aborts:       # streams dropped unread
                self._abort_locked(self._pending_aborts.popleft())
            if self._closed or not self.engine.has_unfinished_requests():
                return
            events, failed = [], {}
            try:
                events = self.engine.step()
            except StepError as exc:        # rolled back: step again
                failed = self._count_failure(exc.request_ids, exc)
            except Exception as exc:        # failed before the step began (scheduling): end every request
                failed = {request_id: exc for request_id in list(self._requests)}
            except BaseException as exc:    # Ctrl-C / exit inside a step: rolled back too, but unattributed
                failed = self._count_failure(set(self._requests), exc)
            for request_id in failed:
                self.engine.abort_request(request_id)
            with self._cond:
                for event in events:
                    try:
                        self._deliver(event)
                    except BaseException as exc:   # only that request ends, with the error; the rest go on
                        self.engine.abort_request(event.request_id)
                        failed[event.request_id] = exc
                for request_id, error in failed.items():
                    state = self._requests.pop(request_id, None)
                    if state is not None:
                        state.end(error)
                        self._notify(state)
                self._cond.notify_all()

    def _deliver(self, event: TokenEvent) -> None:
        """Queue one event for its consumer (under `_cond`); a request ends with its last sequence."""
        state = self._requests.get(event.request_id)
        if state is None:      # aborted meanwhile
            return
        state.events.append(event)
        state.failures = 0          # counted in a row
        if event.finished:
            state.num_unfinished -= 1
            if state.num_unfinished == 0:
                state.end()
                del self._requests[event.request_id]
        self._notify(state)

    def _count_failure(self, request_ids: set[int], exc: BaseException) -> dict[int, BaseException]:
        """The requests that have now failed too often, with the error each will raise."""
        failed = {}
        with self._cond:
            for request_id in request_ids:
                state = self._requests.get(request_id)
                if state is not None:
                    state.failures += 1
                    if state.failures >= MAX_STEP_FAILURES:
                        failed[request_id] = exc
        return failed

    def _abort_locked(self, request_id: int) -> None:
        self.engine.abort_request(request_id)
        with self._cond:
            state = self._requests.pop(request_id, None)
            if state is not None:
                state.end()
                self._notify(state)
                self._cond.notify_all()

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            self._closed = True
            for state in self._requests.values():
                state.end(error)
                self._notify(state)
            self._requests.clear()
            self._cond.notify_all()

    @staticmethod
    def _notify(state: _RequestState) -> None:
        """Wake an asyncio consumer (threads wait on `_cond`, notified by the caller)."""
        if state.wakeup is not None:
            try:
                state.wakeup()
            except RuntimeError:     # its event loop is closed: nobody is waiting any more
                state.wakeup = None
