"""Prometheus metrics of one server, named like vLLM's (`vllm:` -> `dynts:`), plus what only a budgeted engine
can report: KV slots in use against a capacity fixed in advance, compressions and evicted tokens by policy.

Each server has its own registry, so several servers (tests, Ray replicas) in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, policy: str):
        self.registry = registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        names = ["model_name"]
        self.policy = policy

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=registry).labels(**self.labels)

        def counter(name, doc):
            return Counter(name, doc, names, registry=registry).labels(**self.labels)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, names, buckets=buckets, registry=registry).labels(**self.labels)

        self.running = gauge("dynts:num_requests_running", "Sequences decoding in a batch row.")
        self.waiting = gauge("dynts:num_requests_waiting", "Sequences waiting for a batch row.")
        self.kv_in_use = gauge("dynts:kv_cache_tokens_in_use", "KV slots holding a token, over all rows.")
        self.kv_capacity = gauge("dynts:kv_cache_tokens_capacity", "KV slots the batch can hold (rows x B).")
        self.kv_peak = gauge("dynts:kv_cache_tokens_peak", "Most KV slots in use at any step since the start.")
        self.kv_usage = gauge("dynts:kv_cache_usage_perc", "KV slots in use / capacity (1 = full).")
        self.prompt_tokens = counter("dynts:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("dynts:generation_tokens", "Tokens generated.")
        self._finished = Counter(
            "dynts:request_success",
            "Sequences finished, by finish reason.",
            names + ["finished_reason"],
            registry=registry,
        )
        self.ttft = histogram("dynts:time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS)
        self.itl = histogram("dynts:inter_token_latency_seconds", "Time between two tokens.", TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("dynts:e2e_request_latency_seconds", "Arrival to the last token.", LATENCY_BUCKETS)
        self.queue_time = histogram(
            "dynts:request_queue_time_seconds", "Arrival to the start of prefill (a row was free).", LATENCY_BUCKETS
        )
        self._compressions = Counter(
            "dynts:kv_compressions", "Cache compressions, by policy.", names + ["policy"], registry=registry
        )
        self._evicted = Counter(
            "dynts:kv_evicted_tokens",
            "Tokens evicted from the cache, by policy.",
            names + ["policy"],
            registry=registry,
        )
        self.loop_alive = gauge("dynts:engine_loop_alive", "1 while the thread that owns the model runs.")

    def engine_state(self, running: int, waiting: int, kv_in_use: int, kv_capacity: int, kv_peak: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_in_use.set(kv_in_use)
        self.kv_capacity.set(kv_capacity)
        self.kv_peak.set(kv_peak)
        self.kv_usage.set(kv_in_use / kv_capacity if kv_capacity else 0.0)

    def finished(self, reason: str, compressions: int, evicted: int) -> None:
        self._finished.labels(finished_reason=reason, **self.labels).inc()
        self._compressions.labels(policy=self.policy, **self.labels).inc(compressions)
        self._evicted.labels(policy=self.policy, **self.labels).inc(evicted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
