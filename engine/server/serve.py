"""`gpt2-engine serve`: load a model and serve the OpenAI-compatible app with uvicorn (or, with
--replicas N > 1, as a Ray Serve deployment of N engines; see gpt2_engine.server.ray_serve).

SIGTERM drains: uvicorn closes the listening socket (new connections are refused), lets running
requests finish (streams end with their finish_reason), then the app's lifespan waits for the
router to go idle and shuts it down; the process exits 0. The bound address is printed as
"gpt2-engine serve: listening on http://HOST:PORT" (with --port 0 the kernel picks the port).
"""
from __future__ import annotations

import argparse
import signal
import socket

from gpt2_engine.cli_args import add_device_argument, int_at_least
from gpt2_engine.server.spec import build_from_spec, model_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gpt2", help="checkpoint directory or hub id (or a preset with --random-weights)")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights of a preset shape (no checkpoint)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
    parser.add_argument("--tokenizer", default=None, help="directory with the GPT-2 tokenizer files (default: the checkpoint's)")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)")
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 routes")
    parser.add_argument("--max-num-seqs", type=int_at_least(1), default=256, help="running sequences per engine (default 256)")
    parser.add_argument("--max-queue", type=int_at_least(0), default=None,
                        help="sequences allowed to wait for a running slot; beyond it requests get 429 (default: no limit)")
    parser.add_argument("--replicas", type=int_at_least(1), default=1,
                        help="engines behind the endpoint; > 1 runs a Ray Serve deployment (pip install gpt2-engine[ray])")
    add_device_argument(parser)
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="default: triton on CUDA, torch on CPU")
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


def main(args) -> int:
    if args.replicas > 1:
        if args.port == 0:
            raise ValueError("--port 0 is not supported with --replicas (Ray Serve's proxy needs a fixed port)")
        try:
            from gpt2_engine.server.ray_serve import run_replicas
        except ImportError as exc:
            raise ValueError(f"--replicas needs Ray Serve ({exc}): pip install 'gpt2-engine[ray]'") from None
        return run_replicas(args)
    import uvicorn

    app = build_from_spec(model_spec(args))
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)     # connections made as soon as the address is printed wait in the backlog
    host, port = sock.getsockname()[:2]
    print(f"gpt2-engine serve: listening on http://{host}:{port}", flush=True)
    # uvicorn re-raises the signal that stopped it once it has drained; ignoring it then makes a
    # SIGTERM'd server exit 0 after the graceful shutdown instead of dying by the signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None)).run(sockets=[sock])
    return 0

