"""A benchmark peer's worker process: another engine's native code runs there, never in the bench's.

Why a process: a peer's own OpenMP runtime and BLAS beside torch's slowed the engine's decode step
by ~30% for the rest of the process once CTranslate2 had run in it (measured twice; not so with the
peer in another process), which would bias every ratio.

Protocol over one pipe: the worker loads (`load(*args)` returns a handle) and answers ("ok", None)
or ("error", message); then each request (batch, new_tokens) gets ("ok", generate(handle, batch,
new_tokens)) or ("error", message), until None. Timing is the worker's: it stamps with
time.perf_counter (CLOCK_MONOTONIC, one clock for both processes) and returns the stamps.
"""
from __future__ import annotations

import multiprocessing
import weakref


class PeerCrashed(RuntimeError):
    """The worker process died (a signal or an exit), not a Python error inside it."""


class PeerWorker:
    """A spawned worker process serving `generate` on what `load` returned; close() (or garbage
    collection, or exit) stops it."""

    def __init__(self, name: str, load, generate, args: tuple):
        context = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, daemon=True, name=name, args=(child, load, generate, args))
        self._process.start()
        child.close()
        self._finalizer = weakref.finalize(self, _stop, self._conn, self._process)
        self._reply()   # loaded

    def _reply(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._process.join(timeout=10)
            raise PeerCrashed(f"the {self.name} worker exited (code {self._process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"{self.name} worker: {value}")
        return value

    def generate(self, batch, new_tokens: int):
        """What the worker's generate returned for this request."""
        self._conn.send((batch, new_tokens))
        return self._reply()

    def close(self) -> None:
        self._finalizer()


def _stop(conn, process) -> None:
    try:
        conn.send(None)
    except OSError:
        pass
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
    conn.close()


def _serve(conn, load, generate, args: tuple) -> None:
    try:
        handle = load(*args)
        conn.send(("ok", None))
    except Exception as exc:   # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while (request := conn.recv()) is not None:
        try:
            conn.send(("ok", generate(handle, *request)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
