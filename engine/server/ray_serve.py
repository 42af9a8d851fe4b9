"""Scale-out: the same FastAPI app as a Ray Serve deployment of N replicas, each its own engine
(`gpt2-engine serve --replicas N`). Needs the `ray` extra: pip install "gpt2-engine[ray]".

Each replica takes one GPU when the cluster has GPUs (num_gpus=1), else an equal share of the CPUs
(at most one each); Ray Serve's proxy spreads requests over the replicas, and every response names
its replica in the x-gpt2-engine-replica header (also in /health). /metrics is per replica.

Cluster: by default a local Ray instance is started for the command and stopped with it. To use
an existing cluster, start it (`ray start --head` on the head node, `ray start --address HEAD:6379`
on the others) and set RAY_ADDRESS=HEAD:6379 (or `auto` on a cluster node) before `gpt2-engine serve`.
"""
from __future__ import annotations

import signal
import threading

from ray import serve

from gpt2_engine.server.spec import build_from_spec, model_spec

APP_NAME = "gpt2-engine"


@serve.deployment(name="GPT2Engine")
@serve.ingress()
class GPT2Replica:
    """One replica: the model is built in the replica's process, then the app on it."""

    def __init__(self, spec: dict):
        self._app = build_from_spec(spec)

    def __serve_build_asgi_app__(self):
        return self._app


def replica_resources(cluster: dict, replicas: int) -> dict:
    if cluster.get("GPU", 0) >= 1:
        return {"num_gpus": 1}
    return {"num_cpus": min(1.0, cluster.get("CPU", 1) / replicas)}


def run_replicas(args) -> int:
    """Deploy, print the address, serve until SIGTERM/SIGINT, then shut Serve (and a local Ray) down."""
    import ray

    ray.init(logging_level="warning")    # RAY_ADDRESS (if set) names an existing cluster
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        deployment = GPT2Replica.options(num_replicas=args.replicas,
                                         ray_actor_options=replica_resources(ray.cluster_resources(), args.replicas))
        serve.run(deployment.bind(model_spec(args)), name=APP_NAME, route_prefix="/")
        print(f"gpt2-engine serve: listening on http://{args.host}:{args.port} ({args.replicas} Ray Serve replicas)",
              flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.delete(APP_NAME)      # replicas drain their running requests first
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
