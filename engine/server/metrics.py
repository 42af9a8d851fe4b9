"""Prometheus metrics of one server: the engine's counters read at scrape time from router.stats(),
and latency histograms observed by the request handlers. Each app has its own registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "gpt2_engine"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Gauges and counters straight from the router's stats (one consistent snapshot per scrape)."""

    def __init__(self, stats):
        self._stats = stats

    def collect(self):
        s = self._stats()
        gauges = (("num_requests_running", "sequences running in the engine", s["num_running"]),
                  ("num_requests_waiting", "sequences waiting for a running slot", s["num_waiting"]),
                  ("kv_blocks_used", "KV cache blocks in use", s["kv_blocks_total"] - s["kv_blocks_free"]),
                  ("kv_blocks_total", "KV cache blocks in the pool", s["kv_blocks_total"]))
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = (("num_preemptions", "sequences preempted (recomputed later)", s["num_preemptions"]),
                    ("prompt_tokens", "prompt tokens of the requests added", s["prompt_tokens"]),
                    ("generation_tokens", "tokens generated", s["tokens_generated"]),
                    ("prefix_cache_queries", "prompt tokens looked up in the prefix cache", s["prefix_cache_queries"]),
                    ("prefix_cache_hits", "prompt tokens found in the prefix cache (not computed)", s["prefix_cache_hits"]))
        for name, doc, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, stats):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "time between two tokens of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter(f"{PREFIX}_requests", "completion requests answered, by HTTP status",
                                ["status"], registry=self.registry)
