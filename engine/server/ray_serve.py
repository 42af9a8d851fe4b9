"""Scale-out: the same FastAPI app as a Ray Serve deployment of N replicas, each its own engine
(`gpt2-engine serve --replicas N`). Needs the `ray` extra: pip install "gpt2-engine[ray]".

Each replica takes one GPU when the cluster has GPUs (num_gpus=1), else an equal share of the CPUs
(at most one each). Ray Serve's proxy hands every request to an ingress deployment (no resources of
its own), which passes it to the least loaded replica through a deployment handle and streams the
answer back (gpt2_engine.server.ray_relay: a replica that dies mid-answer still gets its clients an
OpenAI-shaped error, on a stream an SSE error event). Every response names its replica in the
x-gpt2-engine-replica header (also in /health). /metrics is per replica. A replica takes as many
requests at once as fill its running batch and its waiting queue; the rest wait in the ingress.

Drain (SIGTERM or Ctrl-C on the command): Ray Serve removes an application's route as soon as it
is deleted, so its proxy would answer new requests with a plain-text 404 while the replicas finish.
Instead the command first raises a flag (a named Ray actor) that every replica polls: from then on
the replicas answer new completions with a 503 in OpenAI's error JSON while the running ones
finish; after --shutdown-timeout seconds the replicas end what still runs (streams with an SSE
error event); then the application is deleted and Serve shut down.

Cluster: by default a local Ray instance is started for the command and stopped with it. To use
an existing cluster, start it (`ray start --head` on the head node, `ray start --address HEAD:6379`
on the others) and set RAY_ADDRESS=HEAD:6379 (or `auto` on a cluster node) before `gpt2-engine serve`.
"""
from __future__ import annotations

import signal
import threading
import time

import ray
from ray import serve

from gpt2_engine.server.ray_relay import exchange, relay_app
from gpt2_engine.server.spec import build_from_spec, model_spec

APP_NAME = "gpt2-engine"
DRAIN_FLAG, DRAIN_NAMESPACE = "drain", "gpt2-engine"    # the replicas run in Serve's namespace
POLL_S = 0.25
GONE_S = 20 * POLL_S       # a replica that has not polled for this long is gone (killed, or replaced)


@ray.remote(num_cpus=0)
class DrainFlag:
    """The command's drain state, polled by every replica; each reports its live requests back."""

    def __init__(self):
        self.state, self.live = "serving", {}

    def set(self, state: str) -> None:
        self.state = state

    def poll(self, replica: str, num_requests: int, seen: str) -> str:
        self.live[replica] = (num_requests, seen, time.monotonic())
        return self.state

    def num_requests(self) -> int | None:
        """The live replicas' requests; None until each has reported since seeing the state."""
        now = time.monotonic()
        live = [(n, seen) for n, seen, when in self.live.values() if now - when < GONE_S]
        if any(seen != self.state for _, seen in live):
            return None
        return sum(n for n, _ in live)


@serve.deployment(name="GPT2Engine")
class GPT2Replica:
    """One replica: the model is built in the replica's process, then the app on it, which answers
    the requests the ingress forwards."""

    def __init__(self, spec: dict):
        self._app = build_from_spec(spec)
        threading.Thread(target=self._follow_drain, name="gpt2-engine-drain", daemon=True).start()

    def _follow_drain(self) -> None:
        """Poll the command's DrainFlag: "draining" refuses new completions, "abort" ends the running ones."""
        server = self._app.state.server
        flag = ray.get_actor(DRAIN_FLAG, namespace=DRAIN_NAMESPACE)
        state = "serving"
        while True:
            state = ray.get(flag.poll.remote(server.replica, server.router.stats()["num_requests"], state))
            server.draining = state != "serving"
            if state == "abort":
                server.router.shutdown()
                return
            time.sleep(POLL_S)

    async def forward(self, scope: dict, body: bytes):
        """One HTTP request through this replica's app: its ASGI messages, streamed to the ingress."""
        async for message in exchange(self._app, scope, body):
            yield message


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """Serve's HTTP entry: relays each request to a replica (gpt2_engine.server.ray_relay)."""

    def __init__(self, replicas, max_body_size: int):
        self._app = relay_app(replicas.options(stream=True).forward, max_body_size)

    def __serve_build_asgi_app__(self):
        return self._app


def max_ongoing_requests(args) -> int:
    """Requests one replica takes at once: its running batch and its waiting queue (as many again when
    --max-queue is unbounded), and a few for /health and /metrics. Serve's default, 5, would cap the
    engine's batch at 5."""
    return args.max_num_seqs + (args.max_num_seqs if args.max_queue is None else args.max_queue) + 8


def replica_resources(cluster: dict, replicas: int) -> dict:
    if cluster.get("GPU", 0) >= 1:
        return {"num_gpus": 1}
    return {"num_cpus": min(1.0, cluster.get("CPU", 1) / replicas)}


def run_replicas(args) -> int:
    """Deploy, print the address, serve until SIGTERM/SIGINT, drain (module docstring), then shut
    Serve (and a local Ray) down."""
    ray.init(logging_level="warning")    # RAY_ADDRESS (if set) names an existing cluster
    try:
        flag = DrainFlag.options(name=DRAIN_FLAG, namespace=DRAIN_NAMESPACE).remote()
        serve.start(http_options={"host": args.host, "port": args.port})
        per_replica = max_ongoing_requests(args)
        replicas = GPT2Replica.options(num_replicas=args.replicas, max_ongoing_requests=per_replica,
                                       ray_actor_options=replica_resources(ray.cluster_resources(), args.replicas))
        ingress = Ingress.options(max_ongoing_requests=args.replicas * per_replica)
        serve.run(ingress.bind(replicas.bind(model_spec(args)), args.max_body_size), name=APP_NAME, route_prefix="/")
        print(f"gpt2-engine serve: listening on http://{args.host}:{args.port} ({args.replicas} Ray Serve replicas)",
              flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        ray.get(flag.set.remote("draining"))
        deadline = time.monotonic() + args.shutdown_timeout
        while ray.get(flag.num_requests.remote()) != 0 and time.monotonic() < deadline:
            time.sleep(POLL_S)
        ray.get(flag.set.remote("abort"))
        time.sleep(2 * POLL_S)      # the replicas' ended requests send their error answers
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
