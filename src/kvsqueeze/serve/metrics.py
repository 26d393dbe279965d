"""Prometheus metrics of `kvsqueeze serve`, in vLLM's names (``kvsqueeze:`` for ``vllm:``).

One `CollectorRegistry` per `Metrics` (per app), never the global one, so that two servers in one
process (tests, benchmarks) do not share counts. Latencies are histograms in seconds; counters end
in ``_total`` (prometheus-client adds it to the counter's base name). ``kv_cache_usage_perc`` is a
fraction in [0, 1] of the KV budget, as vLLM's is; ``kv_cache_bytes`` the bytes the cache holds.
The prefix-cache counters count tokens (queried / found in the cache), as vLLM's do.
``request_success_total`` counts finished requests by ``finish_reason``: stop, length, abort
(client left or shutdown), timeout, error.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "kvsqueeze:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 320, 640)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 20, 80)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920)
FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's metrics over their own registry, labelled with ``model_name``."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels, reg = ["model_name"], self.registry

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=reg).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=reg).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token, seconds.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens, seconds.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish, seconds.", E2E_BUCKETS)
        self.running = gauge("num_requests_running", "Requests the engine runs.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV cache usage, a fraction in [0, 1] of the budget.")
        self.kv_bytes = gauge("kv_cache_bytes", "Bytes the KV cache holds.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Requests preempted (recomputed later).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.", [*labels, "finished_reason"],
            registry=reg,
        )  # fmt: skip
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._cumulative = {"queries": 0, "hits": 0, "preemptions": 0}

    def on_first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def on_inter_tokens(self, seconds: float, count: int) -> None:
        for _ in range(count):
            self.itl.observe(seconds)

    def on_generated(self, count: int) -> None:
        self.generation_tokens.inc(count)

    def on_finish(self, reason: str, arrival: float, now: float, output: Any) -> None:
        self.e2e.observe(now - arrival)
        self.success[reason if reason in self.success else "error"].inc()

    def on_stats(self, stats: Any, num_pending: int) -> None:
        """The engine's `EngineStats` (its cumulative counts turned into counter increments);
        ``num_pending`` requests are not yet handed to the engine and count as waiting."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting + num_pending)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_bytes.set(stats.kv_cache_bytes)
        for key, value, metric in (
            ("queries", stats.prefix_cache_queries, self.prefix_queries),
            ("hits", stats.prefix_cache_hits, self.prefix_hits),
            ("preemptions", stats.num_preemptions, self.preemptions),
        ):
            if value > self._cumulative[key]:
                metric.inc(value - self._cumulative[key])
            self._cumulative[key] = value

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
