"""Serving metrics of the gateway (prometheus-client, `rnnserve_` prefix, seconds, `model` label).

One registry per app, so that several apps in one process (tests) do not clash. With several gateway
processes (RNNSERVE_GATEWAY_WORKERS) prometheus-client runs in its multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
set by the launcher): every process writes its values to files there, and /metrics of any process reads them
all (`exposition`), so it reports the whole service. Gauges then add up the live processes' values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# latency buckets from 5 ms (one decode step) to 2 min (the default request deadline)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class StreamMetrics:
    """One model's children of the metrics every request and every frame update, looked up once: `labels()`
    takes a lock and builds a key each time, and streams are the gateway's most frequent work."""
    ttft: Histogram
    itl: Histogram
    batch_size: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    prompt_tokens_per_request: Histogram
    generation_tokens_per_request: Histogram
    cancelled: Counter
    running: Gauge
    waiting: Gauge
    queue_time: Histogram


class Metrics:
    def __init__(self, shared_sessions: bool = False) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("rnnserve_requests", "Requests by route and outcome (finish reason or failure)",
                                ["model", "route", "outcome"], registry=r)
        self.ttft = Histogram("rnnserve_time_to_first_token_seconds", "Time from request to first text",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("rnnserve_inter_token_latency_seconds",
                             "Time between streamed chunks divided by the tokens they carry",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("rnnserve_e2e_request_latency_seconds", "Time from request to last byte",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("rnnserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("rnnserve_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.running = Gauge("rnnserve_requests_running", "Upstream generations in flight (admitted)", ["model"],
                             registry=r, multiprocess_mode="livesum")
        self.waiting = Gauge("rnnserve_requests_waiting", "Generations queued for admission", ["model"], registry=r,
                             multiprocess_mode="livesum")
        self.queue_time = Histogram("rnnserve_queue_time_seconds", "Time a request waited for admission", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens_per_request = Histogram("rnnserve_request_prompt_tokens", "Prompt tokens per request",
                                                   ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.generation_tokens_per_request = Histogram("rnnserve_request_generation_tokens",
                                                       "Generated tokens per request", ["model"],
                                                       buckets=TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram("rnnserve_batch_size", "Sequences in the engine's batch, per streamed frame",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.cancelled = Counter("rnnserve_client_disconnects", "Streams whose client went away before the end",
                                 ["model"], registry=r)
        # each process holds its own sessions (their sum is the service's), or all share one Redis store
        # whose totals any process reports (the latest report is the service's)
        mode = "mostrecent" if shared_sessions else "livesum"
        self.sessions = Gauge("rnnserve_sessions", "Sessions the gateway holds", ["model"], registry=r,
                              multiprocess_mode=mode)
        self.session_bytes = Gauge("rnnserve_session_bytes", "Bytes the gateway holds for sessions (states and "
                                   "bookkeeping)", ["model"], registry=r, multiprocess_mode=mode)
        self.session_evictions = Counter("rnnserve_session_evictions", "Sessions dropped by the bounds: capacity "
                                         "(least recently used) or expired", ["model", "reason"], registry=r)
        self._streams: dict[str, StreamMetrics] = {}
        self._requests: dict[tuple[str, str, str], Counter] = {}

    def stream(self, model: str) -> StreamMetrics:
        found = self._streams.get(model)
        if found is None:
            found = self._streams[model] = StreamMetrics(*(m.labels(model=model) for m in (
                self.ttft, self.itl, self.batch_size, self.e2e, self.prompt_tokens, self.generation_tokens,
                self.prompt_tokens_per_request, self.generation_tokens_per_request, self.cancelled, self.running,
                self.waiting, self.queue_time)))
        return found

    def request_done(self, model: str, route: str, outcome: str) -> None:
        """Count a request by its outcome (its child cached: one per model, route and outcome)."""
        key = (model, route, outcome)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(model=model, route=route, outcome=outcome)
        child.inc()

    def init_model(self, model: str) -> None:
        """Create the label sets at start so dashboards see zeros instead of missing series."""
        for m in (self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens, self.running,
                  self.cancelled, self.waiting, self.queue_time, self.prompt_tokens_per_request,
                  self.generation_tokens_per_request, self.batch_size, self.sessions, self.session_bytes):
            m.labels(model=model)
        for reason in ("capacity", "expired"):
            self.session_evictions.labels(model=model, reason=reason)

    def exposition(self) -> bytes:
        """The text /metrics serves: this registry's, or every gateway process's in multiprocess mode."""
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)
