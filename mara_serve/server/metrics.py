"""Prometheus metrics, in the style of vLLM/TGI, prefixed `mara_`.

Each app owns a `CollectorRegistry` (never the global one), so tests can build many apps in one
process. The running/waiting gauges read the engine at scrape time (`set_function`), so they are
exact even while nothing else happens. Everything else is fed from the event loop by one
`RequestTracker` per HTTP generation request, as the engine's outputs reach the request:

- latency: TTFT (request arrival → first token of any choice), inter-token latency (between a
  choice's consecutive tokens), end-to-end latency, queue time (engine arrival → prefill);
- tokens: prompt tokens (once per admitted request), generated tokens (every choice);
- MARA, per agent, over tokens the agent decided (≥ 2 candidates): candidates it judged,
  rejections, fallbacks (all rejected → top-1) and the accepted rank (fallback counts as rank
  0, the token emitted). So fallbacks / accepted_rank_count is the fallback rate, rejections /
  candidates the rejection rate;
- prefix caching, read from the engine at scrape time: tokens held, prompt tokens looked up and
  found (hit rate = hit / queried);
- the KV cache, read from the engine at scrape time: its size in bytes and slots (fixed at
  start from the budget), the share of slots held by running requests (`usage_perc`, 0-1, as
  vLLM's) and the tokens they hold;
- `mara_requests_total{status}`: success (finished stop/length), aborted (client went away or
  the server stopped it), error (engine failure), rejected (refused at admission: queue full,
  not ready, context too long).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mara_serve.engine.request import RequestOutput

METRIC_NAMES = frozenset(
    {
        "mara_num_requests_running",
        "mara_num_requests_waiting",
        "mara_requests_total",
        "mara_time_to_first_token_seconds",
        "mara_inter_token_latency_seconds",
        "mara_e2e_request_latency_seconds",
        "mara_queue_time_seconds",
        "mara_prompt_tokens_total",
        "mara_generation_tokens_total",
        "mara_agent_candidates_total",
        "mara_agent_rejections_total",
        "mara_agent_fallbacks_total",
        "mara_agent_accepted_rank",
        "mara_agent_loads_total",
        "mara_agent_unloads_total",
        "mara_prefix_cache_tokens",
        "mara_prefix_cache_queried_tokens_total",
        "mara_prefix_cache_hit_tokens_total",
        "mara_kv_cache_bytes",
        "mara_kv_cache_slots",
        "mara_kv_cache_usage_perc",
        "mara_kv_cache_tokens",
        "mara_torch_threads",
        "mara_model_weight_bytes",
        "mara_native_decode",
        "mara_native_decode_forwards_total",
    }
)

REQUEST_STATUSES = ("success", "aborted", "error", "rejected")
CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
_E2E_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    240.0,
    480.0,
    960.0,
)
_RANK_BUCKETS = (0, 1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 40, 60, 100)


class ServerMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` series (process-wide; vLLM does the same)
        r = self.registry = CollectorRegistry()
        self.running = Gauge(
            "mara_num_requests_running", "Requests in the running batch.", registry=r
        )
        self.waiting = Gauge(
            "mara_num_requests_waiting",
            "Requests admitted but not yet in the running batch.",
            registry=r,
        )
        self.requests = Counter(
            "mara_requests_total", "Generation requests by final status.", ["status"], registry=r
        )
        self.ttft = Histogram(
            "mara_time_to_first_token_seconds",
            "Time to first token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mara_inter_token_latency_seconds",
            "Time between two tokens.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "mara_e2e_request_latency_seconds",
            "End-to-end request latency.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "mara_queue_time_seconds",
            "Time waiting before prefill.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mara_prompt_tokens_total", "Prompt tokens processed.", registry=r
        )
        self.generation_tokens = Counter(
            "mara_generation_tokens_total", "Tokens generated.", registry=r
        )
        self.candidates = Counter(
            "mara_agent_candidates_total", "Candidates the agent judged.", ["agent"], registry=r
        )
        self.rejections = Counter(
            "mara_agent_rejections_total", "Candidates the agent rejected.", ["agent"], registry=r
        )
        self.fallbacks = Counter(
            "mara_agent_fallbacks_total",
            "Tokens where every candidate was rejected (top-1 emitted).",
            ["agent"],
            registry=r,
        )
        self.accepted_rank = Histogram(
            "mara_agent_accepted_rank",
            "Rank of the emitted candidate (0 = the model's top-1).",
            ["agent"],
            buckets=_RANK_BUCKETS,
            registry=r,
        )
        self.agent_loads = Counter(
            "mara_agent_loads_total", "Agent loads and replacements.", ["agent"], registry=r
        )
        self.agent_unloads = Counter(
            "mara_agent_unloads_total", "Agent unloads.", ["agent"], registry=r
        )
        ProcessCollector(registry=r)
        for status in REQUEST_STATUSES:
            self.requests.labels(status)

    def bind_engine(
        self,
        num_running: Callable[[], int],
        num_waiting: Callable[[], int],
        engine_stats: Callable[[], dict] | None = None,
    ) -> None:
        """Read the batch and queue sizes (and the prefix cache's counters, from
        `engine_stats()`) from the engine at every scrape."""
        self.running.set_function(num_running)
        self.waiting.set_function(num_waiting)
        if engine_stats is not None:
            self.registry.register(_EngineStatsCollector(engine_stats))

    def agent_loaded(self, name: str) -> None:
        self.agent_loads.labels(name).inc()
        for family in (self.candidates, self.rejections, self.fallbacks, self.agent_unloads):
            family.labels(name)  # the series exist (at 0) from the first scrape on

    def agent_unloaded(self, name: str) -> None:
        self.agent_unloads.labels(name).inc()

    def track(self, agent: str | None) -> RequestTracker:
        return RequestTracker(self, agent)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """The metrics of one HTTP generation request (all its choices). Event loop only."""

    def __init__(self, metrics: ServerMetrics, agent: str | None):
        self.m = metrics
        self.start = time.monotonic()
        self.first_token_seen = False
        self.last_token_at: dict[int, float] = {}  # choice index → time of its last token
        self.finished = False
        self.agent = agent
        if agent is not None:
            self.candidates = metrics.candidates.labels(agent)
            self.rejections = metrics.rejections.labels(agent)
            self.fallbacks = metrics.fallbacks.labels(agent)
            self.rank = metrics.accepted_rank.labels(agent)

    def admitted(self, prompt_tokens: int) -> None:
        self.m.prompt_tokens.inc(prompt_tokens)

    def on_output(self, choice: int, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.queue_time is not None:
            self.m.queue.observe(max(out.queue_time, 0.0))
        n = len(out.new_token_ids)
        if n == 0:
            return
        self.m.generation_tokens.inc(n)
        if not self.first_token_seen:
            self.first_token_seen = True
            self.m.ttft.observe(now - self.start)
        last = self.last_token_at.get(choice)
        if last is not None:
            gap = (now - last) / n
            for _ in range(n):
                self.m.itl.observe(gap)
        self.last_token_at[choice] = now
        if self.agent is None:
            return
        for trace in out.traces:
            if not trace.candidates:
                continue  # a single candidate: emitted without asking the agent
            self.candidates.inc(trace.evaluated)
            self.rejections.inc(trace.rejected)
            if trace.fallback:
                self.fallbacks.inc()
            self.rank.observe(trace.accepted_rank)

    def finish(self, status: str) -> None:
        """Count the request once, whatever path ends it."""
        if self.finished:
            return
        self.finished = True
        self.m.requests.labels(status).inc()
        if status != "rejected":
            self.m.e2e.observe(time.monotonic() - self.start)


class _EngineStatsCollector(Collector):
    """The engine's prefix-cache counters and KV cache gauges (LLMEngine.stats()), read at
    scrape time."""

    def __init__(self, engine_stats: Callable[[], dict]):
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats()
        held = GaugeMetricFamily(
            "mara_prefix_cache_tokens", "Prompt tokens whose K/V the prefix cache holds."
        )
        held.add_metric([], stats.get("prefix_cache_tokens", 0))
        queried = CounterMetricFamily(
            "mara_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache."
        )
        queried.add_metric([], stats.get("prefix_cache_queried_tokens", 0))
        hits = CounterMetricFamily(
            "mara_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache."
        )
        hits.add_metric([], stats.get("prefix_cache_hit_tokens", 0))
        slots = stats.get("kv_cache_slots", 0)
        gauges = [
            ("mara_kv_cache_bytes", "Bytes of the KV cache (allocated once from the budget).",
             stats.get("kv_cache_bytes", 0)),
            ("mara_kv_cache_slots", "Sequences the KV cache holds at once (running batch limit).",
             slots),
            ("mara_kv_cache_usage_perc", "Share of KV cache slots held by running requests (0-1).",
             stats.get("running", 0) / slots if slots else 0.0),
            ("mara_kv_cache_tokens", "Tokens whose K/V running requests hold.",
             stats.get("kv_cache_tokens", 0)),
            ("mara_torch_threads", "CPU threads torch runs the model with (--torch-threads).",
             stats.get("torch_threads", 0)),
            ("mara_model_weight_bytes", "Bytes of the base model's weights in memory "
             "(--dtype, --quantization).", stats.get("model_weight_bytes", 0)),
        ]  # fmt: skip
        native = CounterMetricFamily(
            "mara_native_decode_forwards",
            "One-token forwards run by the native CPU kernel (--cpu-native-decode).",
        )
        native.add_metric([], stats.get("native_decode_forwards", 0))
        gauges.append(("mara_native_decode", "1 when one-token forwards run in the native CPU "
                       "kernel (--cpu-native-decode; the log says why not).",
                       stats.get("native_decode", 0)))  # fmt: skip
        out = [held, queried, hits, native]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            out.append(family)
        return out
