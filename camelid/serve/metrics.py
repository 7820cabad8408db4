"""/metrics in Prometheus's text format (prometheus_client): what the batcher holds and has done,
read when scraped, and its latencies as histograms.

Names follow Prometheus's conventions (`_total` counters, base units) under the `camelid_`
prefix; vLLM's and llama.cpp's servers export the same quantities (requests running and waiting,
prompt and generated tokens, time to first token, time per output token, KV cache use, prefix
cache hit rate), so their dashboards need only the names changed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from camelid.serve.batcher import Batcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from a few milliseconds (a cached prefix, a tiny model) to a long prompt behind a queue
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
NEXT_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.5)


class ServerMetrics:
    """One server's metrics, in a registry of its own (not prometheus_client's global one, which
    every app in a process would share). Installs itself as the batcher's `timings`."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.registry = CollectorRegistry()
        self.first = Histogram("camelid_time_to_first_token_seconds", "From a request's arrival to its first token",
                               buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.gap = Histogram("camelid_time_per_output_token_seconds", "Between two tokens of a request",
                             buckets=NEXT_TOKEN_BUCKETS, registry=self.registry)
        self.responses: dict[tuple[str, int], int] = {}
        self.registry.register(self)
        batcher.timings = self

    def first_token(self, seconds: float) -> None:
        self.first.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.gap.observe(seconds)

    def responded(self, path: str, status: int) -> None:
        self.responses[path, status] = self.responses.get((path, status), 0) + 1

    def collect(self):
        """The batcher's state, read now (prometheus_client calls this on each scrape)."""
        b, pool = self.batcher, self.batcher.pool
        requests = CounterMetricFamily("camelid_http_requests", "HTTP responses by route and status",
                                       labels=["path", "status"])
        for (path, status), n in sorted(self.responses.items()):
            requests.add_metric([path, str(status)], n)
        yield requests
        yield GaugeMetricFamily("camelid_requests_running", "Requests in a row of the batch", value=b.active)
        yield GaugeMetricFamily("camelid_requests_waiting", "Requests waiting for a row", value=len(b.waiting))
        yield CounterMetricFamily("camelid_prompt_tokens", "Prompt tokens of the requests admitted",
                                  value=b.prompt_tokens)
        yield CounterMetricFamily("camelid_prompt_tokens_computed", "Prompt tokens run through the model (the "
                                  "rest came from the prefix cache)", value=b.computed_tokens)
        yield CounterMetricFamily("camelid_generation_tokens", "Tokens generated", value=b.generated_tokens)
        yield CounterMetricFamily("camelid_preemptions", "Requests that gave their blocks back to let others go on",
                                  value=b.preempted)
        yield GaugeMetricFamily("camelid_kv_cache_blocks", "KV cache blocks that can be lent", value=pool.capacity)
        yield GaugeMetricFamily("camelid_kv_cache_blocks_used", "KV cache blocks held by requests", value=pool.used)
        yield GaugeMetricFamily("camelid_kv_cache_usage_ratio", "Share of the KV cache's blocks held",
                                value=pool.used / pool.capacity)
        yield CounterMetricFamily("camelid_prefix_cache_queries", "Full prompt blocks looked up in the prefix cache",
                                  value=pool.queried)
        yield CounterMetricFamily("camelid_prefix_cache_hits", "Full prompt blocks found in the prefix cache",
                                  value=pool.hits)
        yield GaugeMetricFamily("camelid_prefix_cache_hit_rate", "Prefix cache hits over queries, since the start",
                                value=pool.hits / pool.queried if pool.queried else 0.0)

    def text(self) -> bytes:
        return generate_latest(self.registry)
