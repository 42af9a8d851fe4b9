"""`gpt2-engine serve`: load a model and serve the OpenAI-compatible app with uvicorn (or, with
--replicas N > 1, as a Ray Serve deployment of N engines; see gpt2_engine.server.ray_serve).

SIGTERM (or Ctrl-C) drains: uvicorn closes the listening socket (new connections are refused) and
running requests finish (streams end with their finish_reason), for at most --shutdown-timeout
seconds. Then the requests still running are ended: streams with an SSE error event, the others
with a 503 in OpenAI's error JSON; connections that never finished sending their request are
closed. The app's lifespan shuts the router down and the process exits 0 (130 after Ctrl-C, as a
shell expects of an interrupted command). The bound address is
printed as "gpt2-engine serve: listening on http://HOST:PORT" (with --port 0 the kernel picks
the port).
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import socket

from gpt2_engine.cli_args import add_device_argument, int_at_least, int_in_range
from gpt2_engine.server.spec import build_from_spec, check_spec, model_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gpt2", help="checkpoint directory or hub id (or a preset with --random-weights)")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights of a preset shape (no checkpoint)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
    parser.add_argument("--tokenizer", default=None, help="directory with the GPT-2 tokenizer files (default: the checkpoint's)")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int_in_range(0, 65535), default=8000, help="port to bind; 0 picks a free one (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require Authorization: Bearer KEY on /v1 routes (/health and /metrics stay open, as in vLLM)")
    parser.add_argument("--max-num-seqs", type=int_at_least(1), default=256, help="running sequences per engine (default 256)")
    parser.add_argument("--max-queue", type=int_at_least(0), default=None,
                        help="sequences allowed to wait for a running slot; beyond it requests get 429 (default: no limit)")
    parser.add_argument("--max-body-size", type=int_at_least(1), default=4 * 1024 * 1024,
                        help="largest request body in bytes; beyond it 413 (default 4 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=60.0,
                        help="seconds SIGTERM waits for running requests before ending them with an error (default 60)")
    parser.add_argument("--replicas", type=int_at_least(1), default=1,
                        help="engines behind the endpoint; > 1 runs a Ray Serve deployment (pip install gpt2-engine[ray])")
    add_device_argument(parser)
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="default: triton on CUDA, torch on CPU")
    parser.add_argument("--quantization", choices=["int8", "w8a8"], default=None,
                        help="int8: int8 weights; w8a8: int8 weights and activations, integer dot products (CPU, torch "
                             "backend) (default: none)")
    parser.add_argument("--decode-kernel", choices=["graphs", "persistent"], default="graphs",
                        help="decode step on the triton backend: graphs (multi-launch, CUDA graphs; default) or persistent (one launch for "
                        "decode-only steps of <= 16 rows; opt-in until verified on a GPU)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="a request's logits do not depend on what else is batched (bitwise; slower)")
    parser.add_argument("--sync-scheduling", action="store_true",
                        help="no async scheduling (the next step is prepared only after this one's tokens are back)")
    parser.add_argument("--speculative-model", default=None,
                        help="speculative decoding for every request: draft with this model (checkpoint, hub id, a preset "
                             "with --random-weights: seed + 1) or 'int8', the model's own int8 twin")
    parser.add_argument("--speculative-ngram", action="store_true",
                        help="speculative decoding by n-gram lookup in each request's prompt and output (no draft model)")
    parser.add_argument("--num-speculative-tokens", type=int_at_least(1), default=None,
                        help="tokens drafted per step (default 4)")


ABORT_GRACE_S = 5.0     # after the drain's timeout: for the ended requests' error answers to be sent


def _draining_server(config, timeout: float, abort):
    """uvicorn's Server with a bounded drain: after `timeout` seconds of waiting for the running
    requests, abort() ends them (their handlers answer with an error), and uvicorn has
    ABORT_GRACE_S more to send those answers before it cancels what is left (such as a connection
    whose request never finished arriving)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        stop_signal: int | None = None      # the first signal that started the drain

        def handle_exit(self, sig, frame):
            self.stop_signal = self.stop_signal or sig
            super().handle_exit(sig, frame)

        # uvicorn's drain, which its shutdown() awaits under timeout_graceful_shutdown (a private
        # method of uvicorn's Server, as of uvicorn 0.55; tests/server covers this drain)
        async def _wait_tasks_to_complete(self):
            try:
                async with asyncio.timeout(timeout):
                    return await super()._wait_tasks_to_complete()
            except TimeoutError:
                await asyncio.to_thread(abort)
            await super()._wait_tasks_to_complete()

    config.timeout_graceful_shutdown = timeout + ABORT_GRACE_S
    return DrainingServer(config)


def _bound_socket(host: str, port: int) -> socket.socket:
    """The listening socket; an address that cannot be bound is a ValueError saying why."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)     # connections made as soon as the address is printed wait in the backlog
    return sock


def main(args) -> int:
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.replicas > 1:
        if args.port == 0:
            raise ValueError("--port 0 is not supported with --replicas (Ray Serve's proxy needs a fixed port)")
        try:
            from gpt2_engine.server.ray_serve import run_replicas
        except ImportError as exc:
            raise ValueError(f"--replicas needs Ray Serve ({exc}): pip install 'gpt2-engine[ray]'") from None
        check_spec(model_spec(args))      # here, in one line, not in N replicas' tracebacks
        _bound_socket(args.host, args.port).close()
        return run_replicas(args)
    import uvicorn

    check_spec(model_spec(args))
    sock = _bound_socket(args.host, args.port)
    app = build_from_spec(model_spec(args))
    host, port = sock.getsockname()[:2]
    print(f"gpt2-engine serve: listening on http://{host}:{port}", flush=True)
    # While it serves, uvicorn's handler takes SIGTERM and SIGINT; once drained it restores the
    # handlers it found and re-raises the signal. Ignored here, that re-raise is a no-op and the
    # exit status is chosen below. (Left to Python's SIGINT handler, the re-raised Ctrl-C lands in
    # asyncio.run's own handler, which turns it into KeyboardInterrupt only if it arrives before
    # the main task has finished: a race that sometimes exited 0.)
    server = _draining_server(uvicorn.Config(app, log_level="warning"), args.shutdown_timeout,
                              app.state.server.router.shutdown)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server.run(sockets=[sock])
    return 130 if server.stop_signal == signal.SIGINT else 0
